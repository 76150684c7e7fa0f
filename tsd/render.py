"""What `ts` prints: job lists, job info and GPU status, as plain strings.

Pure functions only: they take job records (and the current time where a
running job's age matters) and return text. The layouts follow GPU Task
Spooler's so that scripts parsing `ts -l`, `ts -i` or `ts -M json|tab` keep
working; where task-spooler is broken (milliseconds that are not
milliseconds, tab rows with a varying number of columns, output names cut
to uselessness) the format here is the fixed one.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from collections.abc import Iterable, Mapping, Sequence
    from typing import Any

    from tsd.jobview import JobView, UnmanagedView
    from tsd.model import Job, UnmanagedUse

    # The daemon's records (tsd.model) or the client's views of them (tsd.jobview).
    AnyJob = Job | JobView
    AnyUnmanaged = UnmanagedUse | UnmanagedView

_PENDING = frozenset(("queued", "allocating", "held"))  # tsd.model.JobState.pending

# task-spooler's fixed minimum column widths (`%-4s %-10s %-20s %-8s %-6s`).
ID_WIDTH = 4
STATE_WIDTH = 10
OUTPUT_WIDTH = 20
ELEVEL_WIDTH = 8
TIME_WIDTH = 6
GPUS_WIDTH = 5  # GPU task-spooler's `%-5s` GPUs column
USER_WIDTH = 8
LABEL_WIDTH = 20  # task-spooler shortens labels to this in `ts -l`
MIN_COMMAND_WIDTH = 20

TAB_COLUMNS = (
    "ID",
    "State",
    "Output",
    "E-Level",
    "Time",
    "Unit",
    "GPUs",
    "Depends",
    "Label",
    "Command",
)


# ------------------------------------------------------------------ pieces


# C0 controls, DEL and C1 controls: a stored value must not move an admin's cursor,
# change the terminal's state or start a fake line (older records may hold them).
_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\x1b": "\\e"}
_ESCAPES = {
    c: _NAMED.get(chr(c)) or f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))
}


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` with control characters written as escapes (`\\n`, `\\x01`), for a terminal
    or a log line. `keep_newlines` leaves line breaks (TS_ENV's multi-line output)."""
    if text.isprintable():  # no control character in it: the common case, in C
        return text
    if keep_newlines:
        return "\n".join(line.translate(_ESCAPES) for line in text.split("\n"))
    return text.translate(_ESCAPES)


def time_rep(seconds: float) -> tuple[float, str]:
    """task-spooler's time_rep: seconds scaled to s, m, h or d."""
    value, unit = seconds, "s"
    if value > 60:
        value, unit = value / 60, "m"
        if value > 60:
            value, unit = value / 60, "h"
            if value > 24:
                value, unit = value / 24, "d"
    return value, unit


def format_duration(seconds: float) -> str:
    """A duration as `ts -l` shows it: `%5.2f` plus the unit, e.g. ` 0.01s`."""
    value, unit = time_rep(seconds)
    return f"{value:5.2f}{unit}"


def run_seconds(job: AnyJob, now: float | None) -> float | None:
    """How long the job ran (finished) or has been running (running, given `now`)."""
    if job.start_time is None:
        return None
    if job.end_time is not None:
        return max(0.0, job.end_time - job.start_time)
    if job.state == "running" and now is not None:
        return max(0.0, now - job.start_time)
    return None


def output_shown(job: AnyJob) -> str:
    """The Output column: the file, or task-spooler's placeholder for it."""
    if job.state == "skipped":
        return "(no output)"
    if not job.spec.store_output:
        return "stdout"
    if job.state in _PENDING:
        return "(file)"
    if job.redacted:
        return "(hidden)"
    return job.output_path or "(...)"


def elevel(job: AnyJob) -> int | None:
    """E-Level of a finished job (-1 when killed by a signal or lost); None otherwise."""
    if job.state != "finished" or job.exit is None:
        return None
    return job.exit.elevel


def depend_str(job: AnyJob) -> str:
    """task-spooler's dependency prefix, e.g. `[3,4]&& `; empty without dependencies."""
    if not job.spec.depends:
        return ""
    return "[" + ",".join(str(d) for d in job.spec.depends) + "]&& "


def gpus_shown(job: AnyJob) -> str:
    """The GPUs column of `ts -l`: the GPU ids once the job holds them (`0,1`), the
    number it wants until then (`2`), `-` for a job that wants none."""
    if job.gpu_ids:
        return ",".join(str(g) for g in job.gpu_ids)
    if job.spec.gpus_wanted:
        return str(job.spec.gpus_wanted)
    return "-"


def state_shown(job: AnyJob) -> str:
    """The State column of `ts -l`: the state, `running(idle)` while its GPUs sit idle."""
    if job.state == "running" and job.gpu_idle_since is not None:
        return "running(idle)"
    return str(job.state)


def shorten(text: str, width: int) -> str:
    """Cut `text` to `width` characters, ending in `...` when cut."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    return text[: width - 3] + "..."


def ordered(jobs: Iterable[AnyJob]) -> list[AnyJob]:
    """GPU task-spooler's listing order (the same as `JobTable.listing()`): running jobs,
    then queued ones, each in queue order, then ended jobs by end time."""

    def key(job: AnyJob) -> tuple[int, float, int, int]:
        if job.state == "running":
            return (0, 0.0, job.order, job.id)
        if job.state in _PENDING:
            return (1, 0.0, job.order, job.id)
        return (2, job.end_time or job.enqueue_time, 0, job.id)

    return sorted(jobs, key=key)


# ------------------------------------------------------------------- ts -l


def _mib(mib: float) -> str:
    """MiB as `ts` shows GPU memory: `512M`, `3.1G`."""
    return f"{mib / 1024:.1f}G" if mib >= 1024 else f"{mib:.0f}M"


def gpu_use_shown(job: AnyJob) -> str:
    """A running GPU job's current GPU memory and its GPUs' utilisation: `<3.1G 87%> `."""
    if job.state != "running" or job.gpu_mem_now is None:
        return ""
    if job.gpu_mem_now == 0 and job.gpu_util_now is None:
        return ""  # nothing measured: no process on its GPUs and no utilisation sensor
    util = "" if job.gpu_util_now is None else f" {job.gpu_util_now}%"
    return f"<{_mib(job.gpu_mem_now)}{util}> "


def _unmanaged_user(use: AnyUnmanaged) -> str:
    return use.user or ("?" if use.uid is None else str(use.uid))


def list_text(
    jobs: Sequence[AnyJob],
    slots: int,
    running: int,
    show_user: bool = False,
    now: float | None = None,
    width: int | None = None,
    unmanaged: Sequence[AnyUnmanaged] = (),
) -> str:
    """`ts -l`: GPU task-spooler's table. `width` (a terminal's) shortens long commands.

    Columns widen past task-spooler's minimums only when a value needs it, so
    they always line up; the header is exactly task-spooler's when they don't.
    A running GPU job's command is preceded by its current GPU memory and
    utilisation (`<3.1G 87%> `). `unmanaged` (ts -A): processes outside tsd on
    the GPUs, listed last as `-` entries in state `unmanaged`.
    """
    # One pass over the jobs for every cell but the command's, then the widths, then
    # the lines: a listing of 100,000 jobs renders in a fraction of a second.
    cells = []
    pending = _PENDING
    for job in ordered(jobs):
        spec, state = job.spec, job.state
        user = job.user if job.user.isprintable() else printable(job.user)
        st = "running(idle)" if state == "running" and job.gpu_idle_since is not None else (
            str(state))  # fmt: skip
        out = output_shown(job)
        out = out if out.isprintable() else printable(out)
        if job.gpu_ids:
            gpu = ",".join(str(g) for g in job.gpu_ids)
        else:
            gpu = str(spec.gpus_wanted) if spec.gpus_wanted else "-"
        secs = run_seconds(job, now) if job.start_time is not None else None
        why = job.wait_reason if state in pending else ""
        cells.append((job, str(job.id), user, st, out, gpu,
                      "" if secs is None else format_duration(secs),
                      why if why.isprintable() else printable(why)))  # fmt: skip
    outside_out = [f"pid {u.pid}" for u in unmanaged]
    outside_gpus = [",".join(str(g) for g in u.gpus) for u in unmanaged]
    outside_users = [printable(_unmanaged_user(u)) for u in unmanaged]
    id_w = max([ID_WIDTH, *(len(c[1]) for c in cells)])
    user_w = max([USER_WIDTH, *(len(c[2]) for c in cells), *map(len, outside_users)])
    state_w = max([STATE_WIDTH, *(len(c[3]) for c in cells)])
    out_w = max([OUTPUT_WIDTH, *(len(c[4]) for c in cells), *map(len, outside_out)])
    gpus_w = max([GPUS_WIDTH, *(len(c[5]) for c in cells), *map(len, outside_gpus)])
    time_w = max([TIME_WIDTH, *(len(c[6]) for c in cells)])

    def head(ident: str, user: str, state: str) -> str:
        users = f"{user:<{user_w}} " if show_user else ""
        return f"{ident:<{id_w}} {users}{state:<{state_w}} "

    header = head("ID", "User", "State") + (
        f"{'Output':<{out_w}} {'E-Level':<{ELEVEL_WIDTH}} {'Time':<{time_w}} {'GPUs':<{gpus_w}} "
    )
    lines = [header + f"Command [run={running}/{slots}]"]
    # A waiting job has no output, E-Level or time yet: why it waits takes their room.
    why_w = out_w + 1 + ELEVEL_WIDTH + 1 + time_w
    for job, ident, user, st, out, gpu, tim, why in cells:
        spec = job.spec
        if why:
            rest = f"{'(' + shorten(why, why_w - 2) + ')':<{why_w}} {gpu:<{gpus_w}} "
        else:
            lvl = elevel(job)
            rest = (
                f"{out:<{out_w}} {'' if lvl is None else str(lvl):<{ELEVEL_WIDTH}} "
                f"{tim.rjust(TIME_WIDTH):<{time_w}} {gpu:<{gpus_w}} "
            )
        prefix = head(ident, user, st) + rest
        label = spec.label
        if label:
            label = f"[{shorten(label if label.isprintable() else printable(label), LABEL_WIDTH)}]"
        label = (gpu_use_shown(job) if job.gpu_mem_now is not None else "") + (label or "")
        command = spec.command_line
        if not command.isprintable():
            command = printable(command)
        deps = depend_str(job) if spec.depends else ""
        if width is not None:
            room = width - len(prefix) - len(deps) - len(label)
            command = shorten(command, max(room, MIN_COMMAND_WIDTH))
        lines.append(prefix + deps + label + command)
    for use, out, user, gpu in zip(unmanaged, outside_out, outside_users, outside_gpus,
                                   strict=True):  # fmt: skip
        prefix = head("-", user, "unmanaged") + (
            f"{out:<{out_w}} {'':<{ELEVEL_WIDTH}} {''.rjust(TIME_WIDTH):<{time_w}} {gpu:<{gpus_w}} "
        )
        lines.append(prefix + f"<{_mib(use.memory_mib)}> (GPU use outside tsd)")
    return "\n".join(lines) + "\n"


def job_dict(job: AnyJob, now: float | None = None) -> dict[str, Any]:
    """One job as an object of `ts -M json`: task-spooler's keys plus tsd's."""
    secs = run_seconds(job, now)
    return {
        "ID": job.id,
        "State": str(job.state),
        "Output": output_shown(job),
        "E-Level": elevel(job),
        "Time_ms": None if secs is None else round(secs * 1000),
        "Command": job.spec.command_line,
        "GPUs": job.spec.gpus_wanted,
        "User": job.user,
        "Label": job.spec.label,
        "Cwd": None if job.redacted else job.spec.cwd,
        "Depends": list(job.spec.depends),
        "GPU_IDs": list(job.gpu_ids),
        "Slots": job.spec.slots,
        "Enqueue": job.enqueue_time,
        "Start": job.start_time,
        "End": job.end_time,
        "Unit": job.unit,
        "GPU_Idle_Since": job.gpu_idle_since,
        "Wait_Reason": job.wait_reason if job.state in _PENDING else None,
        "Held": job.state == "held",
        "Begin": job.spec.begin,
        "Priority": job.spec.priority,
        "Retry": job.spec.retry,
        "Attempts": job.attempts,
        "Array_Job": job.spec.array_job,
        "Array_Task": job.spec.array_task,
        "Array_Throttle": job.spec.array_throttle,
        "Slurm_ID": job.slurm_id,  # an --array element: the Slurm array's id ...
        "Slurm_Array_Task": job.slurm_task,  # ... and its task: Slurm job "<ID>_<task>"
        "GPU_Mem_Declared_MiB": job.spec.gpu_mem,  # declared per GPU (--gpu-mem); null: whole GPUs
        "GPU_Mem_Peak_MiB": job.gpu_mem_peak,
        "GPU_Mem_Now_MiB": job.gpu_mem_now,
        "GPU_Util": job.gpu_util_now,
    }


def unmanaged_dict(use: AnyUnmanaged) -> dict[str, Any]:
    """A process outside tsd on a GPU as an entry of `ts -A -M json` (`ID` null)."""
    return {
        "ID": None,
        "State": "unmanaged",
        "User": use.user,
        "UID": use.uid,
        "PID": use.pid,
        "GPUs": len(use.gpus),
        "GPU_IDs": list(use.gpus),
        "GPU_Mem_Now_MiB": use.memory_mib,
        "Command": None,
    }


def list_json(
    jobs: Sequence[AnyJob], now: float | None = None, unmanaged: Sequence[AnyUnmanaged] = ()
) -> str:
    """`ts -M json`: a JSON array of job objects, in listing order, then unmanaged GPU use."""
    import json  # only for -M json: its package compiles regular expressions at import

    rows = [job_dict(j, now) for j in ordered(jobs)] + [unmanaged_dict(u) for u in unmanaged]
    return json.dumps(rows, ensure_ascii=False) + "\n"


def _tab_field(text: str) -> str:
    # A tab or newline inside a command would shift every later column.
    return printable(text.replace("\\", "\\\\"))


def list_tab(jobs: Sequence[AnyJob], show_user: bool = False, now: float | None = None) -> str:
    """`ts -M tab`: task-spooler's tab-separated fields, the same columns on every row.

    Columns: ID, [User,] State, Output, E-Level, Time, Unit, GPUs, Depends,
    Label, Command. Empty fields stay as empty strings; tabs, newlines and
    backslashes inside values are escaped as `\\t`, `\\n`, `\\\\`.
    """
    lines = []
    for job in ordered(jobs):
        secs = run_seconds(job, now)
        value, unit = ("", "") if secs is None else (f"{time_rep(secs)[0]:.2f}", time_rep(secs)[1])
        lvl = elevel(job)
        fields = [str(job.id)]
        if show_user:
            fields.append(job.user)
        fields += [
            str(job.state),
            output_shown(job),
            "" if lvl is None else str(lvl),
            value,
            unit,
            str(job.spec.gpus_wanted),
            depend_str(job),
            f"[{job.spec.label}]" if job.spec.label else "",
            job.spec.command_line,
        ]
        lines.append("\t".join(_tab_field(f) for f in fields))
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------- ts -i


def _when(epoch: float) -> str:
    # tsd.eligibility.when_text, which needs the job model: a --begin time, local.
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _ctime(t: float) -> str:
    return time.ctime(t)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def exit_status(job: AnyJob) -> str | None:
    """task-spooler's `Exit status:` wording; None while the job has not ended."""
    if job.state == "skipped":
        return "skipped (a -W dependency failed)"
    ex = job.exit
    if ex is None:
        return None
    if ex.timed_out:
        how = f"killed by signal {ex.signal}" if ex.signal else "killed"
        return f"{how} (time limit reached)"
    if ex.lost:
        return "lost (the job ended without a recorded status)"
    if ex.signal is not None:
        return f"killed by signal {ex.signal}"
    return f"died with exit code {ex.code}"


def info_text(job: AnyJob, now: float) -> str:
    """`ts -i`: task-spooler's lines (Exit status, Command, Slots required, times)
    plus what tsd knows besides: user, GPUs, output files, CPU time, peak memory,
    why a pending job waits, and TS_ENV's output.
    """
    head = printable(job.spec.env_info.rstrip("\n"), True) + "\n" if job.spec.env_info else ""
    lines: list[str] = []
    status = exit_status(job)
    if status is not None:
        lines.append(f"Exit status: {status}")
    if job.exit is not None and job.exit.note:
        lines.append(f"Note: {job.exit.note}")
    elif job.notice:
        lines.append(f"Note: {job.notice}")
    lines.append(f"Command: {depend_str(job)}{job.spec.command_line}")
    if job.spec.label:
        lines.append(f"Label: {job.spec.label}")
    lines.append(f"State: {job.state!s}")
    if job.state in _PENDING and job.wait_reason:
        lines.append(f"Wait reason: {job.wait_reason}")
    lines += _controls_lines(job)
    lines.append(f"User: {job.user} (uid {job.uid})")
    lines.append(f"Working directory: {job.spec.cwd}")
    lines.append(f"Slots required: {job.spec.slots}")
    lines.append(f"GPUs required: {job.spec.gpus_wanted}")
    if job.spec.gpu_indices is not None:
        lines.append("GPUs requested: " + ",".join(str(g) for g in job.spec.gpu_indices))
    if job.gpu_ids:
        lines.append("GPU IDs: " + ",".join(str(g) for g in job.gpu_ids))
    if job.spec.timeout is not None:
        lines.append(f"Time limit: {job.spec.timeout:g}s")
    if not job.spec.store_output:
        lines.append("Output: not stored (-n)")
    elif job.output_path:
        lines.append(f"Output: {job.output_path}")
        if job.spec.stderr_apart:
            lines.append(f"Stderr: {job.output_path}.e")
    if job.pid is not None and job.state == "running":
        lines.append(f"PID: {job.pid}")
    if job.gpu_idle_since is not None and job.state == "running":
        lines.append(f"Idle since: {_ctime(job.gpu_idle_since)} (its GPUs are not in use)")
    if job.unit:
        lines.append(f"Unit: {job.unit}")
    if job.slurm_id is not None:
        task = "" if job.slurm_task is None else f"_{job.slurm_task}"
        lines.append(f"Slurm job: {job.slurm_id}{task}")
    lines.append(f"Enqueue time: {_ctime(job.enqueue_time)}")
    if job.start_time is not None:
        lines.append(f"Start time: {_ctime(job.start_time)}")
    if job.end_time is not None:
        lines.append(f"End time: {_ctime(job.end_time)}")
    secs = run_seconds(job, now)
    if secs is not None:
        value, unit = time_rep(secs)
        word = "Time run" if job.end_time is not None else "Time running"
        lines.append(f"{word}: {value:f}{unit}")
    if job.exit is not None and job.exit.cpu_seconds is not None:
        lines.append(f"CPU time: {job.exit.cpu_seconds:.2f}s")
    if job.exit is not None and job.exit.max_rss is not None:
        lines.append(f"Peak memory: {_bytes(job.exit.max_rss)}")
    lines += gpu_memory_lines(job)
    return head + "".join(printable(line) + "\n" for line in lines)


def _controls_lines(job: AnyJob) -> list[str]:
    """-i's lines for the job controls: begin, priority, retries, array."""
    spec = job.spec
    lines = []
    if spec.begin is not None:
        lines.append(f"Begin: {_when(spec.begin)}")
    if spec.priority:
        lines.append(f"Priority: {spec.priority}")
    if spec.retry:
        lines.append(f"Retries allowed: {spec.retry}")
    if job.attempts or spec.retry:  # runs so far (rows older than --retry say 0)
        lines.append(f"Attempts: {job.attempts}")
    if spec.array_job is not None:
        most = f", at most {spec.array_throttle} running" if spec.array_throttle else ""
        lines.append(f"Array: job {spec.array_job}, index {spec.array_task}{most}")
    return lines


def gpu_memory_lines(job: AnyJob) -> list[str]:
    """`ts -i`'s GPU memory lines: declared, current use, and the peak (over the declaration?)."""
    lines = []
    mib = 1 << 20
    if job.spec.gpu_mem is not None:
        lines.append(f"GPU memory declared: {_bytes(job.spec.gpu_mem * mib)} per GPU (--gpu-mem)")
    if job.state == "running" and job.gpu_mem_now is not None:
        util = "" if job.gpu_util_now is None else f", its GPUs {job.gpu_util_now}% busy"
        lines.append(f"GPU memory now: {_bytes(job.gpu_mem_now * mib)}{util}")
    if job.gpu_mem_peak is not None:
        line = f"GPU memory peak: {_bytes(job.gpu_mem_peak * mib)}"
        if job.spec.gpu_mem is not None:
            declared = job.spec.gpu_mem * max(1, len(job.gpu_ids) or job.spec.gpus_wanted)
            if job.gpu_mem_peak > declared:
                line += f" (exceeded the {_bytes(declared * mib)} declared)"
        lines.append(line)
    return lines


# ------------------------------------------------------------------- ts -g


def _gpu_ids_text(job: AnyJob) -> str:
    return " ".join(str(g) for g in job.gpu_ids)


def holder_text(holder: Mapping[str, Any]) -> str:
    """One holder of a GPU: `job 3 (alice)` or `pid 4242 (bob)`."""
    user = printable(str(holder.get("user") or "?"))
    if holder.get("job") is not None:
        return f"job {holder['job']} ({user})"
    return f"pid {holder.get('pid')} ({user})"


def _sensor(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def gpu_status_text(resp: Mapping[str, Any], jobs: Sequence[AnyJob] = ()) -> str:
    """`ts -g`: task-spooler's `ID   GPU-IDs` list of running GPU jobs, then the GPUs.

    One line per GPU: index, name, memory used/total, free memory, utilisation,
    temperature, power, who holds it (tsd jobs, processes outside tsd), and
    whether tsd would hand it to a job now. `resp` is the daemon's GpuStatus
    answer; `jobs` its `jobs` already rebuilt as Job records.
    """
    lines = [f"{'ID':<{ID_WIDTH}} GPU-IDs"]
    for job in ordered(jobs):
        lines.append(f"{job.id:<{ID_WIDTH}} {_gpu_ids_text(job)}")
    gpus = resp.get("gpus") or []
    if gpus:
        lines.append("")
        name_w = max([20, *(len(str(g.get("name", ""))) for g in gpus)])
        held = [", ".join(holder_text(h) for h in g.get("holders") or []) or "-" for g in gpus]
        held_w = max([7, *(len(h) for h in held)])
        lines.append(
            f"{'GPU':<4} {'Name':<{name_w}} {'Memory used/total':<21} {'Free':>6} {'Util':>4} "
            f"{'Temp':>4} {'Power':>9}  {'Held by':<{held_w}}  Status"
        )
        for gpu, holders in zip(gpus, held, strict=True):
            total = float(gpu.get("memory_total") or 0)
            used = float(gpu.get("memory_used") or 0)
            mem = f"{used / 2**30:.1f}/{total / 2**30:.1f} GiB"
            free = gpu.get("free_percent")
            free_s = "" if free is None else f"{float(free):.1f}%"
            util = _sensor(gpu.get("utilization"), "{}%")
            temp = _sensor(gpu.get("temperature"), "{}C")
            power_mw, limit_mw = gpu.get("power_mw"), gpu.get("power_limit_mw")
            power = _sensor(None if power_mw is None else round(power_mw / 1000), "{}W")
            if power_mw is not None and limit_mw is not None:
                power = f"{round(power_mw / 1000)}/{round(limit_mw / 1000)}W"
            busy = gpu.get("busy")
            status = "free" if not busy else f"busy: {busy}"
            lines.append(
                f"{gpu.get('index', '?')!s:<4} {gpu.get('name', '')!s:<{name_w}} "
                f"{mem:<21} {free_s:>6} {util:>4} {temp:>4} {power:>9}  "
                f"{holders:<{held_w}}  {status}"
            )
            for proc in gpu.get("processes") or []:
                used_mem = proc.get("used_memory")
                mem_s = "" if used_mem is None else " " + _bytes(float(used_mem))
                user = proc.get("user") or "?"
                lines.append(f"     pid {proc.get('pid')} ({user}){mem_s}")
    problem = resp.get("problem")
    if problem:
        lines.append("")
        lines.append(f"GPU status: {problem}")
    return "\n".join(lines) + "\n"


def gpu_status_json(resp: Mapping[str, Any]) -> str:
    """`ts -g -M json`: one object per GPU, with its sensors, holders and processes."""
    out = []
    for gpu in resp.get("gpus") or []:
        power_mw, limit_mw = gpu.get("power_mw"), gpu.get("power_limit_mw")
        out.append({
            "Index": gpu.get("index"),
            "Name": gpu.get("name"),
            "UUID": gpu.get("uuid"),
            "Memory_Used_MiB": int(gpu.get("memory_used") or 0) >> 20,
            "Memory_Total_MiB": int(gpu.get("memory_total") or 0) >> 20,
            "Utilization": gpu.get("utilization"),
            "Memory_Utilization": gpu.get("memory_utilization"),
            "Temperature_C": gpu.get("temperature"),
            "Power_W": None if power_mw is None else power_mw / 1000,
            "Power_Limit_W": None if limit_mw is None else limit_mw / 1000,
            "Free": not gpu.get("busy"),
            "Busy": gpu.get("busy"),
            "Holders": [
                {"Job": h.get("job"), "PID": h.get("pid"), "User": h.get("user")}
                for h in gpu.get("holders") or []
            ],
            "Processes": [
                {
                    "PID": p.get("pid"),
                    "User": p.get("user"),
                    "Memory_MiB": None if p.get("used_memory") is None
                    else int(p["used_memory"]) >> 20,
                }
                for p in gpu.get("processes") or []
            ],
        })
    import json

    return json.dumps(out, ensure_ascii=False) + "\n"
