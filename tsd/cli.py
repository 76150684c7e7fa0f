"""`ts`: GPU Task Spooler's command line on top of the tsd daemon.

The command line is parsed by the option table in tsd.cli_options and turned
into a request by tsd.cli_request; this module carries the request out
against the daemon, prints the answer and chooses the exit code. Every
failure ends as one `ts: ...` line on stderr (`at_edge`).

Kept fast to start: queueing a job (the call `ts` makes most) imports only
the standard library and tsd's light modules (no click, no dataclasses,
nothing from `typing` at run time), and so does every other action: requests
travel as built by tsd.cli_request, answers are read through tsd.jobview's
views, never the typed protocol or the job model; the renderers load when an
action prints a job. The launcher (tsd.entry) serves `ts COMMAND...` with no
options without this module (tsd.plainsubmit); its failures still end here.
"""

from __future__ import annotations

import posix
import sys
import time

from tsd import leanos
from tsd.cli_options import ABSENT, UsageError
from tsd.cli_output import (
    TAIL_LINES,
    StdoutGone,
    check,
    emit,
    follow_output,
    job_of,
    say_queue_full,
    submitted_ids,
    wait_code,
    warn,
)
from tsd.cli_request import GET_DEFAULTS, Invocation, invocation, wire
from tsd.client import Client, choose_socket
from tsd.errors import BadRequest, ServerUnavailable, TsdError
from tsd.framing import MAX_TEXT
from tsd.paths import SENDMAIL

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any, NoReturn

    from tsd.jobview import JobView

TS_ENV_TIMEOUT = 30.0


def _ts_env_info(environ: Mapping[str, str]) -> str | None:
    """TS_ENV: run it with sh at submit time; its output is the job's information (-i)."""
    script = environ.get("TS_ENV")
    if not script:
        return None
    import subprocess  # only with TS_ENV: keep it off every other start

    try:
        proc = subprocess.run(
            ["/bin/sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            timeout=TS_ENV_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TsdError(f"TS_ENV did not finish within {TS_ENV_TIMEOUT:g}s") from None
    except OSError as exc:
        raise TsdError(f"cannot run TS_ENV: {exc.strerror}") from None
    text = proc.stdout.decode("utf-8", "replace").replace("\0", "")
    return text[:MAX_TEXT] or None


# ------------------------------------------------------------------ running


def submit(client: Client, inv: Invocation, environ: Mapping[str, str]) -> int:
    """Queue the job: send the request as it travels; the daemon checks the spec.

    Prints the new id (not with -nf); with -f waits and exits with the job's code.
    """
    req = inv.wire
    assert req is not None
    info = _ts_env_info(environ)
    if info is not None:
        req["spec"]["env_info"] = info
    if req["spec"].get("mail") and not leanos.exists(SENDMAIL):
        # Queued anyway (the job is what matters); `ts -i` later says the mail failed.
        warn(f"warning: -m: {SENDMAIL} does not exist, so no mail will be sent")
    name = req["spec"].get("output_name")
    if isinstance(name, str) and "/" not in name:
        _check_new_output(client, name, bool(req["spec"].get("stderr_apart")), environ)
    fds = _terminal_fds() if req["spec"].get("store_output") is False else ()
    if req.get("wait"):
        return _submit_and_wait(client, req, fds)
    conn = client.connect()
    try:
        conn.send_wire(req, fds)
        while True:
            # Ctrl-C here leaves through at_edge (exit 130); the daemon sees the hang-up
            # and drops the job it had not queued yet.
            frame = conn.recv()
            if "event" not in frame:
                break
            say_queue_full(frame)
    finally:
        conn.close()
    job_id, ids = submitted_ids(frame)
    if inv.print_id:
        emit("".join(f"{i}\n" for i in ids))
    if not inv.foreground:
        return 0
    try:
        return wait_code(job_of(_stream_final(client, wire("wait", id=job_id))))
    except KeyboardInterrupt:
        # task-spooler's -f runs the job in the foreground: Ctrl-C ends it.
        _kill_quietly(client, job_id)
        return 130


def _terminal_fds() -> tuple[int, ...]:
    """ts -n: our stdout and stderr, for the job to write to (task-spooler's -n sends
    the output to the terminal of the ts that queued it); none if either is closed."""
    try:
        posix.fstat(1)
        posix.fstat(2)
    except OSError:
        return ()  # then the job's output goes to /dev/null
    return (1, 2)


def _submit_and_wait(client: Client, req: dict[str, Any], fds: tuple[int, ...] = ()) -> int:
    """ts -nf: queue and wait on one connection; exit with the job's code, print nothing
    (the job itself writes to our stdout and stderr)."""
    job_id: int | None = None
    conn = client.connect()
    try:
        conn.send_wire(req, fds)
        while True:
            try:
                frame = conn.recv()
            except KeyboardInterrupt:
                # As with -f: Ctrl-C ends the job it runs in the foreground.
                if job_id is not None:
                    _kill_quietly(client, job_id)
                return 130
            say_queue_full(frame)
            if frame.get("event") == "queued" and isinstance(frame.get("id"), int):
                job_id = frame["id"]
            elif "event" not in frame:
                break
    finally:
        conn.close()
    try:
        return wait_code(job_of(check(frame)))
    except BadRequest as exc:
        raise UsageError(exc.message.removeprefix("bad request: ")) from None


def _check_new_output(
    client: Client, name: str, stderr_apart: bool, environ: Mapping[str, str]
) -> None:
    """-O NAME: refuse now, checked as the user, a name already taken in the log dir.

    The job creates its output with O_EXCL and fails with a note if the name is
    taken meanwhile; this check only makes the common case one line at submit.
    """
    resp = client.call(wire("logdir", path=None))
    directory = str(resp.get("path")) if resp.get("custom") else environ.get("TMPDIR") or "/tmp"
    path = leanos.join(directory, name)
    for taken in (path, path + ".e") if stderr_apart else (path,):
        if leanos.lexists(taken):
            raise TsdError(
                f"-O {name}: {taken} already exists; tsd writes output only to a new file"
            )


def _stream_final(client: Client, req: dict[str, Any]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    for frame in client.stream(req):
        if "event" not in frame:
            final = frame
    return final


def run(inv: Invocation, environ: Mapping[str, str] | None = None) -> int:
    """Carry out an Invocation against the daemon; returns the exit code."""
    environ = leanos.environ() if environ is None else environ
    if inv.action == "help":
        from tsd.cli_options import help_text

        emit(help_text())
        return 0
    if inv.action == "version":
        from tsd.cli_options import VERSION_TEXT

        emit(VERSION_TEXT)
        return 0
    if inv.action == "submit":
        return submit(Client(), inv, environ)
    req = inv.wire
    assert req is not None
    if inv.action == "shutdown":
        client = Client(may_start=False)
        try:
            client.call(req)
        except ServerUnavailable:
            if choose_socket(environ)[1]:
                return 0  # no personal daemon running: nothing to shut down
            raise
        return 0
    client = Client()
    if inv.action in ("tail", "cat"):
        conn = client.connect()
        try:
            conn.send_wire(req)
            tail = TAIL_LINES if inv.action == "tail" else None
            return follow_output(conn, tail, sys.stdout.buffer)
        finally:
            conn.close()
    if inv.action == "wait":
        # Read the answer's reader now, while the job still runs: loaded after the
        # answer, it would sit between the job's end and this ts returning.
        import tsd.jobview  # noqa: F401

        return wait_code(job_of(_stream_final(client, req)))
    if inv.action == "list" and inv.params.get("watch"):
        from tsd.cli_watch import watch

        return watch(client, req, inv.all_users, float(inv.params["watch"]), environ)
    return _show(inv, client.call(req))


def _show(inv: Invocation, resp: Mapping[str, Any]) -> int:
    """Print the answer to a one-shot request; the exit code."""
    action = inv.action
    if action in ("list", "gpu_status"):
        from tsd.cli_output import listing_text

        emit(listing_text(resp, inv.list_format, inv.all_users, action == "gpu_status"))
    elif action == "stats":
        from tsd.statsview import stats_json, stats_text

        rows = [r for r in resp.get("rows", []) if isinstance(r, dict)]
        emit(stats_json(rows) if inv.list_format == "json" else stats_text(rows))
    elif action in GET_DEFAULTS:
        return _show_job(action, job_of(resp))
    elif action == "slots":
        if inv.params.get("slots") in (None, ABSENT):
            emit(f"{resp.get('slots')}\n")
    elif action == "count_running":
        emit(f"{resp.get('count')}\n")
    elif action == "getenv":
        value = resp.get("value")
        if value is not None:
            emit(f"{value}\n")
    elif action == "get_logdir":
        emit(f"{resp.get('path')}\n")
    elif action == "get_gpu_free_perc":
        emit(f"{float(resp.get('value', 0)):g}\n")
    return 0


def _show_job(action: str, job: JobView) -> int:
    if action == "info":
        from tsd import render

        emit(render.info_text(job, time.time()))
    elif action == "state":
        emit(f"{job.state}\n")
    elif action == "last_queue_id":
        emit(f"{job.id}\n")
    elif action == "get_label":
        emit(f"{job.spec.label or ''}\n")
    elif action == "full_cmd":
        emit(f"{job.spec.command_line}\n")
    elif action == "pid":
        if job.pid is None:
            raise TsdError(f"job {job.id} has no process ({job.state})")
        emit(f"{job.pid}\n")
    elif action == "output":
        if not job.spec.store_output:
            raise TsdError(f"job {job.id} does not store its output (-n)")
        if not job.output_path:
            raise TsdError(f"job {job.id} has no output file yet ({job.state})")
        emit(f"{job.output_path}\n")
    return 0


def at_edge(inv: Callable[[], int]) -> int:
    """Run `inv`; where every failure becomes one `ts: ...` line and an exit code.

    A plain try rather than a context manager: contextlib (and the collections and
    functools it loads) would cost every `ts` call more than the rest of its imports.
    """
    try:
        return inv()
    except UsageError as exc:
        warn(str(exc))
        sys.exit(1)
    except TsdError as exc:
        warn(exc.message)
        sys.exit(exc.exit_code)
    except StdoutGone:
        # Like any filter whose reader went away: stop quietly.
        try:  # noqa: SIM105 (no contextlib on ts's path, see above)
            posix.dup2(posix.open("/dev/null", posix.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        sys.exit(141)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as exc:
        warn(f"lost the connection to the daemon: {exc.strerror or exc}")
        sys.exit(1)


def _kill_quietly(client: Client, job_id: int) -> None:
    """Ctrl-C on a job run in the foreground (-f, -nf) ends it, as task-spooler's does;
    a daemon already gone or a job already over is no error then."""
    try:  # noqa: SIM105 (no contextlib on ts's path, see at_edge)
        client.call(wire("kill", id=job_id))
    except (TsdError, OSError):
        pass


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of `ts`. Without argv it is the program: it ends the process itself."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "_TS_COMPLETE" in leanos.environ():
        # The shell asks for completions (the scripts `_TS_COMPLETE=<shell>_source ts` prints).
        from tsd.cli_completion import complete

        sys.exit(complete())
    code = at_edge(lambda: run(
        invocation(args, leanos.environ(), leanos.getcwd(), leanos.current_umask())))
    if argv is None:
        # Run as the program and done: all output was flushed as it was written
        # and every connection and file is closed, so skip tearing the
        # interpreter down module by module (a tenth of a quick `ts` call).
        # Failures leave through sys.exit in at_edge, the usual way.
        leanos.exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
