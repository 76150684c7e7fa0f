"""Per-job eligibility and order within one user's queue: the job controls' rules.

Pure core (no I/O), used by the scheduler (which jobs may be considered at all,
array throttles), the dispatcher (why a job waits, when to wake up) and the job
table (where a `--priority` job goes in its owner's queue):

* a `held` job never starts; a job whose `--begin` time has not come never starts,
  and the daemon wakes up at the earliest such time (`Decision.wake_at`);
* an array with `%K` never has more than K elements running (or starting) at once;
* `--priority` places a job among its owner's queued jobs only: the owner's jobs
  trade the queue positions (order keys) the owner already holds, so no user
  passes another, exactly as `ts -u` keeps it.

Neither held nor not-yet-begun jobs hold up their owner's later jobs, just as a
job waiting for a dependency does not.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from tsd.model import ExitInfo, Job, JobSpec, JobState


def when_text(epoch: float) -> str:
    """A --begin time as the wait reason shows it (the daemon's local time)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def apart_reason(job: Job, now: float) -> str | None:
    """Why `job` may not start whatever the server has free: held, or not begun yet."""
    if job.state is JobState.HELD:
        return f"held: ts --release {job.id} queues it"
    begin = job.spec.begin
    if begin is not None and begin > now:
        return f"begins at {when_text(begin)}"
    return None


def begins_later(job: Job, now: float) -> float | None:
    """The --begin time a queued (not held) job waits for, None when it need not wait."""
    begin = job.spec.begin
    if job.state is JobState.HELD or begin is None or begin <= now:
        return None
    return begin


class ArrayCounts:
    """Running elements per throttled array (`--array ...%K`), during one decision."""

    def __init__(self, running: Iterable[Job]) -> None:
        self.running: dict[int, int] = {}
        for job in running:
            self.started(job.spec)

    def started(self, spec: JobSpec) -> None:
        """An element starts (or is running)."""
        if spec.array_throttle is not None and spec.array_job is not None:
            self.running[spec.array_job] = self.running.get(spec.array_job, 0) + 1

    def throttled(self, spec: JobSpec) -> str | None:
        """Why this element may not start now (its array has K running), or None."""
        limit = spec.array_throttle
        if limit is None or spec.array_job is None:
            return None
        now = self.running.get(spec.array_job, 0)
        if now < limit:
            return None
        return f"array {spec.array_job}: {now} of at most {limit} elements running (%{limit})"


def priority_keys(
    own: Sequence[tuple[int, int, int]], priority: int, count: int, next_key: int
) -> tuple[list[int], dict[int, int]]:
    """Where `count` new jobs of `priority` go in their owner's queue.

    `own`: the owner's queued jobs in queue order, as (job id, order key, priority).
    The new jobs would get the keys `next_key, next_key + 1, ...` (the end of the
    whole queue); they go right after the owner's last job of the same or a higher
    priority (first if there is none), so they pass only jobs of a lower priority
    and never one of their own or a higher one. The owner's keys, old and new, are handed
    out again in that order, so the set of positions the owner holds is unchanged.

    Returns the new jobs' keys and the changed keys of the owner's older jobs.
    """
    keys = [k for _, k, _ in own] + list(range(next_key, next_key + count))
    # After the last job of the same or a higher priority (a job -u moved keeps its place).
    at = max((i + 1 for i, (_, _, p) in enumerate(own) if p >= priority), default=0)
    new_keys = keys[at : at + count]
    moved: dict[int, int] = {}
    for i, (job_id, old, _) in enumerate(own[at:]):
        key = keys[at + count + i]
        if key != old:
            moved[job_id] = key
    return new_keys, moved


def should_retry(job: Job, exit: ExitInfo, killed: bool) -> bool:
    """--retry: whether this end of a running job queues it again under its id.

    Only an exit with a non-zero code of its own: not a job ended by ts -k/-T
    (`killed`), not one past its --timeout, not one lost or killed by a signal;
    and only while attempts are left (`attempts` counts the runs so far).
    """
    failed = exit.code not in (None, 0) and not exit.timed_out and not exit.lost
    return failed and not killed and job.attempts <= job.spec.retry


def may_go_ahead(job: Job, now: float) -> bool:
    """A queued job that may be sent ahead to a supervisor whose short job runs
    (tsd.ahead): one slot and no GPU, no dependency, no hold nor --begin to come, not
    an element of a throttled --array."""
    spec = job.spec
    return (
        spec.gpus_wanted == 0 and not spec.depends and spec.slots <= 1
        and spec.array_throttle is None and apart_reason(job, now) is None
    )
