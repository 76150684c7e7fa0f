"""The exit report: what a job's supervisor leaves in `<state>/exits/<id>.json`.

Written once by the supervisor (tsd.launch) when its job ends, or when it was
told to run nothing; read by whichever daemon is running then (the one that
started the job, or the next one after a restart). This module is the only
reader and writer, so both sides agree on the file's name and fields.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, replace

from tsd.codec import exit_from_dict, exit_to_dict
from tsd.model import ExitInfo


@dataclass(frozen=True)
class ExitReport:
    """How a supervised job ended, or that it never started (`aborted`)."""

    exit: ExitInfo
    end: float | None = None  # epoch seconds the job ended
    output: str | None = None  # the output file, or None (-n, or never opened)
    aborted: bool = False  # the daemon never said go: the job did not run


# What a supervisor leaves when it ran nothing (never told to go): the job goes back
# to the queue.
ABORTED = ExitReport(exit=ExitInfo(), aborted=True)


def path(exits_dir: str | os.PathLike[str], job_id: int) -> str:
    """Where the supervisor of job `job_id` leaves its report."""
    return os.path.join(exits_dir, f"{job_id}.json")


def encode(report: ExitReport) -> str:
    """The report as one line of JSON: the file's content, and what a supervisor sends
    its daemon on the report pipe ("end <json>") so that the end is recorded without
    waiting for the file."""
    body: dict[str, object] = {"aborted": True} if report.aborted else {
        **exit_to_dict(report.exit),
        "end": report.end,
        "output": report.output if report.output is not None else "-",
    }
    return json.dumps(body)


def decode(text: str) -> ExitReport | None:
    """A report from `encode`'s text; None when it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    if obj.get("aborted"):
        return ExitReport(exit=ExitInfo(), aborted=True)
    try:
        ex = exit_from_dict(obj)
        end = float(obj["end"]) if obj.get("end") else None
    except (TypeError, ValueError, KeyError):
        return None
    if not ex.note and ex.timed_out:
        ex = replace(ex, note="timed out")
    out = obj.get("output")
    return ExitReport(exit=ex, end=end, output=None if out in (None, "-") else str(out))


def write(exits_dir: str, job_id: int, report: ExitReport, durable: bool = True) -> None:
    """Write the report atomically, and durably (fsync the file and the directory)
    unless `durable` is False: when a daemon is there to record it at once, its own
    commit makes the end durable before anyone hears of it, and a machine crash
    before that commit costs what a crash while the job ran would have cost.

    Runs in the supervisor after fork: only system calls, nothing shared with the daemon.
    """
    final = path(exits_dir, job_id)
    tmp = final[: -len(".json")] + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, encode(report).encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    if durable:
        _sync_dir(exits_dir)


def _sync_dir(exits_dir: str) -> None:
    dfd = os.open(exits_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _idle_mark(exits_dir: str | os.PathLike[str], pid: int, start: int | None) -> str:
    return os.path.join(exits_dir, f"idle.{pid}.{-1 if start is None else start}")


def mark_idle(exits_dir: str, pid: int, start: int | None) -> None:
    """Leave word, durably, that the reused supervisor `pid` (kernel start time `start`)
    held no job when its daemon went away without letting it go (tsd.spawner.run_member).

    A job goes to a reused supervisor in one message, its plan with its GO, sent once
    its start is committed: a daemon that dies between that commit and the send leaves
    the job recorded as running on a supervisor that never heard of it, and that then
    exits. This mark tells the next daemon so (`has_idle_mark`): it queues such a job
    again (tsd.runend), as it does one with an "aborted" report, rather than take it
    for a job whose supervisor vanished.
    """
    fd = os.open(_idle_mark(exits_dir, pid, start), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_dir(exits_dir)


def idle_marks(exits_dir: str | os.PathLike[str]) -> set[tuple[int, int | None]]:
    """The (pid, start time) of every supervisor that left a `mark_idle`."""
    marks: set[tuple[int, int | None]] = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(exits_dir):
            kind, _, rest = name.partition(".")
            pid, _, start = rest.partition(".")
            if kind == "idle" and pid.isdigit() and start.lstrip("-").isdigit():
                marks.add((int(pid), None if int(start) < 0 else int(start)))
    return marks


def has_idle_mark(exits_dir: str | os.PathLike[str], pid: int, start: int | None) -> bool:
    """Whether the supervisor `pid` (kernel start time `start`) left a `mark_idle`."""
    return os.path.exists(_idle_mark(exits_dir, pid, start))


def clear_idle_marks(exits_dir: str | os.PathLike[str], marks: set[tuple[int, int | None]]) -> None:
    """Remove these marks once the daemon has acted on them."""
    for pid, start in marks:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_idle_mark(exits_dir, pid, start))


def read(exits_dir: str | os.PathLike[str], job_id: int) -> ExitReport | None:
    """The report of job `job_id`, or None when there is none (or it is unreadable)."""
    try:
        with open(path(exits_dir, job_id), encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, ValueError):
        return None
    return decode(text)


def discard(exits_dir: str | os.PathLike[str], job_id: int) -> None:
    """Remove the report once the daemon has recorded it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path(exits_dir, job_id))
