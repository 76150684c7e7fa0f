"""Records and states shared by every part of tsd.

Everything here is a frozen dataclass or an enum: the core passes these values
around and the adapters (store, server, launcher) turn them into rows, frames
and processes. Nothing in this module does I/O. The records the daemon keeps one
of per job (`Job`, `JobSpec`, `ExitInfo`) have slots: 100,000 queued jobs are
100,000 of each in memory, and slots take about a third less than a __dict__.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
from dataclasses import dataclass, field
from itertools import chain

from tsd.twin import record_copier

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class JobState(enum.StrEnum):
    """A job's life: queued -> (allocating) -> running -> finished, or skipped.

    `held` (--hold, ts --hold ID) is a queued job that never starts until
    ts --release ID puts it back to `queued`; it keeps its place in the queue.
    """

    HELD = "held"
    QUEUED = "queued"
    ALLOCATING = "allocating"  # dependencies met, waiting for GPUs
    RUNNING = "running"
    FINISHED = "finished"
    SKIPPED = "skipped"  # a -W dependency failed; never ran

    @property
    def pending(self) -> bool:
        """True while the job has not started yet (held ones too: they keep their place)."""
        return self in (JobState.QUEUED, JobState.ALLOCATING, JobState.HELD)

    @property
    def done(self) -> bool:
        """True once the job can never run again."""
        return self in (JobState.FINISHED, JobState.SKIPPED)


class DependMode(enum.StrEnum):
    """How a job's dependencies gate it (task-spooler's -d/-D versus -W)."""

    AFTER = "after"  # -d / -D: run once they end, whatever their exit
    SUCCESS = "success"  # -W: run only if all exited 0, else skip


# The cwd of a record that was redacted for a caller who may not see it (an
# absolute path never is empty, so it cannot be mistaken for a real one).
HIDDEN = ""


@dataclass(frozen=True, slots=True)
class SpecOptions:
    """The options of a JobSpec that most jobs leave at their defaults, kept apart.

    A JobSpec holds one of these; every spec with nothing set here shares `PLAIN`,
    and the specs read back from one store text share theirs (tsd.jobrows): eight
    bytes per job where these seventeen fields took 136 (100,000 queued jobs are
    100,000 specs). Read them through the spec (`spec.gzip`), as its own fields.
    """

    gpu_indices: tuple[int, ...] | None = None  # -g: pinned, implies gpus=len(...)
    depend_mode: DependMode = DependMode.AFTER
    store_output: bool = True  # False for -n
    gzip: bool = False  # -z
    stderr_apart: bool = False  # -E
    output_name: str | None = None  # -O: file name inside the log dir
    mail: bool = False  # -m
    timeout: float | None = None  # --timeout SECONDS
    env_info: str | None = None  # TS_ENV's output, shown by -i
    # -nf, task-spooler's transparent mode: `ts` waits and passes the exit code on,
    # and the job is not kept once it ends (not listed, its id unknown).
    forget: bool = False
    # Job controls (tsd.jobcontrols parses them on the command line):
    begin: float | None = None  # --begin: epoch seconds; the job does not start before
    priority: int = 0  # --priority: its place among its owner's queued jobs (higher first)
    retry: int = 0  # --retry N: queued again after a non-zero exit, up to N more times
    array_job: int | None = None  # --array: id of the array's first element
    array_task: int | None = None  # --array: this element's index (TS_ARRAY_TASK_ID)
    array_throttle: int | None = None  # --array ...%K: at most K elements running at once
    # --gpu-mem: MiB the job needs on each of its GPUs; it may then share them with
    # other --gpu-mem jobs. None: it takes its GPUs whole.
    gpu_mem: int | None = None


PLAIN = SpecOptions()
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(SpecOptions))
_DEFAULTS = tuple(getattr(PLAIN, name) for name in OPTION_NAMES)


class _Unset(enum.Enum):
    """An option not given to JobSpec(): it comes from `options`, else its default."""

    UNSET = 0


_UNSET: Any = _Unset.UNSET


@dataclass(frozen=True, slots=True, init=False)
class JobSpec:
    """What a client asks to run. Validated by the protocol layer before it gets here.

    Built and read as one record of all its fields (`JobSpec(command=..., gzip=True)`,
    `spec.gzip`, `replace(spec, gzip=False)`); the rarely set ones live in `options`.
    """

    command: tuple[str, ...]
    cwd: str
    env: tuple[tuple[str, str], ...]
    umask: int
    label: str | None
    slots: int
    gpus: int
    depends: tuple[int, ...]
    options: SpecOptions

    def __init__(
        self,
        command: tuple[str, ...],
        cwd: str,
        env: tuple[tuple[str, str], ...],
        umask: int = 0o022,
        label: str | None = None,
        slots: int = 1,
        gpus: int = 0,
        depends: tuple[int, ...] = (),
        options: SpecOptions = PLAIN,
        *,
        gpu_indices: tuple[int, ...] | None = _UNSET,
        depend_mode: DependMode = _UNSET,
        store_output: bool = _UNSET,
        gzip: bool = _UNSET,
        stderr_apart: bool = _UNSET,
        output_name: str | None = _UNSET,
        mail: bool = _UNSET,
        timeout: float | None = _UNSET,
        env_info: str | None = _UNSET,
        forget: bool = _UNSET,
        begin: float | None = _UNSET,
        priority: int = _UNSET,
        retry: int = _UNSET,
        array_job: int | None = _UNSET,
        array_task: int | None = _UNSET,
        array_throttle: int | None = _UNSET,
        gpu_mem: int | None = _UNSET,
    ) -> None:
        values = (
            gpu_indices, depend_mode, store_output, gzip, stderr_apart, output_name, mail,
            timeout, env_info, forget, begin, priority, retry, array_job, array_task,
            array_throttle, gpu_mem,
        )  # fmt: skip
        if options is PLAIN and _UNSET not in values:
            # Every option given (the codecs, the protocol): one tuple comparison in C.
            options = PLAIN if values == _DEFAULTS else SpecOptions(*values)
        else:
            if values.count(_UNSET) != len(values):  # some given: they override `options`
                given: dict[str, Any] = {
                    n: v for n, v in zip(OPTION_NAMES, values, strict=True) if v is not _UNSET
                }
                options = dataclasses.replace(options, **given)
            if options is not PLAIN and options == PLAIN:
                options = PLAIN  # one object for every spec with no option set
        _set = object.__setattr__
        _set(self, "command", command)
        _set(self, "cwd", cwd)
        _set(self, "env", env)
        _set(self, "umask", umask)
        _set(self, "label", label)
        _set(self, "slots", slots)
        _set(self, "gpus", gpus)
        _set(self, "depends", depends)
        _set(self, "options", options)

    if TYPE_CHECKING:  # the options, read as the spec's own fields (set below the class)

        @property
        def gpu_indices(self) -> tuple[int, ...] | None: ...
        @property
        def depend_mode(self) -> DependMode: ...
        @property
        def store_output(self) -> bool: ...
        @property
        def gzip(self) -> bool: ...
        @property
        def stderr_apart(self) -> bool: ...
        @property
        def output_name(self) -> str | None: ...
        @property
        def mail(self) -> bool: ...
        @property
        def timeout(self) -> float | None: ...
        @property
        def env_info(self) -> str | None: ...
        @property
        def forget(self) -> bool: ...
        @property
        def begin(self) -> float | None: ...
        @property
        def priority(self) -> int: ...
        @property
        def retry(self) -> int: ...
        @property
        def array_job(self) -> int | None: ...
        @property
        def array_task(self) -> int | None: ...
        @property
        def array_throttle(self) -> int | None: ...
        @property
        def gpu_mem(self) -> int | None: ...

    @property
    def gpus_wanted(self) -> int:
        """How many GPUs this job occupies while it runs."""
        return len(self.gpu_indices) if self.gpu_indices is not None else self.gpus

    @property
    def command_line(self) -> str:
        """The command as one line, as task-spooler shows and runs it (through sh -c)."""
        return " ".join(self.command)

    @property
    def stored_bytes(self) -> int:
        """UTF-8 bytes of the text a user gave this job, which the store keeps.

        What the per-user caps (`max_job_bytes`, `max_stored_bytes`) count.
        """
        # One string: ASCII text (most) is as many bytes as characters, and the daemon
        # counts every job this way at start (joined in C: no per-item Python loop).
        text = "".join(
            (*self.command, self.cwd, self.label or "", self.env_info or "",
             self.output_name or "")
        )  # fmt: skip
        if self.env:
            text += "".join(chain.from_iterable(self.env))
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# Each option read through the spec, in C (an attrgetter, not a Python function).
for _name in OPTION_NAMES:
    setattr(JobSpec, _name, property(operator.attrgetter(f"options.{_name}")))


@dataclass(frozen=True, slots=True)
class ExitInfo:
    """How a finished job ended. Exactly one of code/signal is set unless it was lost."""

    code: int | None = None
    signal: int | None = None
    timed_out: bool = False
    lost: bool = False  # the job's supervisor vanished without a word (host reboot, kill -9)
    cpu_seconds: float | None = None
    max_rss: int | None = None  # bytes
    note: str = ""

    @property
    def success(self) -> bool:
        """True when the job exited 0 by itself."""
        return self.code == 0 and not self.timed_out and not self.lost

    @property
    def elevel(self) -> int:
        """task-spooler's E-Level: the exit code, or -1 when killed by a signal or lost."""
        return self.code if self.code is not None else -1

    @property
    def wait_code(self) -> int:
        """What ts -w/-c/-t/-f exit with: the job's code, 255 when killed or lost."""
        return self.code if self.code is not None and not self.timed_out else 255

    def summary(self) -> str:
        """How it ended, in words for a log line: `exit 0`, `killed by signal 9 (SIGKILL)`."""
        if self.lost:
            return f"lost: {self.note}" if self.note else "lost"
        if self.timed_out:
            return "timed out"
        if self.signal is not None:
            import signal as _signal  # a lookup table, not I/O

            try:
                name = f" ({_signal.Signals(self.signal).name})"
            except ValueError:
                name = ""
            return f"killed by signal {self.signal}{name}"
        return f"exit {self.code}"


@dataclass(frozen=True, slots=True)
class Job:
    """One job as the daemon knows it: the spec plus everything that happened to it."""

    id: int
    uid: int
    user: str
    spec: JobSpec
    state: JobState
    order: int  # queue position key within the queue; -u/-U change it
    enqueue_time: float
    start_time: float | None = None
    end_time: float | None = None
    exit: ExitInfo | None = None
    pid: int | None = None  # the job's command process
    supervisor_pid: int | None = None
    supervisor_start: int | None = None  # /proc starttime, guards against pid reuse
    gpu_ids: tuple[int, ...] = ()  # indices allocated when it started
    gpu_uuids: tuple[str, ...] = ()
    output_path: str | None = None
    unit: str | None = None  # systemd scope name on the system service
    wait_reason: str = ""  # why a pending job is not running, for -i
    # In memory only (tsd.idlewatch): since when its GPUs sit idle, once it is flagged
    # (gpu.idle_after), and what tsd did about it (requeued for idle GPUs).
    gpu_idle_since: float | None = None
    notice: str = ""
    attempts: int = 0  # times it was started (--retry starts it again under the same id)
    slurm_id: int | None = None  # the Slurm job it was forwarded to (cluster.engine: slurm)
    slurm_task: int | None = None  # an --array element: its task in Slurm job array slurm_id
    # GPU use as NVML's per-process memory shows it (tsd.gpuusage), MiB; the peak is
    # kept with the job, the current figures only while it runs.
    gpu_mem_peak: int | None = None
    gpu_mem_now: int | None = None
    gpu_util_now: int | None = None  # percent: the device utilisation of its GPUs

    @property
    def redacted(self) -> bool:
        """True for another user's job as a non-admin sees it (tsd.auth.visible_to):
        its working directory, output path and the like were left out."""
        return self.spec.cwd == HIDDEN


if TYPE_CHECKING:  # mypy checks each call's fields and types as dataclasses.replace's
    from dataclasses import replace as replace
else:
    _copy_job = record_copier(Job)

    def replace(obj, /, **changes):
        """`dataclasses.replace`; for a Job, a copy through its twin (tsd.twin) without
        its per-field Python loop and its __init__ (the daemon copies a job at every
        state change)."""
        if type(obj) is Job:
            return _copy_job(obj, changes)
        return dataclasses.replace(obj, **changes)


def run_usage(job: Job, until: float) -> tuple[float, float]:
    """Slot-seconds and GPU-seconds of a job's current (or just ended) run up to `until`."""
    if job.start_time is None:
        return 0.0, 0.0
    seconds = max(0.0, until - job.start_time)
    return seconds * job.spec.slots, seconds * len(job.gpu_ids)


@dataclass(frozen=True)
class UserLimits:
    """One user's quota on the system service. None means unlimited."""

    max_running_slots: int | None = None
    max_gpus: int | None = None
    max_queued: int | None = None
    max_job_bytes: int | None = None  # one job's stored text: command, env, label, TS_ENV
    max_stored_bytes: int | None = None  # all the user's stored jobs and --setenv values


@dataclass(frozen=True)
class JobLimits:
    """systemd resource properties set on every job scope. None leaves systemd's default."""

    memory_max: int | None = None  # bytes
    cpu_quota_percent: int | None = None  # 400 means four CPUs
    tasks_max: int | None = None


@dataclass(frozen=True)
class GpuProcess:
    """A process NVML reports on a GPU."""

    pid: int
    used_memory: int | None  # bytes; None when NVML does not know
    user: str | None = None  # owner, resolved by the adapter when it can


@dataclass(frozen=True)
class UnmanagedUse:
    """A process on a GPU that no tsd job started: GPU use that bypassed the queue."""

    pid: int
    uid: int | None  # None when the process is gone or hidden from the daemon
    user: str | None
    gpus: tuple[int, ...]  # indices it runs on
    memory_mib: int  # NVML's per-process memory, summed over its GPUs (0 unknown)


@dataclass(frozen=True)
class Gpu:
    """A GPU as seen by NVML at one moment."""

    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    memory_used: int  # bytes
    processes: tuple[GpuProcess, ...] = ()
    # Sensors; None where the board does not report them (NVML "not supported").
    utilization: int | None = None  # percent of the last sample period a kernel ran
    memory_utilization: int | None = None  # percent of it memory was read or written
    temperature: int | None = None  # degrees C
    power_mw: int | None = None  # milliwatts drawn now
    power_limit_mw: int | None = None  # milliwatts the board is held to

    @property
    def free_percent(self) -> float:
        """Free memory as a percentage of total (task-spooler's rule compares this)."""
        if self.memory_total <= 0:
            return 0.0
        return 100.0 * (self.memory_total - self.memory_used) / self.memory_total


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection, from SO_PEERCRED only."""

    pid: int
    uid: int
    gid: int
    user: str
    groups: tuple[int, ...] = field(default=())
    admin: bool = False
