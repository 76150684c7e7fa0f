"""Slurm's answers as tsd reads them: `squeue --json` and `sacct -P` text -> records.

Pure: text in, frozen records out, no I/O. The shapes are those of Slurm 22.05's
openapi v0.0.38 plugin (squeue --json), captured from a real cluster in
tests/fixtures/slurm; later versions wrap some numbers in {"set", "number"}
objects, which `_number` reads too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
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
    # A job array's task: the array's id (what sbatch printed) and this task's index.
    array_job_id: int | None = None
    array_task_id: int | None = None
    array_tasks: str = ""  # squeue's record of tasks still pending together: "2-5%1"

    @property
    def ref(self) -> tuple[int, int | None]:
        """How tsd names it: (array id, task index) for an array task, else (job id, None)."""
        if self.array_job_id is not None and self.array_task_id is not None:
            return self.array_job_id, self.array_task_id
        return self.job_id, None


@dataclass(frozen=True)
class Snapshot:
    """One `squeue --json` answer: the jobs by id, or why Slurm could not answer.

    `tasks` holds every array task by (array id, index), the ones squeue shows
    collapsed in one pending record ("2-5%1") expanded to one record each.
    """

    jobs: Mapping[int, SlurmJob]
    error: str | None = None
    tasks: Mapping[tuple[int, int], SlurmJob] = field(default_factory=dict)

    def find(self, slurm_id: int, task: int | None) -> SlurmJob | None:
        """Slurm job `slurm_id`, or task `task` of array `slurm_id`."""
        if task is None:
            return self.jobs.get(slurm_id)
        return self.tasks.get((slurm_id, task))


# Slurm's own ceiling on an array index is MaxArraySize (at most 4000001).
MAX_TASK_INDEX = 4_000_001


def expand_tasks(text: str) -> tuple[int, ...]:
    """A Slurm array task list ("1-7:2,9%2", as sbatch --array and squeue's
    array_task_string spell it) -> its indices, sorted; SlurmParseError if malformed."""
    spec = text.partition("%")[0]
    out: set[int] = set()
    for part in spec.split(","):
        rng, colon, step_text = part.partition(":")
        lo_text, dash, hi_text = rng.partition("-")
        words = [lo_text, *([hi_text] if dash else []), *([step_text] if colon else [])]
        if not all(w.isdigit() and w.isascii() for w in words) or (colon and not dash):
            raise SlurmParseError(f"not a Slurm array task list: {text[:80]!r}")
        lo = int(lo_text)
        hi = int(hi_text) if dash else lo
        step = int(step_text) if step_text else 1
        if step < 1 or hi < lo or hi > MAX_TASK_INDEX:
            raise SlurmParseError(f"not a Slurm array task list: {text[:80]!r}")
        out.update(range(lo, hi + 1, step))
    return tuple(sorted(out))


def compress_tasks(indices: Iterable[int]) -> str:
    """Indices -> the shortest-ish task list sbatch --array reads ("0-9,12,20-40:5");
    expand_tasks(compress_tasks(x)) == sorted(set(x))."""
    xs = sorted(set(indices))
    parts: list[str] = []
    i = 0
    while i < len(xs):
        j = i + 1
        if j < len(xs):
            step = xs[j] - xs[i]
            while j + 1 < len(xs) and xs[j + 1] - xs[j] == step:
                j += 1
        if j - i >= 2:  # three or more evenly spaced: one range
            parts.append(f"{xs[i]}-{xs[j]}" + (f":{step}" if step > 1 else ""))
            i = j + 1
        else:
            parts.append(str(xs[i]))
            i += 1
    return ",".join(parts)


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
        # 0 (22.05) or {"set": false} (later) for a job that is not an array task.
        array_job_id=_number(obj.get("array_job_id")) or None,
        array_task_id=_task_index(obj.get("array_task_id")),
        array_tasks=str(obj.get("array_task_string") or ""),
    )


def _task_index(value: Any) -> int | None:
    number = _number(value)
    return number if number is not None and 0 <= number <= MAX_TASK_INDEX else None


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
    return Snapshot({j.job_id: j for j in parsed}, None, array_tasks(parsed))


def array_tasks(records: Iterable[SlurmJob]) -> dict[tuple[int, int], SlurmJob]:
    """Every array task by (array id, index); a collapsed pending record counts for each
    index of its task list (a task of its own, once split off, wins)."""
    out: dict[tuple[int, int], SlurmJob] = {}
    collapsed: list[SlurmJob] = []
    for r in records:
        if r.array_job_id is None:
            continue
        if r.array_task_id is not None:
            out[(r.array_job_id, r.array_task_id)] = r
        elif r.array_tasks:
            collapsed.append(r)
    for r in collapsed:
        assert r.array_job_id is not None
        for i in expand_tasks(r.array_tasks):
            out.setdefault((r.array_job_id, i), replace(r, array_task_id=i))
    return out


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


SACCT_FIELDS = "JobIDRaw,State,ExitCode,Start,End,User,Reason,JobID"


def parse_sacct(text: str) -> dict[int, SlurmJob]:
    """`sacct -X -n -P -o SACCT_FIELDS` lines -> jobs by their own id (job steps left
    out); an array task's JobID "123_4" gives its array id and index.

    The State column may read "CANCELLED by 1001"; only the first word counts.
    """
    out: dict[int, SlurmJob] = {}
    for line in text.splitlines():
        fields = line.split("|")
        if len(fields) < 5 or not fields[0].isdigit():
            continue  # a header, a step (123.batch)
        job_id = int(fields[0])
        array, _, task = (fields[7] if len(fields) > 7 else "").partition("_")
        is_task = array.isdigit() and task.isdigit()  # not "123_[4-6]": those never ran
        out[job_id] = SlurmJob(
            job_id=job_id,
            state=fields[1].split(" ", 1)[0],
            exit_status=_sacct_exit(fields[2]),
            start_time=_sacct_time(fields[3]),
            end_time=_sacct_time(fields[4]),
            user=fields[5].split("(", 1)[0] if len(fields) > 5 else "",  # "alice(1001)"
            reason=fields[6] if len(fields) > 6 else "",
            array_job_id=int(array) if is_task else None,
            array_task_id=_task_index(int(task)) if is_task else None,
        )
    return out


_JOBCOMP_FIELD = re.compile(r"(?:^| )([A-Za-z]+)=")


def parse_jobcomp(text: str) -> list[SlurmJob]:
    """Lines of jobcomp/filetxt's file ("JobId=2 UserId=alice(1001) ... ArrayJobId=1
    ArrayTaskId=0 ... ExitCode=0:0") -> records, array ids included: `sacct -c`
    (22.05) drops them. A value may hold spaces (WorkDir): it runs to the next Key=."""
    out: list[SlurmJob] = []
    for line in text.splitlines():
        keys = list(_JOBCOMP_FIELD.finditer(line))
        fields = {
            m.group(1): line[m.end(): keys[n + 1].start() if n + 1 < len(keys) else None].strip()
            for n, m in enumerate(keys)
        }
        job_id = fields.get("JobId", "")
        if not (job_id.isdigit() and job_id.isascii()):
            continue
        array, task = fields.get("ArrayJobId", ""), fields.get("ArrayTaskId", "")
        is_task = array.isdigit() and array.isascii() and task.isdigit() and task.isascii()
        out.append(SlurmJob(
            job_id=int(job_id),
            state=fields.get("JobState", "").split(" ", 1)[0],
            exit_status=_sacct_exit(fields.get("ExitCode", "")),
            start_time=_sacct_time(fields.get("StartTime", "")),
            end_time=_sacct_time(fields.get("EndTime", "")),
            user=fields.get("UserId", "").split("(", 1)[0],
            array_job_id=int(array) if is_task else None,
            array_task_id=_task_index(int(task)) if is_task else None,
        ))
    return out


def config_value(text: str, key: str) -> str | None:
    """One setting from `scontrol show config` ("JobCompLoc   = /var/log/x"), or None."""
    for line in text.splitlines():
        name, eq, value = line.partition("=")
        if eq and name.strip() == key:
            return value.strip()
    return None


def by_ref(records: Iterable[SlurmJob]) -> dict[tuple[int, int | None], SlurmJob]:
    """Records by the name tsd keeps: (job id, None), or (array id, index) for a task."""
    return {r.ref: r for r in records}


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
