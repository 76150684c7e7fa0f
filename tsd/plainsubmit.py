"""`ts COMMAND...` with no options, the call `ts` makes most, on its lightest path.

A command line whose first word is not an option queues that command with every
option at its default. tsd.cli gets there through the option table (tsd.cli_options)
and everything the other actions need; this module builds the very same request
(tsd.submitwire, with the table's defaults: PLAIN_PARAMS) from the client, the lean
os calls and the request builder alone, and loads what reads the answer
(tsd.cli_output) once the request is out, while the daemon works on it. Together
that takes ~0.7 ms of imports off the way from `ts` to the job's start.

Anything else goes through tsd.cli as before: an option, TS_ENV (a script whose
output the job gets), shell completion; and so does every failure, which is
re-raised into tsd.cli's `at_edge` for the same one `ts: ...` line and exit code.
"""

# No `from __future__ import annotations` here, nor in the modules this one loads:
# that import loads __future__ (0.12 ms of each call). Annotations that name what only
# mypy imports are strings instead.

from tsd import framing, leanos
from tsd.client import Client
from tsd.submitwire import PLAIN_PARAMS, submit_wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any, NoReturn


def applies(args: "Sequence[str]", environ: "Mapping[str, str]") -> bool:
    """Whether ARGS is a plain `ts COMMAND...` that this path serves as tsd.cli would."""
    return (
        bool(args) and not args[0].startswith("-")
        and "TS_ENV" not in environ and "_TS_COMPLETE" not in environ
    )  # fmt: skip


def run_if_plain(args: "Sequence[str]") -> None:
    """Serve ARGS here and end the process when they are a plain `ts COMMAND...`
    (`applies`); return at once otherwise (the launcher goes on to tsd.entry.main)."""
    if applies(args, leanos.environ()):
        main(args)


def request(
    command: "Sequence[str]", environ: "Mapping[str, str]", cwd: str | None, umask: int
) -> "dict[str, Any]":
    """The submit request of `ts COMMAND...` (what tsd.cli_request.invocation's wire is)."""
    return submit_wire(PLAIN_PARAMS, set(), command, environ, cwd, umask)


def main(args: "Sequence[str]") -> "NoReturn":
    """Queue ARGS as a command and print its id, then end the process (as tsd.cli.main
    does when it is the program)."""
    try:
        code = _submit(args)
    except BaseException as exc:  # every failure as tsd.cli reports it
        from tsd.cli import at_edge

        failure = exc

        def again() -> int:
            raise failure

        code = at_edge(again)
    leanos.exit_now(code)


def _submit(args: "Sequence[str]") -> int:
    req = request(args, leanos.environ(), leanos.getcwd(), leanos.current_umask())
    # Encoded before connecting: the request follows the connect at once, and the
    # daemon reads it as it accepts the connection, with no wake-up in between.
    out = framing.Encoded(framing.plain_dumps(req).encode(), req)
    conn = Client().connect()
    try:
        conn.send_wire(out)
        from tsd import cli_output  # while the daemon works on the request

        while True:
            frame = conn.recv()
            if "event" not in frame:
                break
            cli_output.say_queue_full(frame)
    finally:
        conn.close()
    _, ids = cli_output.submitted_ids(frame)
    cli_output.emit("".join(f"{i}\n" for i in ids))
    return 0
