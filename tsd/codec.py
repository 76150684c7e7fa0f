"""Records <-> plain dicts: the one encoding of `JobSpec`, `ExitInfo` and `Job`.

The wire (tsd.protocol), the state database (tsd.store) and the supervisor's
exit report (tsd.exitreport) all store these records as JSON objects; they all
go through the functions here, so a field added to a record is added once.
Decoding trusts its input's shape: data from a socket is validated by
tsd.protocol before it becomes a record. Light on purpose: `ts` loads it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from operator import attrgetter

from tsd.model import DependMode, ExitInfo, Job, JobSpec, JobState, UnmanagedUse

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from typing import Any


def spec_to_dict(spec: JobSpec, include_env: bool = True) -> dict[str, Any]:
    """A JobSpec as a JSON object (the environment left out unless asked for)."""
    return {
        "command": list(spec.command),
        "cwd": spec.cwd,
        "env": [list(kv) for kv in spec.env] if include_env else [],
        "umask": spec.umask,
        "label": spec.label,
        "slots": spec.slots,
        "gpus": spec.gpus,
        "gpu_indices": list(spec.gpu_indices) if spec.gpu_indices is not None else None,
        "depends": list(spec.depends),
        "depend_mode": spec.depend_mode.value,
        "store_output": spec.store_output,
        "gzip": spec.gzip,
        "stderr_apart": spec.stderr_apart,
        "output_name": spec.output_name,
        "mail": spec.mail,
        "timeout": spec.timeout,
        "env_info": spec.env_info,
        "forget": spec.forget,
        "begin": spec.begin,
        "priority": spec.priority,
        "retry": spec.retry,
        "array_job": spec.array_job,
        "array_task": spec.array_task,
        "array_throttle": spec.array_throttle,
        "gpu_mem": spec.gpu_mem,
    }


def spec_from_dict(o: Mapping[str, Any]) -> JobSpec:
    """A JobSpec from `spec_to_dict`'s output (trusted: our own database)."""
    gi = o.get("gpu_indices")
    return JobSpec(
        command=tuple(o["command"]),
        cwd=o["cwd"],
        env=tuple((str(k), str(v)) for k, v in o.get("env") or ()),
        umask=o["umask"],
        label=o.get("label"),
        slots=o["slots"],
        gpus=o["gpus"],
        gpu_indices=None if gi is None else tuple(gi),
        depends=tuple(o["depends"]),
        depend_mode=DependMode(o["depend_mode"]),
        store_output=o["store_output"],
        gzip=o["gzip"],
        stderr_apart=o["stderr_apart"],
        output_name=o.get("output_name"),
        mail=o["mail"],
        timeout=o.get("timeout"),
        env_info=o.get("env_info"),
        forget=bool(o.get("forget", False)),  # absent in rows older than -nf's rule
        # Absent in rows older than the job controls:
        begin=o.get("begin"),
        priority=int(o.get("priority") or 0),
        retry=int(o.get("retry") or 0),
        array_job=o.get("array_job"),
        array_task=o.get("array_task"),
        array_throttle=o.get("array_throttle"),
        gpu_mem=o.get("gpu_mem"),
    )


def exit_to_dict(ex: ExitInfo) -> dict[str, Any]:
    """An ExitInfo as a JSON object, keys in field order."""
    return {
        "code": ex.code,
        "signal": ex.signal,
        "timed_out": ex.timed_out,
        "lost": ex.lost,
        "cpu_seconds": ex.cpu_seconds,
        "max_rss": ex.max_rss,
        "note": ex.note,
    }


def exit_from_dict(o: Mapping[str, Any]) -> ExitInfo:
    """An ExitInfo from a JSON object; missing keys take their defaults."""
    return ExitInfo(
        code=o.get("code"),
        signal=o.get("signal"),
        timed_out=bool(o.get("timed_out")),
        lost=bool(o.get("lost")),
        cpu_seconds=o.get("cpu_seconds"),
        max_rss=o.get("max_rss"),
        note=str(o.get("note") or ""),
    )


# The fields a stored row may leave out, each with the value spec_from_dict and
# exit_from_dict read in its place: a spec or exit that holds that value (of that type)
# is stored without it. Most of a spec's options are unset, and a short row is what
# a job's start and end rewrite: more jobs to a page, fewer pages to each commit and
# fewer splits of a page as its rows grow (a finished job's row was about 700 bytes,
# half of them options at their default and nulls in its exit). Older tsd reads such
# a row alike (these keys are read with these values when absent, as for rows from
# before the options existed).
_SPEC_ABSENT: dict[str, Any] = {
    "env": [], "label": None, "gpu_indices": None, "output_name": None, "timeout": None,
    "env_info": None, "forget": False, "begin": None, "priority": 0, "retry": 0,
    "array_job": None, "array_task": None, "array_throttle": None, "gpu_mem": None,
}  # fmt: skip
_EXIT_ABSENT: dict[str, Any] = {
    "signal": None, "timed_out": False, "lost": False, "cpu_seconds": None, "max_rss": None,
    "note": "",
}  # fmt: skip


def _lean(obj: dict[str, Any], absent: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v for k, v in obj.items()
        if k not in absent or type(v) is not type(absent[k]) or v != absent[k]
    }  # fmt: skip


def spec_to_row(spec: JobSpec) -> str:
    """A spec as the store keeps it: spec_to_dict's JSON without its environment and
    without the options at the value an absent one reads as (`command` first, as
    tsd.jobrows expects)."""
    return json.dumps(_lean(spec_to_dict(spec, include_env=False), _SPEC_ABSENT))


def exit_to_row(ex: ExitInfo) -> str:
    """An ExitInfo as the store keeps it: exit_to_dict's JSON without the fields at the
    value an absent one reads as.

    Every job's end writes one: the usual end (an exit code, its CPU time and peak
    RSS, nothing else) is written without the dict, the filter and json.dumps, as the
    very text they make (tests/unit/test_records.py)."""
    code, cpu, rss = ex.code, ex.cpu_seconds, ex.max_rss
    if (
        type(code) is int and ex.signal is None and ex.timed_out is False
        and ex.lost is False and ex.note.__class__ is str and not ex.note
        and (cpu is None or (type(cpu) is float and cpu - cpu == 0.0))  # finite
        and (rss is None or type(rss) is int)
    ):  # fmt: skip
        text = '{"code": ' + int.__repr__(code)
        if cpu is not None:
            text += ', "cpu_seconds": ' + float.__repr__(cpu)
        if rss is not None:
            text += ', "max_rss": ' + int.__repr__(rss)
        return text + "}"
    return json.dumps(_lean(exit_to_dict(ex), _EXIT_ABSENT))


def job_to_dict(job: Job, include_env: bool = False) -> dict[str, Any]:
    """A job as the daemon reports it. The environment stays home unless asked for."""
    return {
        "id": job.id,
        "uid": job.uid,
        "user": job.user,
        "spec": spec_to_dict(job.spec, include_env=include_env),
        "state": job.state.value,
        "order": job.order,
        "enqueue": job.enqueue_time,
        "start": job.start_time,
        "end": job.end_time,
        "exit": None if job.exit is None else exit_to_dict(job.exit),
        "pid": job.pid,
        "gpu_ids": list(job.gpu_ids),
        "gpu_uuids": list(job.gpu_uuids),
        "output": job.output_path,
        "unit": job.unit,
        "wait_reason": job.wait_reason,
        "gpu_idle_since": job.gpu_idle_since,
        "notice": job.notice,
        "attempts": job.attempts,
        "slurm_id": job.slurm_id,
        "slurm_task": job.slurm_task,
        "gpu_mem_peak": job.gpu_mem_peak,
        "gpu_mem_now": job.gpu_mem_now,
        "gpu_util_now": job.gpu_util_now,
    }


def job_from_dict(obj: Mapping[str, Any], spec: JobSpec) -> Job:
    """A Job from `job_to_dict`'s output; `spec` is decoded (or validated) by the caller."""
    ex = obj.get("exit")
    return Job(
        id=int(obj["id"]),
        uid=int(obj["uid"]),
        user=str(obj["user"]),
        spec=spec,
        state=JobState(obj["state"]),
        order=int(obj["order"]),
        enqueue_time=float(obj["enqueue"]),
        start_time=obj.get("start"),
        end_time=obj.get("end"),
        exit=None if ex is None else exit_from_dict(ex),
        pid=obj.get("pid"),
        supervisor_pid=obj.get("supervisor_pid"),
        supervisor_start=obj.get("supervisor_start"),
        gpu_ids=tuple(obj.get("gpu_ids") or ()),
        gpu_uuids=tuple(obj.get("gpu_uuids") or ()),
        output_path=obj.get("output"),
        unit=obj.get("unit"),
        wait_reason=str(obj.get("wait_reason") or ""),
        gpu_idle_since=_float_or_none(obj.get("gpu_idle_since")),
        notice=str(obj.get("notice") or ""),
        attempts=int(obj.get("attempts") or 0),
        slurm_id=_optional_int(obj.get("slurm_id")),
        slurm_task=_optional_int(obj.get("slurm_task")),
        gpu_mem_peak=obj.get("gpu_mem_peak"),
        gpu_mem_now=obj.get("gpu_mem_now"),
        gpu_util_now=obj.get("gpu_util_now"),
    )


def unmanaged_to_dict(use: UnmanagedUse) -> dict[str, Any]:
    """A process outside tsd on the GPUs, as `ts -A -l` gets it."""
    return {
        "pid": use.pid,
        "uid": use.uid,
        "user": use.user,
        "gpus": list(use.gpus),
        "memory_mib": use.memory_mib,
    }


def unmanaged_from_dict(obj: Mapping[str, Any]) -> UnmanagedUse:
    """An UnmanagedUse from `unmanaged_to_dict`'s output."""
    return UnmanagedUse(
        pid=int(obj["pid"]),
        uid=None if obj.get("uid") is None else int(obj["uid"]),
        user=None if obj.get("user") is None else str(obj["user"]),
        gpus=tuple(int(i) for i in obj.get("gpus") or ()),
        memory_mib=int(obj.get("memory_mib") or 0),
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# A row of a listing (`ts -l` asks for rows): what the listing shows of a job, as one
# JSON array, named by these columns (tsd.jobview reads them by the names, which are
# the attributes' own; `exited` says whether there is an exit, `code` is its code).
# Smaller and far quicker to encode and decode than the records above: see `piece`.
LIST_COLUMNS = (
    "id", "uid", "user", "state", "order", "enqueue_time", "start_time", "end_time",
    "exited", "code", "gpu_ids", "output_path", "unit", "wait_reason", "gpu_idle_since",
    "attempts", "slurm_id", "slurm_task", "gpu_mem_peak", "gpu_mem_now", "gpu_util_now",
    "command_line", "cwd", "label", "slots", "gpus", "gpu_indices", "depends", "store_output",
    "begin", "priority", "retry", "array_job", "array_task", "array_throttle", "gpu_mem",
)  # fmt: skip
_FIRST_SPEC_COLUMN = LIST_COLUMNS.index("command_line")  # the JobSpec's, from here on
# Each column but those of the exit and the wait reason, read off a Job (in C).
_GETTERS = tuple(
    (name, attrgetter(name if i < _FIRST_SPEC_COLUMN else f"spec.{name}"))
    for i, name in enumerate(LIST_COLUMNS)
    if name not in ("exited", "code", "wait_reason")
)


def piece(jobs: Sequence[Job], reasons: Sequence[str]) -> dict[str, Any]:
    """Jobs as a piece of a listing, rows of LIST_COLUMNS (`reasons`: their wait reasons,
    which may be newer than the jobs'): `same` holds the columns whose value is the
    same for every job (once), `columns` names what is left in each of `rows`.

    A long queue is mostly alike (one user, one state, no GPUs, the same wait
    reason): its rows shrink to a few values, which is what makes the listing
    cheap to encode, send and decode. Built a column at a time, in C where it can
    be. `id` always stays a column (it counts rows).
    """
    if not jobs:
        return {"columns": list(LIST_COLUMNS), "same": {}, "rows": []}
    exits = [j.exit for j in jobs]
    values: dict[str, list[Any]] = {name: list(map(get, jobs)) for name, get in _GETTERS}
    values["exited"] = [e is not None for e in exits]
    values["code"] = [None if e is None else e.code for e in exits]
    values["wait_reason"] = list(reasons)
    same: dict[str, Any] = {}
    columns: list[str] = []
    kept: list[list[Any]] = []
    n = len(jobs)
    for name in LIST_COLUMNS:
        column = values[name]
        first = column[0]
        # Equal and of one type: 1, 1.0 and True are equal, yet print differently.
        if name != "id" and column.count(first) == n and len(set(map(type, column))) == 1:
            same[name] = first
        else:
            columns.append(name)
            kept.append(column)
    return {"columns": columns, "same": same, "rows": list(zip(*kept, strict=True))}
