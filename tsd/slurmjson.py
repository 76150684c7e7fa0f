"""Slurm's answers as tsd reads them: `squeue --json` and `sacct -P` text -> records.

Pure: text in, frozen records out, no I/O. The shapes are those of Slurm 22.05's
openapi v0.0.38 plugin (squeue --json), captured from a real cluster in
tests/fixtures/slurm; later versions wrap some numbers in {"set", "number"}
objects, which `_number` reads too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class SlurmParseError(ValueError):
    """Slurm's output is not what tsd understands; the message is one line."""


@dataclass(frozen=True)
class SlurmJob:
    """One job as squeue or sacct reports it."""

    job_id: int
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    reason: str = ""  # state_reason: Resources, Dependency, DependencyNeverSatisfied, ...
    exit_status: int | None = None  # a wait status: code << 8, or the signal number
    start_time: float | None = None  # epoch seconds; None when not started
    end_time: float | None = None
    user: str = ""
    comment: str = ""
    gpus: tuple[int, ...] = ()  # GPU indices allocated on its node, when squeue says
    output: str = ""  # standard_output as given to sbatch (a pattern: %% is a %)


@dataclass(frozen=True)
class Snapshot:
    """One `squeue --json` answer: the jobs by id, or why Slurm could not answer."""

    jobs: Mapping[int, SlurmJob]
    error: str | None = None


def _number(value: Any) -> int | None:
    """A Slurm number: a plain int, or (newer Slurm) {"set": bool, "number": int}."""
    if isinstance(value, dict):
        if not value.get("set", True) or value.get("infinite"):
            return None
        value = value.get("number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _time(value: Any) -> float | None:
    number = _number(value)
    return float(number) if number else None  # 0 means "not yet" in squeue


def _state(value: Any) -> str:
    """job_state: a string in 22.05, a list of flags in later versions."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value or "")


def _gpu_indices(details: Any) -> tuple[int, ...]:
    """gres_detail entries such as "gpu:1(IDX:0)" or "gpu:tesla:2(IDX:0-1)"."""
    out: list[int] = []
    if not isinstance(details, list):
        return ()
    for item in details:
        text = str(item)
        if not text.startswith("gpu") or "(IDX:" not in text:
            continue
        spec = text.split("(IDX:", 1)[1].split(")", 1)[0]
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            if lo.isdigit() and (not hi or hi.isdigit()):
                out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def job_from_json(obj: Mapping[str, Any]) -> SlurmJob:
    """One element of squeue --json's "jobs"."""
    job_id = _number(obj.get("job_id"))
    if job_id is None:
        raise SlurmParseError("squeue --json: a job without a job_id")
    state = _state(obj.get("job_state"))
    started = _time(obj.get("start_time"))
    return SlurmJob(
        job_id=job_id,
        state=state,
        reason=str(obj.get("state_reason") or ""),
        exit_status=_number(obj.get("exit_code")),
        # A pending job's start_time is the scheduler's estimate, not a start.
        start_time=None if state == "PENDING" else started,
        end_time=_time(obj.get("end_time")) if state not in ("PENDING", "RUNNING") else None,
        user=str(obj.get("user_name") or ""),
        comment=str(obj.get("comment") or ""),
        gpus=_gpu_indices(obj.get("gres_detail")),
        output=str(obj.get("standard_output") or ""),
    )


def parse_squeue(text: str) -> Snapshot:
    """`squeue --json` output -> a Snapshot. Slurm's own errors go in `error`.

    squeue exits 0 and prints an "errors" list when the controller is down, so
    the exit status alone does not say whether the jobs list is real.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise SlurmParseError(f"squeue --json printed no JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SlurmParseError("squeue --json: expected an object")
    errors = data.get("errors") or []
    if errors:
        first = errors[0] if isinstance(errors[0], dict) else {"description": str(errors[0])}
        words = [str(first.get(k)) for k in ("description", "error") if first.get(k)]
        return Snapshot({}, "squeue: " + ": ".join(dict.fromkeys(words)))
    jobs = data.get("jobs")
    if not isinstance(jobs, list):
        raise SlurmParseError("squeue --json: no jobs list")
    parsed = [job_from_json(j) for j in jobs if isinstance(j, dict)]
    return Snapshot({j.job_id: j for j in parsed})


def _sacct_time(text: str) -> float | None:
    """sacct's ISO time (2026-12-02T12:15:04), local time; Unknown/None -> None."""
    import time as _time_mod  # strptime/mktime: parsing, no I/O

    if not text or text in ("Unknown", "None"):
        return None
    try:
        return _time_mod.mktime(_time_mod.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _sacct_exit(text: str) -> int | None:
    """sacct's ExitCode "code:signal" -> a wait status."""
    code, _, sig = text.partition(":")
    if not code.isdigit() or not sig.isdigit():
        return None
    return int(sig) if int(sig) else int(code) << 8


SACCT_FIELDS = "JobIDRaw,State,ExitCode,Start,End,User,Reason"


def parse_sacct(text: str) -> dict[int, SlurmJob]:
    """`sacct -X -n -P -o SACCT_FIELDS` lines -> jobs by id (job steps left out).

    The State column may read "CANCELLED by 1001"; only the first word counts.
    """
    out: dict[int, SlurmJob] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 5 or not fields[0].isdigit():
            continue  # a header, a step (123.batch), an array task (123_4)
        job_id = int(fields[0])
        out[job_id] = SlurmJob(
            job_id=job_id,
            state=fields[1].split(" ", 1)[0],
            exit_status=_sacct_exit(fields[2]),
            start_time=_sacct_time(fields[3]),
            end_time=_sacct_time(fields[4]),
            user=fields[5].split("(", 1)[0] if len(fields) > 5 else "",  # "alice(1001)"
            reason=fields[6] if len(fields) > 6 else "",
        )
    return out


def one_line_error(stderr: str, fallback: str) -> str:
    """Slurm's reason from a client command's stderr, as one line.

    sbatch says several `sbatch: error: ...` lines; the last names the outcome
    ("Batch job submission failed: Invalid partition name specified") and an
    earlier one may name the cause (munge down): both are kept.
    """
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln]
    if not errors:
        return lines[-1] if lines else fallback
    last = errors[-1]
    munge = [e for e in errors[:-1] if "munge" in e.lower()]
    cause = next((e for e in munge if "failed" in e.lower()), munge[0] if munge else None)
    return f"{last} ({cause})" if cause else last
