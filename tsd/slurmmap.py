"""The Slurm engine's decisions, pure: a job's spec -> sbatch's arguments, and
Slurm's view of a job -> what tsd records (waiting, started, ended, skipped).

No I/O and no adapter: tsd.slurm runs the commands and applies these verdicts.
"""

from __future__ import annotations

import math
import shlex
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tsd.config import ClusterConfig
from tsd.model import DependMode, ExitInfo, Job, JobSpec, JobState
from tsd.slurmjson import SlurmJob, compress_tasks

# Slurm states in which the job has not started yet.
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})
# States in which it holds its allocation (running, or being set up or torn down).
ACTIVE_STATES = frozenset({
    "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
    "STAGE_OUT", "RESIZING",
})
# Anything else is an end: COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL,
# OUT_OF_MEMORY, PREEMPTED, BOOT_FAIL, DEADLINE, REVOKED, SPECIAL_EXIT.
NEVER_SATISFIED = "DependencyNeverSatisfied"
COMMENT_PREFIX = "tsd:"  # sbatch --comment: finds a job again after a crash mid-submit


class Unsupported(ValueError):
    """A ts option that has no meaning on a Slurm cluster; the message is one line."""


def check_spec(spec: JobSpec, terminal: bool) -> None:
    """Refuse, in one line, what the Slurm engine cannot do for this job."""
    if terminal or not spec.store_output:
        raise Unsupported("-n (output to this terminal) is not available with the Slurm engine: "
                          "the job runs on a cluster node")
    if spec.gzip:
        raise Unsupported("-z (gzip the output) is not available with the Slurm engine")
    if spec.gpu_indices is not None:
        raise Unsupported("-g (these GPU indices) is not available with the Slurm engine: "
                          "Slurm picks the GPUs; use -G N")


def slurm_time(seconds: float) -> str:
    """--timeout seconds -> sbatch --time (minutes:seconds; Slurm rounds up to minutes)."""
    total = max(1, math.ceil(seconds))
    return f"{total // 60}:{total % 60:02d}"


def escape_path(path: str) -> str:
    """A file name for --output/--error: Slurm expands %j and friends, %% is a plain %."""
    return path.replace("%", "%%")


def slurm_ref(slurm_id: int, task: int | None) -> str:
    """A Slurm job as Slurm's commands name it: "123", or "123_4" for an array's task."""
    return str(slurm_id) if task is None else f"{slurm_id}_{task}"


def dependency(mode: DependMode, slurm_ids: Sequence[int | str]) -> str | None:
    """-D/-d -> afterany, -W -> afterok, over the dependencies' Slurm ids ("123_4" for
    an array's task: Slurm waits for that task alone)."""
    if not slurm_ids:
        return None
    kind = "afterok" if mode is DependMode.SUCCESS else "afterany"
    return kind + "".join(f":{i}" for i in slurm_ids)


@dataclass(frozen=True)
class ArrayPart:
    """An --array submitted as one Slurm job array: which tsd job each index is."""

    elements: tuple[tuple[int, int], ...]  # (Slurm task index = TS_ARRAY_TASK_ID, tsd id)
    throttle: int | None = None  # %K: Slurm runs at most K tasks at once
    output_tail: str = ""  # each task writes to output + its index + output_tail

    def output_of(self, output: str, index: int) -> str:
        """The output file of the task with this index."""
        return f"{output}{index}{self.output_tail}"


@dataclass(frozen=True)
class Submission:
    """What the engine needs to submit one job (or one --array), decided by the daemon."""

    job_id: int  # the job's id; an array's: its first element's (TS_ARRAY_JOB_ID)
    spec: JobSpec
    output: str  # absolute path of the job's output file (an array's: up to the index)
    depend_on: tuple[int | str, ...] = ()  # Slurm ids of the dependencies still to wait for
    mail_to: str | None = None
    held: bool = False  # ts --hold: Slurm keeps it pending until ts --release
    array: ArrayPart | None = None


def sbatch_args(sub: Submission, cluster: ClusterConfig) -> list[str]:
    """sbatch's arguments for a job (the command is the script `wrap` writes)."""
    spec = sub.spec
    args = [
        "--parsable",
        f"--job-name={spec.label or f'tsd-{sub.job_id}'}",
        f"--comment={COMMENT_PREFIX}{sub.job_id}",
        f"--chdir={spec.cwd}",
        f"--output={output_pattern(sub)}",
    ]
    if spec.stderr_apart:
        args.append(f"--error={output_pattern(sub)}.e")
    if sub.array is not None:
        throttle = "" if sub.array.throttle is None else f"%{sub.array.throttle}"
        args.append(f"--array={compress_tasks(i for i, _ in sub.array.elements)}{throttle}")
    if spec.slots > 1:
        args.append(f"--cpus-per-task={spec.slots}")
    if spec.gpus:
        kind = f"gpu:{cluster.gpu_type}" if cluster.gpu_type else "gpu"
        args.append(f"--gres={kind}:{spec.gpus}")
    if spec.timeout is not None:
        args.append(f"--time={slurm_time(spec.timeout)}")
    if spec.begin is not None:
        # Slurm reads a time without a zone as the controller's local time; ts's
        # --begin is local time on this login node, the same clock on a cluster.
        args.append(f"--begin={time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(spec.begin))}")
    if sub.held:
        args.append("--hold")
    dep = dependency(spec.depend_mode, sub.depend_on)
    if dep:
        args.append(f"--dependency={dep}")
    if sub.mail_to:
        args += ["--mail-type=END,FAIL", f"--mail-user={sub.mail_to}"]
    for key in ("partition", "account", "qos"):
        value = getattr(cluster, key)
        if value:
            args.append(f"--{key}={value}")
    args += list(cluster.extra_args)
    args.append(f"--wrap={wrap(spec, sub.array)}")
    return args


def output_pattern(sub: Submission) -> str:
    """--output's value: the path with % escaped; an array's with Slurm's %a (the index)."""
    if sub.array is None:
        return escape_path(sub.output)
    return f"{escape_path(sub.output)}%a{escape_path(sub.array.output_tail)}"


def wrap(spec: JobSpec, array: ArrayPart | None = None) -> str:
    """The batch script's body: the submitter's umask, then the words exec'd as given
    (as tsd's local runner does: no shell in between for the command itself).

    An array's tasks share one script and one environment: the script sets each
    task's TS_ARRAY_TASK_ID (Slurm's index) and TS_JOBID (its tsd id) first.
    """
    prelude = "" if array is None else f"{task_ids(array.elements)}; "
    return f"umask {spec.umask:04o}; {prelude}exec {shlex.join(spec.command)}"


def id_runs(elements: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int, int]]:
    """(index, tsd id) pairs -> runs (first, last, step, first id, id step) in which
    both go up evenly, fewest first: an A-B[:S] array is one run."""
    pairs = sorted(elements)
    runs: list[tuple[int, int, int, int, int]] = []
    i = 0
    while i < len(pairs):
        j = i
        if i + 1 < len(pairs):
            step = pairs[i + 1][0] - pairs[i][0]
            id_step = pairs[i + 1][1] - pairs[i][1]
            j = i + 1
            while j + 1 < len(pairs) and (pairs[j + 1][0] - pairs[j][0],
                                          pairs[j + 1][1] - pairs[j][1]) == (step, id_step):
                j += 1
        if j == i:
            runs.append((pairs[i][0], pairs[i][0], 1, pairs[i][1], 0))
        else:
            runs.append((pairs[i][0], pairs[j][0], step, pairs[i][1], id_step))
        i = j + 1
    return runs


def task_ids(elements: Sequence[tuple[int, int]]) -> str:
    """POSIX sh that sets and exports TS_ARRAY_TASK_ID and TS_JOBID from SLURM_ARRAY_TASK_ID
    (no other variable: whatever the job's environment holds reaches the command as is)."""
    t = "TS_ARRAY_TASK_ID"
    parts = [f'{t}="$SLURM_ARRAY_TASK_ID"']
    for first, last, step, id0, id_step in id_runs(elements):
        test = f'[ "${t}" -eq {first} ]' if first == last else (
            f'[ "${t}" -ge {first} ] && [ "${t}" -le {last} ]'
            f" && [ $(( ({t} - {first}) % {step} )) -eq 0 ]"
        )
        value = str(id0) if first == last else (
            f"$(( {id0} + ({t} - {first}) / {step} * {id_step} ))"
        )
        parts.append(f"if {test}; then TS_JOBID={value}; fi")
    parts.append("export TS_ARRAY_TASK_ID TS_JOBID")
    return "; ".join(parts)


def job_env(
    captured: Sequence[tuple[str, str]], settings: Mapping[str, str], job_id: int, gpus: int,
    array_job: int | None = None,
) -> dict[str, str]:
    """sbatch's environment (exported to the job): the owner's, as captured at submit.

    SLURM_* variables of the submitting shell (ts run inside an allocation) would
    make sbatch think it runs inside that job, so they are left out. Slurm sets
    CUDA_VISIBLE_DEVICES for a GPU job; a CPU job sees none, as with tsd's local runner.
    """
    env = {k: v for k, v in captured if not k.startswith("SLURM_")}
    for key, value in settings.items():
        if key.startswith("env:"):
            env[key[4:]] = value
    env["TS_JOBID"] = str(job_id)  # an array's script sets each task's own (wrap)
    if array_job is not None:
        env["TS_ARRAY_JOB_ID"] = str(array_job)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    if gpus:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


# --------------------------------------------------------------- Slurm -> tsd


@dataclass(frozen=True)
class Waiting:
    """Still pending in Slurm, for this reason."""

    reason: str


@dataclass(frozen=True)
class Started:
    """Running in Slurm since `start`."""

    start: float
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class Ended:
    """Over in Slurm: FINISHED with `exit`, or SKIPPED (a -W dependency failed)."""

    state: JobState
    exit: ExitInfo
    start: float | None
    end: float | None


@dataclass(frozen=True)
class CancelSkipped:
    """Pending for good (a -W dependency failed, Slurm keeps it): cancel it, record skipped."""

    reason: str


Verdict = Waiting | Started | Ended | CancelSkipped


def exit_info(sj: SlurmJob) -> ExitInfo:
    """How an ended Slurm job ended, in tsd's terms (255 for killed, as ts's -w exit)."""
    status = sj.exit_status
    code = sig = None
    if status is not None:
        if status & 0x7F:
            sig = status & 0x7F
        else:
            code = (status >> 8) & 0xFF
    note = "" if sj.state in ("COMPLETED", "FAILED") else f"Slurm: {sj.state}"
    if sj.reason and sj.reason != "None" and sj.state != "COMPLETED":
        note = f"{note or 'Slurm: ' + sj.state} ({sj.reason})"
    if sj.state == "TIMEOUT":
        return ExitInfo(code=None, signal=sig or signal.SIGTERM, timed_out=True, note=note)
    if sj.state in ("CANCELLED", "PREEMPTED", "DEADLINE", "REVOKED"):
        # scancel ends the job with SIGTERM (then SIGKILL): killed, not an exit code.
        return ExitInfo(signal=sig or signal.SIGTERM, note=note)
    if sj.state == "OUT_OF_MEMORY":
        return ExitInfo(signal=sig or signal.SIGKILL, note=note)
    if sj.state == "COMPLETED":
        return ExitInfo(code=code or 0)
    if sig is None and not code:
        # Only a job that exited 0 by itself succeeded: a failed node, a boot failure
        # or a FAILED job without a status did not, whatever number Slurm kept.
        return ExitInfo(lost=True, note=note or f"Slurm: {sj.state}")
    return ExitInfo(code=code, signal=sig, note=note)


def verdict(job: Job, sj: SlurmJob) -> Verdict | None:
    """What Slurm's record of `job` means for tsd; None when nothing changed."""
    if sj.state in PENDING_STATES:
        if sj.reason == NEVER_SATISFIED and job.spec.depend_mode is DependMode.SUCCESS:
            return CancelSkipped("a dependency did not succeed")
        reason = f"Slurm: {sj.state.lower()} ({sj.reason})" if sj.reason else "Slurm: pending"
        if job.state.pending and job.wait_reason == reason:
            return None
        return Waiting(reason)
    if sj.state in ACTIVE_STATES:
        if job.state is JobState.RUNNING:
            return None
        return Started(sj.start_time or job.enqueue_time, sj.gpus)
    if sj.state == "CANCELLED" and sj.reason == NEVER_SATISFIED and job.state.pending:
        # Slurm's kill_invalid_depend cancelled it: a dependency failed; it never ran.
        return Ended(JobState.SKIPPED, ExitInfo(note="a dependency did not succeed"),
                     None, sj.end_time)
    return Ended(JobState.FINISHED, exit_info(sj), sj.start_time, sj.end_time)
