"""Start a job: fork its supervisor, drop privileges, redirect output, exec.

Every job gets a supervisor: a process forked from the daemon that stays root
(on the system service), becomes a child subreaper, forks the job's command as
the user and waits for it. The supervisor, not the daemon, is the job's parent,
so a daemon restart or crash never loses a job's exit status: the supervisor
writes its exit report (tsd.exitreport) and exits, and whichever daemon is
running (the old one, or the new one that re-adopted the supervisor by its
pid and start time) records it.

The supervisor also owns ending the job: on SIGTERM (ts -k, which on the
system service is systemd's KillUnit on the whole scope) or when --timeout is
due, it sends SIGTERM to the whole tree, waits the grace period and sends
SIGKILL. When the job's main process exits, whatever it left running is ended
the same way, so a finished job holds no slot, GPU or process.

Supervisors are forked by the spawner (tsd.spawner), a small process the
daemon starts at its start, so that a job costs forks of a small process
rather than of the daemon; `spawn` here is the direct fork from the daemon,
for when there is no spawner. On the personal daemon a supervisor is reused:
once its job's end is settled it takes the next job the daemon sends it on its
link (tsd.spawner.run_member, tsd.supervisorpool; `run_job` runs one job,
`become_supervisor` is done once), so a job costs one posix_spawn of its
command. The daemon learns a job's end from its report pipe: a supervisor
sends the exit report itself there ("end REPORT", unless
TS_ONFINISH or mail may still change it) and waits (on its link, or on the go
pipe of one forked for a single job) for the daemon's ACK that the end is
stored, writing the report file only when none comes (`acks_end`); otherwise
the end of file, after the file is written, is the end. Either way the code
after fork() only makes system calls, never touches the event loop, the
database or logging, and always leaves through os._exit.

What the job leaves running when its main process exits is found and ended by
tsd.jobtree.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn

from tsd import cpupolicy, execpath, exitreport, joboutput, jobtree, privdrop
from tsd.model import ExitInfo
from tsd.paths import SENDMAIL
from tsd.twin import record_maker

PR_SET_CHILD_SUBREAPER = 36
JOB_NOFILE_SOFT = 1024  # systemd's default soft RLIMIT_NOFILE, what a login shell gets
# What the daemon writes to a supervisor's go pipe: run the job; or go away without a
# trace (a spawner died before telling the daemon this supervisor's pid, and the
# daemon starts the job again elsewhere). End of file (the daemon died) is "aborted".
GO = b"g"
QUIT = b"x"
# What the daemon writes to the go pipe (kept open for it, see `acks_end`) once a job's
# end, sent on the report pipe, is stored: no exit report file is needed then; or
# NAK (as end of file does): it will not record that report, write the file.
ACK = b"a"
NAK = b"n"
# run_job's `answer` returns this when the answer to the job's end is not there yet and
# the supervisor will read it later (it has its next job already: tsd.spawner).
LATER = b"l"
# The lines a supervisor writes on the pipe of a job sent ahead: TAKING before it
# reads the clock against the deadline, then BACK when it gives the job back
# (tsd.spawner): the daemon, at the deadline, finds TAKING or knows it is back.
TAKING = "taking"
BACK = "back"


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything the supervisor needs; decided by the daemon, never by the client."""

    job_id: int
    uid: int
    gid: int
    user: str
    command: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    umask: int
    log_dir: str
    exits_dir: str
    store_output: bool = True
    output_name: str | None = None
    gzip: bool = False
    stderr_apart: bool = False
    timeout: float | None = None
    grace: float = 10.0
    on_finish: str | None = None  # TS_ONFINISH: run as the user when the job ends
    mail_to: str | None = None  # -m: mail the output to this address
    drop_privileges: bool = True
    # With drop_privileges: the user's groups (tsd.userdb), set before gid and uid; None
    # has the process that drops them look them up (through NSS, after fork).
    groups: tuple[int, ...] | None = None
    # Soft RLIMIT_NOFILE the job starts with; None keeps the daemon's. The system
    # service runs with a raised limit (tsd.service) that jobs must not inherit.
    nofile_soft: int | None = None
    # ts -n: the submitting ts's stdout and stderr (the daemon's copies), to become the
    # job's fds 1 and 2; None sends a not-stored output to /dev/null.
    out_fds: tuple[int, int] | None = None
    # May run in a supervisor that ran another job before and stays for the next one
    # (tsd.supervisorpool): only where no scope holds the supervisor (the personal daemon).
    reuse: bool = False
    # A supervisor forked for this job alone waits on its go pipe for the ACK of its
    # report (`acks_end`): the daemon answers it (tsd.runner); a caller that stores no
    # reports leaves this False and reads the exit report file.
    ack_on_go: bool = False
    # A job sent ahead to a reused supervisor whose job runs (tsd.supervisorpool): it
    # starts it at that job's end if that comes before this time (CLOCK_MONOTONIC,
    # the daemon's loop clock too), else gives it back; None: start it at its GO.
    ahead_until: float | None = None


# A plan for each job the daemon starts, decoded again by its supervisor: made through
# a twin (tsd.twin), a third of the time of the frozen class's own __init__.
make_plan = LaunchPlan if TYPE_CHECKING else record_maker(LaunchPlan)


@dataclass(frozen=True, slots=True)
class Launched:
    """What the daemon learns right after fork."""

    supervisor_pid: int
    supervisor_start: int | None
    go: Callable[[], None]
    abort: Callable[[], None]
    report_fd: int
    # After abort(): returns once the supervisor has exited (its "aborted" report is
    # written). Closes `pidfd`.
    wait: Callable[[], None] = lambda: None
    # A pidfd of the supervisor, opened before it could exit and be reaped, for
    # watching it without a race with pid reuse; the receiver owns it. None: open one.
    pidfd: int | None = None
    # When the supervisor waits for an answer after sending its job's end (`acks_end`):
    # answer(ACK) once the end is stored, answer(NAK) to have it write the file
    # instead, answer(None) when it sent no end to answer; called once (after go()),
    # True when it was told. None: it waits for nothing.
    answer: Callable[[bytes | None], bool] | None = None
    # Called once the supervisor's end came and it waits for `answer`: a reused one may
    # be handed its next job ahead of that answer (tsd.supervisorpool). None: no such.
    ending: Callable[[], None] | None = None


make_launched = Launched if TYPE_CHECKING else record_maker(Launched)


def acks_end(plan: LaunchPlan) -> bool:
    """Whether the supervisor sends the job's exit report on the report pipe and waits
    for the daemon to say it is stored (ACK: on its link when reused, else on its go
    pipe), writing the report file only when no ACK comes (the daemon died, or gave up
    on the job). A reused supervisor does, and one forked for its job alone when its
    plan says the daemon answers (`ack_on_go`), unless TS_ONFINISH or mail may still
    change the report after the job: those send "end -", and the daemon reads the file."""
    return (plan.reuse or plan.ack_on_go) and not (plan.on_finish or plan.mail_to)


def proc_start_time(pid: int) -> int | None:
    """Kernel start time of a pid (clock ticks since boot): with the pid, a unique identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses; fields resume after the last ')'
    rest = data[data.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def spawn(plan: LaunchPlan) -> Launched:
    """Fork the supervisor from this process (the daemon, when there is no spawner).

    It waits until `go()` (after the daemon made the job durable and, on the
    system service, moved it into its scope) and runs nothing if `abort()`."""
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(rep_r)
        run_supervisor(plan, go_r, rep_w, inherited=True)
    os.close(go_r)
    os.close(rep_w)

    def wait() -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    return launched(pid, proc_start_time(pid), go_w, rep_r, wait=wait, keep_go=acks_end(plan))


def go_controls(
    go_w: int, keep: bool = False
) -> tuple[Callable[[], None], Callable[[], None]]:
    """`go` and `abort` for a supervisor waiting on the read end of `go_w`; each closes
    it, but go() keeps it open when `keep` (for the end's answer, `answer_on`)."""

    def go() -> None:
        try:
            os.write(go_w, GO)
        finally:
            if not keep:
                os.close(go_w)

    def abort() -> None:
        os.close(go_w)

    return go, abort


def launched(
    pid: int, start: int | None, go_w: int, rep_r: int,
    wait: Callable[[], None], pidfd: int | None = None, keep_go: bool = False,
) -> Launched:
    """What the daemon keeps of a supervisor waiting for go on `go_w`, reporting on `rep_r`;
    `keep_go`: it waits on `go_w` for the end's ACK too (`acks_end`)."""
    os.set_blocking(rep_r, False)
    go, abort = go_controls(go_w, keep_go)
    return make_launched(
        pid, start, go, abort, rep_r, wait=wait, pidfd=pidfd,
        answer=answer_on(go_w) if keep_go else None,
    )


def answer_on(go_w: int) -> Callable[[bytes | None], bool]:
    """Launched.answer for a supervisor that waits on the read end of `go_w` (its end
    of file is a NAK); closes it."""

    def answer(word: bytes | None) -> bool:
        try:
            if word:
                os.write(go_w, word)
            return True
        except OSError:
            return False
        finally:
            os.close(go_w)

    return answer


def wait_pidfd(pidfd: int) -> None:
    """Block until the process of `pidfd` has exited; close the pidfd."""
    try:
        select.select([pidfd], [], [])
    finally:
        os.close(pidfd)


def run_supervisor(plan: LaunchPlan, go_r: int, rep_w: int, inherited: bool) -> NoReturn:
    """In a freshly forked child: be the job's supervisor, then exit.

    `inherited`: forked from the daemon, whose signal handlers must all be undone;
    the spawner's child only has the spawner's own SIGCHLD handler to drop.
    """
    code = 70
    try:
        reset_process_state([go_r, rep_w, *(plan.out_fds or ())], inherited)
        become_supervisor()
        supervise(plan, go_r, rep_w)
        code = 0
    except BaseException:
        code = 70
    finally:
        os._exit(code)


# ------------------------------------------------------------ supervisor side


def default_signals() -> None:
    """Every signal to its default action, none blocked, no wakeup fd (Python's start
    ignores SIGPIPE and SIGXFSZ, which exec would pass on to the job)."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def reset_process_state(keep: Sequence[int], inherited: bool) -> None:
    """Forget the parent: default signal handlers, no wakeup fd, no inherited fds."""
    if inherited:
        default_signals()
    else:  # the spawner set all to default once; only its SIGCHLD wake-up is its own
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    fds = sorted(keep)
    low = 3
    for fd in fds:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)
    # stdin for reading only: a reused supervisor's jobs inherit it as it is.
    for target, mode in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        null = os.open(os.devnull, mode)
        if null != target:
            os.dup2(null, target)
            os.close(null)


# What a supervisor waits for (sigtimedwait): its job's processes ending, and being told
# to end the job. Blocked for good once it is a supervisor.
WATCHED = frozenset({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

# A job that ends this soon after its start is told to the daemon in one message
# (pid, output and end): the daemon wakes and reads once for it, not twice. A longer
# job's pid is told then (the daemon holds signals for a job until it knows its pid,
# and `ts -p`/`-o` wait for it: tsd.handlers.get_job). 20 ms rather than 2: with 16
# slots on 2 CPUs half the `true` jobs of a burst outlast 2 ms, and each paid a
# wake-up of its supervisor and a line for the daemon (+2-3% jobs/s there).
TELL_AFTER = 0.02
# How often a supervisor whose previous job's end is not answered yet looks for the
# answer while the next job runs (it comes within milliseconds; until then only a NAK
# or a daemon gone would need that end's report file, which waits at most this long).
# A short job is over first, and its end reads the answer: no wake-up for it.
POLL_EVERY = 0.05


def become_supervisor() -> None:
    """Turn this process into a supervisor, once (a reused one keeps all of it): the
    subreaper of every job it runs, with the signals it waits for blocked."""
    # The daemon may go away at any instant (restart, kill -9, upgrade) and with it
    # the read end of the report pipe: a write there must fail with EPIPE, which
    # report_line ignores, not kill the supervisor and orphan the job. Its children
    # get SIGPIPE's default back before they exec (_child_defaults).
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        privdrop.libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)
    global _own_umask, _null_out
    _own_umask = os.umask(0o022)
    os.umask(_own_umask)
    _null_out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


# A supervisor's own umask (read once, in become_supervisor): a job with the same one
# (the usual case: both come from the user's shell) is spawned without setting it.
_own_umask: int | None = None
# /dev/null for writing, kept: what fds 1 and 2 go back to after a spawn (_spawn_job).
_null_out = -1


def forget_signals() -> None:
    """Drop the watched signals still pending: in a reused supervisor they were meant
    for its previous job (a ts -k that crossed that job's end), not the next one."""
    while signal.sigtimedwait(WATCHED, 0) is not None:
        pass


def supervise(plan: LaunchPlan, go_r: int, rep_w: int) -> bool:
    """Run one job once the daemon says go and leave its exit report. True when the
    job's turn is over: the caller closes `rep_w` then (the daemon's end of file there
    is the job's end) and may run another; False when it ran nothing (told to quit,
    or aborted) and must exit, as the daemon waits for its exit then."""
    word = os.read(go_r, 1)
    if word == QUIT:
        return False  # the daemon never knew us: no report, or it would be taken for the job's
    if word != GO:
        # The daemon died (or gave up) before the job was recorded as running: run nothing
        # and say so, so that a restarted daemon puts the job back in the queue.
        # One try: on a full disk the job is lost to a restarted daemon rather than
        # this process blocking the daemon that is waiting for it after abort().
        exitreport.write(plan.exits_dir, plan.job_id, exitreport.ABORTED)
        return False
    try:
        run_job(plan, rep_w, functools.partial(_read_word, go_r) if acks_end(plan) else None)
    finally:
        os.close(go_r)
    return True


def run_job(
    plan: LaunchPlan, rep_w: int, answer: Callable[[], bytes] | None,
    poll: Callable[[], bool] | None = None,
) -> exitreport.ExitReport | None:
    """Run the job the daemon just said go for, to its end, and report the end on
    `rep_w`: sent there, then the daemon's answer awaited (`answer()`: ACK, NAK, or
    b"" when it is gone) when it is given (see `acks_end`), else (or when no ACK
    comes) written to the exit report file. The caller closes `rep_w` afterwards: the
    daemon's end of file. When `answer()` says LATER the report is returned instead,
    for the caller to settle once the answer comes (`settle`); else None.

    `poll`, while it returns True, is called at least every POLL_EVERY seconds as the
    job runs: a reused supervisor reads the answer to its previous job's end then."""
    # The system daemon moved us into the job's scope before go. A reused supervisor
    # (the personal daemon's) has none: a tsd-job scope it is in belongs to a system
    # job that started this personal daemon, and is not this job's to end or count.
    cg = None if plan.reuse else jobtree.own_cgroup_dir()

    start = time.time()
    child, out, failure, main_status = _start_job(plan, rep_w)
    started = f"pid {'-' if child is None else child}\nout {out}"
    # The daemon hears of the start with the end when the job ends within TELL_AFTER.
    told_at = time.monotonic() + TELL_AFTER
    told = main_status is not None
    if told:
        report_line(rep_w, started)

    timed_out = False
    killing_since: float | None = None
    sent_kill = False
    rusage: object | None = None
    none_left = False  # no child left once the main one was reaped: nothing of the job runs
    deadline = start + plan.timeout if plan.timeout else None
    # No reap before the first wait: SIGCHLD is blocked, so a job that ended already
    # left it pending, and the wait returns at once.
    waited = False
    while main_status is None:
        assert child is not None
        if waited:
            main_status, rusage, none_left = jobtree.reap(child)
            if main_status is not None:
                break
        now = time.time()
        if deadline is not None and now >= deadline and killing_since is None:
            timed_out = True
            killing_since = now
            jobtree.signal_tree(signal.SIGTERM, cg)
        if killing_since is not None and not sent_kill and now >= killing_since + plan.grace:
            sent_kill = True
            jobtree.signal_tree(signal.SIGKILL, cg)
        wake = [60.0]
        if deadline is not None and killing_since is None:
            wake.append(deadline - now)
        if killing_since is not None and not sent_kill:
            wake.append(killing_since + plan.grace - now)
        if not told:
            wake.append(told_at - time.monotonic())
        if poll is not None:
            wake.append(POLL_EVERY)
        info = signal.sigtimedwait(WATCHED, max(0.0, min(wake)))
        waited = True
        if poll is not None and not poll():
            poll = None
        if not told and time.monotonic() >= told_at:
            report_line(rep_w, started)
            told = True
        if info is not None and info.si_signo != signal.SIGCHLD and killing_since is None:
            killing_since = time.time()
            jobtree.signal_tree(signal.SIGTERM, cg)

    end = time.time()
    # Whatever the job left behind goes too: a finished job holds nothing. Outside a
    # scope, no child left means nothing left (tsd.jobtree): nothing to look for.
    if not (none_left and cg is None):
        jobtree.end_leftovers(min(plan.grace, 5.0), cg)
    cpu, peak = jobtree.cgroup_usage(cg)
    if cpu is None and rusage is not None:
        cpu = float(rusage.ru_utime + rusage.ru_stime)  # type: ignore[attr-defined]
    # No rusage fallback for memory: ru_maxrss would count the forked launcher's own
    # image from before exec, so only the scope's cgroup gives an honest peak.
    code = os.WEXITSTATUS(main_status) if os.WIFEXITED(main_status) else None
    report = exitreport.ExitReport(
        exit=ExitInfo(
            code=code,
            signal=None if code is not None else os.WTERMSIG(main_status),
            timed_out=timed_out,
            cpu_seconds=cpu,
            max_rss=peak,
            note=failure,
        ),
        end=end,
        output=None if out == "-" else out,
    )
    # A daemon still reading the report pipe records the end and syncs it itself; with
    # none there (restart, crash) the report must survive a crash on its own. A
    # supervisor sends the report itself and waits for the daemon's ACK that it is
    # stored: then no file is needed. Without the ACK (the daemon died first, or gave
    # up on the job) the file is written, durably. TS_ONFINISH or mail may still change
    # the report, so with those the daemon reads the file once the pipe closes.
    # A start not told yet goes in the same message as the end.
    untold = "" if told else f"{started}\n"
    line = f"{untold}end {exitreport.encode(report)}"
    # A line of at most PIPE_BUF bytes reaches the daemon whole (POSIX), so it never
    # waits for an ACK of a report it could not read; a longer one goes in the file.
    if answer is not None and len(line.encode()) < select.PIPE_BUF:
        if report_line(rep_w, line):
            word = answer()
            if word == LATER:
                return report
            if word == ACK:
                return None
        _write_report_until_stored(plan, report, durable=True)
        return None
    durable = not report_line(rep_w, f"{untold}end -")
    _write_report_until_stored(plan, report, durable)
    _after_job(plan, report)
    return None


def settle(plan: LaunchPlan, report: exitreport.ExitReport, word: bytes) -> None:
    """The daemon's answer to an end run_job left to settle later: nothing to do once
    it is stored (ACK); its report file, durably, on a NAK or with the daemon gone."""
    if word != ACK:
        _write_report_until_stored(plan, report, durable=True)


def _read_word(fd: int) -> bytes:
    """One byte from the daemon; b"" at end of file or on an error."""
    try:
        return os.read(fd, 1)
    except OSError:
        return b""


REPORT_RETRY = 1.0  # seconds between tries to write the exit report on a full disk


def _write_report_until_stored(
    plan: LaunchPlan, report: exitreport.ExitReport, durable: bool
) -> None:
    """Write the exit report, waiting for space to return when the state dir is full.

    The supervisor stays alive (the job shows as running) until its report is
    on disk: exiting without one would turn the job's real exit code into "lost".
    Other errors (the directory gone, EIO) are not waited for.
    """
    while True:
        try:
            exitreport.write(plan.exits_dir, plan.job_id, report, durable)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
        time.sleep(REPORT_RETRY)


def _child_defaults() -> None:
    """In a child about to exec: SIGPIPE back to default (the supervisor ignores it),
    and the CPU policy the supervisor started with (tsd.cpupolicy)."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cpupolicy.give_back()


def report_line(fd: int, line: str) -> bool:
    """Write a line on a report pipe (a supervisor's to its daemon, a job's to its
    supervisor); whether anyone was there to read it."""
    try:
        os.write(fd, (line + "\n").encode())
    except OSError:
        return False
    return True


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()


# ------------------------------------------------------------- job side


def _start_job(plan: LaunchPlan, rep_w: int) -> tuple[int | None, str, str, int | None]:
    """Start the job's main process: (its pid, its output file or "-", why it could not
    start, and its wait status when no process was left to wait for)."""
    if not (plan.drop_privileges or plan.gzip or plan.nofile_soft is not None):
        return _spawn_job(plan)
    status_r, status_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(status_r)
            os.close(rep_w)
            _exec_job(plan, status_w)
        finally:
            os._exit(127)
    os.close(status_w)
    # Only the job writes to the caller's terminal: its end is EOF for a reader there.
    _close_all(plan.out_fds or ())
    # The job writes "out PATH" and, if it cannot start, "err REASON"; EOF comes at exec.
    started = parse_report(_read_all(status_r))
    return child, started.get("out", "-"), started.get("err", ""), None


def _spawn_job(plan: LaunchPlan) -> tuple[int | None, str, str, int | None]:
    """`_start_job` without a fork of this process: posix_spawn (vfork and exec).

    For a job that keeps the supervisor's user and limits (the personal daemon):
    what _exec_job does in the child is done here around the spawn (umask, output
    files, working directory, fds 0-2) or by posix_spawn itself (process group,
    signals), with the same results and the same messages when the job cannot start.
    """
    own_umask = plan.umask == _own_umask
    old_umask = plan.umask if own_umask else os.umask(plan.umask)
    opened: tuple[int, ...] = ()
    path: str | None = None
    try:
        try:
            out_fd, err_fd, path = _open_outputs(plan, -1)
            opened = (out_fd, err_fd)
            os.chdir(plan.cwd)
        except Exception as exc:
            return None, path or "-", f"could not start: {exc}", 127 << 8
        env = dict(plan.env)
        argv = list(plan.command)
        # The job inherits its outputs as this process's own fds 1 and 2, set for the
        # spawn and put back to /dev/null after it (stdin is /dev/null for good,
        # reset_process_state): no file actions (execpath.spawn_on_path).
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        try:
            pid = execpath.spawn_on_path(argv, env)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.write(err_fd, f"tsd: cannot run {argv[0]!r}: {exc.strerror}\n".encode())
            return None, path or "-", "", (127 if isinstance(exc, FileNotFoundError) else 126) << 8
        return pid, path or "-", "", None
    finally:
        if opened:  # only the job holds its outputs (a terminal's reader sees its end)
            os.dup2(_null_out, 1)
            os.dup2(_null_out, 2)
        if not own_umask:
            os.umask(old_umask)
        with contextlib.suppress(OSError):
            os.chdir("/")
        _close_all(set(opened) | set(plan.out_fds or ()))


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _exec_job(plan: LaunchPlan, status_w: int) -> None:
    """Runs as the job process: never returns."""
    _child_defaults()
    os.setpgid(0, 0)
    try:
        privdrop.reset_nofile(plan.nofile_soft)
        if plan.drop_privileges:
            privdrop.drop_privileges(plan.uid, plan.gid, plan.user, plan.groups)
        os.umask(plan.umask)
        out_fd, err_fd, path = _open_outputs(plan, status_w)
        report_line(status_w, f"out {path}" if path else "out -")
        os.chdir(plan.cwd)
    except Exception as exc:
        report_line(status_w, f"err could not start: {exc}")
        os._exit(127)
    os.close(status_w)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in {null, out_fd, err_fd}:
        if fd > 2:
            os.close(fd)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Like task-spooler: the words are exec'd as given (execvp), no shell in between.
    try:
        os.execvpe(plan.command[0], list(plan.command), dict(plan.env))
    except OSError as exc:
        os.write(2, f"tsd: cannot run {plan.command[0]!r}: {exc.strerror}\n".encode())
        os._exit(127 if isinstance(exc, FileNotFoundError) else 126)


def _open_outputs(plan: LaunchPlan, status_w: int) -> tuple[int, int, str | None]:
    """Open stdout/stderr targets as the user (privileges already dropped)."""
    if not plan.store_output:
        if plan.out_fds is not None:
            return plan.out_fds[0], plan.out_fds[1], None
        null = os.open(os.devnull, os.O_WRONLY)
        return null, null, None
    if plan.output_name:
        path = os.path.join(plan.log_dir, plan.output_name)
        fd = joboutput.create_new(path, "-O")
    else:
        fd, path = joboutput.mkstemp(plan.log_dir, f"{joboutput.OUTPUT_PREFIX}{plan.job_id}.")
    err_fd = fd
    if plan.stderr_apart:
        err_fd = joboutput.create_new(path + ".e", "-E")
    if plan.gzip:
        fd = joboutput.gzip_pipe(fd, status_w)
        err_fd = joboutput.gzip_pipe(err_fd, status_w) if plan.stderr_apart else fd
    return fd, err_fd, path


# ------------------------------------------------------------ after the job


def _after_job(plan: LaunchPlan, report: exitreport.ExitReport) -> None:
    """TS_ONFINISH and -m mail, run as the user with the job's environment."""
    if not plan.on_finish and not plan.mail_to:
        return
    elevel = report.exit.code if report.exit.code is not None else -1
    output = report.output or "/dev/null"
    if plan.on_finish:
        _run_as_user(
            plan, [plan.on_finish, str(plan.job_id), str(elevel), output, " ".join(plan.command)]
        )
    if plan.mail_to:
        body = (
            f"Subject: Task Spooler: task {plan.job_id} finished, error {elevel}\n"
            f"To: {plan.mail_to}\n\n"
            f"Command: {' '.join(plan.command)}\nOutput: {output}\n"
        )
        status = _run_as_user(plan, [SENDMAIL, "-oi", plan.mail_to], stdin=body.encode())
        problem = mail_problem(status)
        if problem:
            # The daemon reads the report once this supervisor has exited, so the
            # note rewritten here is what `ts -i` shows.
            note = "; ".join(n for n in (report.exit.note, problem) if n)
            exitreport.write(
                plan.exits_dir, plan.job_id,
                replace(report, exit=replace(report.exit, note=note)),
            )


def mail_problem(status: int | None) -> str:
    """The note for `ts -i` when -m's mail was not sent, from sendmail's wait status."""
    if status is None:
        return f"mail not sent: {SENDMAIL} did not run"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 127:
        return f"mail not sent: {SENDMAIL} could not be run (is a mail program installed?)"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
        return f"mail not sent: {SENDMAIL} exited {os.WEXITSTATUS(status)}"
    if os.WIFSIGNALED(status):
        return f"mail not sent: {SENDMAIL} killed by signal {os.WTERMSIG(status)}"
    return ""


def _run_as_user(plan: LaunchPlan, argv: list[str], stdin: bytes = b"") -> int | None:
    """Run argv as the job's user, feeding it stdin; its wait status, None if not reaped."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            _child_defaults()
            privdrop.reset_nofile(plan.nofile_soft)
            if plan.drop_privileges:
                privdrop.drop_privileges(plan.uid, plan.gid, plan.user, plan.groups)
            os.dup2(r, 0)
            os.chdir(plan.cwd)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            os.execve(argv[0], argv, dict(plan.env))
        finally:
            os._exit(127)
    os.close(r)
    with contextlib.suppress(OSError):
        joboutput.write_all(w, stdin)
    os.close(w)
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


def parse_report(text: str) -> dict[str, str]:
    """The "key value" lines a job tells its supervisor, and a supervisor its daemon."""
    return dict(line.partition(" ")[::2] for line in text.splitlines())
