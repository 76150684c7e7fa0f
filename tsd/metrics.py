"""The Prometheus text exposition of the daemon's state (node_exporter's textfile format).

Pure: `render` takes a `MetricsState` (what the daemon knows at one moment)
and returns the text of a `.prom` file; tsd.metricswriter decides when to
write it and writes it atomically. The format is Prometheus' text format
0.0.4: a `# HELP` and a `# TYPE` line per metric family, then its samples,
label values escaped (backslash, double quote, newline).

Counters (`*_total`) are cumulative over the daemon's whole life: the ended
runs' totals come from the state database (they survive restarts and `ts -C`)
and the running jobs add their time so far, so a counter never goes down
while tsd runs, and only a job that ended after the last write can make it
jump.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import attrgetter

from tsd.model import Gpu, Job, JobState, run_usage


@dataclass(frozen=True)
class MetricsState:
    """What one exposition shows; gathered by the daemon on its event loop."""

    jobs: Sequence[Job]  # every job the daemon knows
    slots_total: int
    slots_used: int
    gpus: Sequence[Gpu] | None  # NVML's picture, None when unknown (no NVML, or not read)
    gpu_pool: int | None  # GPUs tsd may hand out, None when unknown
    gpus_allocated: int  # GPUs held by running jobs
    totals: Mapping[str, tuple[float, float]]  # user -> (slot-s, GPU-s) of ended runs
    now: float
    # The counters' values in the last file written: a counter never shows less (a run's
    # recorded end may come a little before the `now` it was last shown with, and any
    # decrease would read as a counter reset to Prometheus).
    floors: Mapping[str, tuple[float, float]] = field(default_factory=dict)


def escape_label(value: str) -> str:
    """A label value as the text format writes it inside double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Family:
    """One metric family being written: its HELP/TYPE header and samples."""

    def __init__(self, name: str, kind: str, help_text: str) -> None:
        self.name = name
        self.lines = [f"# HELP {name} {_escape_help(help_text)}", f"# TYPE {name} {kind}"]

    def add(self, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            self.lines.append(f"{self.name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{self.name} {_number(value)}")


# Per-GPU gauges: (metric name, help, how to read it off a Gpu; None: omit the sample).
_GPU_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("tsd_gpu_utilization_percent", "Percent of the last sample period a kernel ran on the GPU.",
     "utilization"),
    ("tsd_gpu_memory_utilization_percent",
     "Percent of the last sample period the GPU's memory was read or written.",
     "memory_utilization"),
    ("tsd_gpu_memory_used_bytes", "GPU memory in use.", "memory_used"),
    ("tsd_gpu_memory_total_bytes", "GPU memory in all.", "memory_total"),
    ("tsd_gpu_temperature_celsius", "GPU temperature.", "temperature"),
    ("tsd_gpu_power_watts", "Power the GPU draws now.", "power_mw"),
    ("tsd_gpu_power_limit_watts", "Power the GPU is held to.", "power_limit_mw"),
)


def _gpu_families(gpus: Iterable[Gpu]) -> list[_Family]:
    out = []
    gpus = list(gpus)
    for name, help_text, attr in _GPU_GAUGES:
        family = _Family(name, "gauge", help_text)
        for gpu in gpus:
            value = getattr(gpu, attr)
            if value is None:
                continue
            if attr.startswith("power"):
                value = value / 1000.0
            family.add(value, gpu=str(gpu.index), uuid=gpu.uuid)
        out.append(family)
    return out


# Every job is counted at each write (100,000 queued ones too): by C-level maps, not a
# Python loop per job.
# (`_value_`: the state's plain string, which hashes in C; an Enum member's hash is Python.)
_state_user = attrgetter("state._value_", "user")
_state = attrgetter("state")


def _running(jobs: Sequence[Job]) -> Iterator[Job]:
    """The running jobs among `jobs`, picked out without a Python step per job."""
    return compress(jobs, map(JobState.RUNNING.__eq__, map(_state, jobs)))


def counters(state: MetricsState) -> dict[str, tuple[float, float]]:
    """Each user's (slot-seconds, GPU-seconds): ended runs, plus running jobs' time so far,
    never below `state.floors`; rounded to milliseconds."""
    usage = {user: list(pair) for user, pair in state.totals.items()}
    for job in _running(state.jobs):
        if job.state is JobState.RUNNING:
            slot_s, gpu_s = run_usage(job, state.now)
            mine = usage.setdefault(job.user, [0.0, 0.0])
            mine[0] += slot_s
            mine[1] += gpu_s
    for user, (slot_floor, gpu_floor) in state.floors.items():
        mine = usage.setdefault(user, [0.0, 0.0])
        mine[0], mine[1] = max(mine[0], slot_floor), max(mine[1], gpu_floor)
    return {user: (round(s, 3), round(g, 3)) for user, (s, g) in usage.items()}


def render(state: MetricsState) -> str:
    """The whole `.prom` file for this state."""
    families: list[_Family] = []

    jobs = _Family("tsd_jobs", "gauge", "Jobs tsd knows, by state and user.")
    counts = Counter(map(_state_user, state.jobs))
    for (job_state, user), n in sorted(counts.items()):
        jobs.add(n, state=job_state, user=user)
    families.append(jobs)

    idle = _Family("tsd_gpu_idle_jobs", "gauge",
                   "Running jobs flagged for holding idle GPUs (gpu.idle_after), by user.")
    idle_counts = Counter(j.user for j in _running(state.jobs) if j.gpu_idle_since is not None)
    for user, n in sorted(idle_counts.items()):
        idle.add(n, user=user)
    families.append(idle)

    slots = _Family("tsd_slots", "gauge", "Job slots of the server: total, and used by jobs.")
    slots.add(state.slots_total, kind="total")
    slots.add(state.slots_used, kind="used")
    families.append(slots)

    gpus = _Family("tsd_gpus", "gauge", "GPUs tsd may hand out (total), and held by jobs.")
    if state.gpu_pool is not None:
        gpus.add(state.gpu_pool, kind="total")
    gpus.add(state.gpus_allocated, kind="allocated")
    families.append(gpus)

    usage = counters(state)
    slot_total = _Family(
        "tsd_user_slot_seconds_total", "counter",
        "Slot-seconds of each user's jobs (a job's run time times its slots), ever.",
    )
    gpu_total = _Family(
        "tsd_user_gpu_seconds_total", "counter",
        "GPU-seconds of each user's jobs (a job's run time times its GPUs), ever.",
    )
    for user in sorted(usage):
        slot_total.add(usage[user][0], user=user)
        gpu_total.add(usage[user][1], user=user)
    families += [slot_total, gpu_total]

    if state.gpus is not None:
        families += _gpu_families(state.gpus)
    return "".join(line + "\n" for family in families for line in family.lines)
