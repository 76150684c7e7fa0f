"""Reservations and backfill: when a waiting big job cannot be delayed by a smaller one.

The scheduler gives one waiting job a reservation: the job first in queue
order (the one that has waited longest) among the heads that are short of the
server's free slots or GPUs while within their user's quota. Jobs after it in
the queue may start only if they cannot delay it, as in Slurm's backfill:

* the reservation's *shadow time* is when enough slots and GPUs will be free
  for it, from the running jobs' expected ends (start + --timeout). A running
  job without --timeout has no known end, and if the reservation needs what
  such a job holds, the shadow time is unknown;
* a job whose --timeout ends by the shadow time may use anything free now:
  it is gone before the reserved job could start;
* any other job (no --timeout, or a longer one) may use only what the
  reserved job will not need at the shadow time (its *extra*): slots and GPUs
  beyond its needs. With an unknown shadow time that is what is free now
  beyond its needs. So a job without --timeout never takes what the
  reservation needs.

Which job holds the reservation (tsd.scheduler): the first in queue order among
the users' heads that are short of free slots or GPUs while within their
quota (`within_quota`). A big job (`sticky`: several slots or GPUs, or pinned
GPUs) keeps its reservation once what it waited for is free, and then starts
before the jobs after it, whatever fair share says; jobs before it in the
queue (they waited longer) are not held back.

Pure: plain values in, plain values out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from tsd.model import Job, JobSpec, UserLimits

__all__ = [
    "Holder",
    "Need",
    "Plan",
    "Reservation",
    "end_of",
    "holder",
    "need",
    "plan",
    "reserved_reason",
    "sticky",
    "within_quota",
]


@dataclass(frozen=True)
class Holder:
    """A job holding slots and GPUs now; `end` is when it will have ended, None if unknown."""

    slots: int
    gpus: tuple[int, ...]
    end: float | None


@dataclass(frozen=True)
class Need:
    """What a job takes: slots, a number of GPUs, or exactly these GPUs (`pinned`)."""

    slots: int
    gpus: int = 0
    pinned: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Plan:
    """The reservation's shadow time and what jobs that outlast it may still take."""

    shadow: float | None  # when the reserved job can start at the latest; None: unknown
    extra_slots: int  # slots a long-running job may take without delaying it
    extra_gpus: int  # GPUs (by count) a long-running job may take; for a pinned need
    protected: frozenset[int]  # GPU indices a long-running job must not take (pinned need)

    def allows(self, need: Need, end: float | None, free_gpus: Sequence[int]) -> bool:
        """Whether a job with this need, ending at `end` if started now, may start.

        `free_gpus` are the GPUs free now (sorted): where a GPU job would get
        its GPUs, avoiding `protected` ones when it can.
        """
        if end is not None and self.shadow is not None and end <= self.shadow:
            return True
        if need.slots > self.extra_slots:
            return False
        if need.pinned is not None:
            if set(need.pinned) & self.protected:
                return False
            return len(need.pinned) <= self.extra_gpus
        if need.gpus == 0:
            return True
        outside = [g for g in free_gpus if g not in self.protected]
        return need.gpus <= len(outside) and need.gpus <= self.extra_gpus


def _enough(slots: int, gpus: set[int], need: Need) -> bool:
    if slots < need.slots:
        return False
    if need.pinned is not None:
        return set(need.pinned) <= gpus
    return len(gpus) >= need.gpus


def plan(
    need: Need, free_slots: int, free_gpus: Iterable[int], holders: Iterable[Holder]
) -> Plan:
    """The reservation of a job with `need`, given what is free now and who holds the rest.

    Walks the holders in order of expected end, freeing what each holds, until
    the need is met: that time is the shadow time. What is then free beyond
    the need is the extra (with an unknown shadow time: what is free now).
    """
    slots = max(0, free_slots)
    gpus = set(free_gpus)
    shadow: float | None = None
    if not _enough(slots, gpus, need):
        timed = sorted((h for h in holders if h.end is not None), key=lambda h: h.end or 0.0)
        for i, holder in enumerate(timed):
            slots += holder.slots
            gpus.update(holder.gpus)
            last = i + 1 == len(timed) or (timed[i + 1].end or 0.0) > (holder.end or 0.0)
            if last and _enough(slots, gpus, need):
                shadow = holder.end
                break
        else:
            # Never enough with the known ends: count only what is free now.
            slots, gpus = max(0, free_slots), set(free_gpus)
    extra_slots = max(0, slots - need.slots)
    if need.pinned is not None:
        protected = frozenset(need.pinned)
        extra_gpus = len(gpus - protected)
    else:
        protected = frozenset()
        extra_gpus = max(0, len(gpus) - need.gpus)
    return Plan(shadow, extra_slots, extra_gpus, protected)


def _slots(spec: JobSpec) -> int:
    return max(1, spec.slots)  # as tsd.scheduler.job_slots


def need(spec: JobSpec) -> Need:
    """What a job takes while it runs."""
    return Need(_slots(spec), spec.gpus_wanted, spec.gpu_indices)


def sticky(spec: JobSpec) -> bool:
    """Whether a job needs several things to free up at once (so it could starve): it
    keeps its reservation once they are free, until it starts."""
    return _slots(spec) > 1 or spec.gpus_wanted > 1 or spec.gpu_indices is not None


def end_of(job: Job, now: float) -> float | None:
    """When a job started (or starting) now is over at the latest; None without --timeout."""
    timeout = job.spec.timeout
    if timeout is None:
        return None
    return (job.start_time if job.start_time is not None else now) + timeout


def holder(job: Job, now: float) -> Holder:
    """A running (or starting) job as what it holds and until when."""
    gpus = job.gpu_ids or tuple(job.spec.gpu_indices or ())
    return Holder(_slots(job.spec), gpus, end_of(job, now))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def reserved_reason(spec: JobSpec, free: int, total: int, gpus: Sequence[int]) -> str:
    """`reserved: waits for 4 slots (1 of 4 free)`: what the reserved job lacks now."""
    short: list[str] = []
    free = max(free, 0)
    if _slots(spec) > free:
        short.append(f"{_count(_slots(spec), 'slot')} ({free} of {total} free)")
    if spec.gpu_indices is not None:
        busy = [str(i) for i in spec.gpu_indices if i not in gpus]
        if busy:
            short.append(f"{'GPU' if len(busy) == 1 else 'GPUs'} {','.join(busy)} (in use)")
    elif spec.gpus_wanted and spec.gpus_wanted > len(gpus):
        short.append(f"{_count(spec.gpus_wanted, 'GPU')} ({len(gpus)} free)")
    return f"reserved: waits for {' and '.join(short) or 'room'}"


def within_quota(
    spec: JobSpec, limits: UserLimits, used: tuple[int, int], total_slots: int, gpus_known: bool
) -> bool:
    """Whether a user's quotas let the job run once the server has room for it.

    `used`: the slots and GPUs the user holds; `gpus_known`: GPU information is
    there and the user's GPU jobs are not held (else nothing GPU is reserved).
    """
    slots, wanted = _slots(spec), spec.gpus_wanted
    if slots > total_slots:
        return False
    if limits.max_running_slots is not None and used[0] + slots > limits.max_running_slots:
        return False
    if not wanted:
        return True
    return gpus_known and (limits.max_gpus is None or used[1] + wanted <= limits.max_gpus)


class HeadView(Protocol):
    """A user's state in a decision, as the reservation reads it (tsd.scheduler._User)."""

    @property
    def uid(self) -> int: ...
    @property
    def slots(self) -> int: ...
    @property
    def gpus(self) -> int: ...
    @property
    def limits(self) -> UserLimits: ...
    @property
    def gpu_head(self) -> Job | None: ...
    @property
    def blocker(self) -> Job | None: ...
    @property
    def cand(self) -> Job | None: ...
    @property
    def ready(self) -> Iterable[Job]: ...


U = TypeVar("U", bound=HeadView)


class ResourcesView(Protocol):
    """What the reservation reads of tsd.scheduler.Resources."""

    @property
    def total_slots(self) -> int: ...
    @property
    def now(self) -> float: ...
    @property
    def reserved_hint(self) -> int | None: ...
    @property
    def gpu_holds(self) -> Mapping[int, str]: ...


class DeciderView(Protocol[U]):
    """The decision in progress (tsd.scheduler._Decider), as the reservation uses it."""

    @property
    def gen(self) -> int: ...
    @property
    def free_slots(self) -> int: ...
    @property
    def free_gpus(self) -> list[int] | None: ...
    @property
    def users(self) -> Mapping[int, U]: ...
    @property
    def res(self) -> ResourcesView: ...

    def fits_now(self, user: U, spec: JobSpec) -> bool: ...

    def push(self, user: U) -> None: ...


class Reservation(Generic[U]):
    """The reservation during one decision of tsd.scheduler: which job holds it,
    which users' candidates it holds back, and what is held until when."""

    def __init__(self, d: DeciderView[U], running: Sequence[Job]) -> None:
        self.d = d
        self.holders = [holder(j, d.res.now) for j in running]  # + jobs started here
        # Users whose candidate fits but is held back (uid -> its job id), and the
        # reservation they were checked against.
        self.held: dict[int, int] = {}
        self.checked_against: int | None = None
        self.at: tuple[int, Job | None] = (-1, None)  # (decider generation, holder)

    def job(self) -> Job | None:
        """The job holding the reservation now: first in queue order among the heads short
        of the server's free slots or GPUs while within their user's quota (or the big
        job that held it in the previous decision)."""
        d = self.d
        if self.at[0] == d.gen:
            return self.at[1]
        best: Job | None = None
        hint = d.res.reserved_hint
        for user in d.users.values():
            for job in (user.gpu_head, user.blocker, user.cand):
                if (
                    job is not None
                    and (best is None or job.order < best.order)
                    and within_quota(
                        job.spec, user.limits, (user.slots, user.gpus), d.res.total_slots,
                        d.free_gpus is not None and user.uid not in d.res.gpu_holds,
                    )
                    and (
                        (job.id == hint and sticky(job.spec))
                        or not d.fits_now(user, job.spec)
                    )
                ):
                    best = job
        self.at = (d.gen, best)
        return best

    def refresh(self) -> Job | None:
        """The holder now; held candidates are checked again when it changed."""
        reserved = self.job()
        rid = None if reserved is None else reserved.id
        if rid != self.checked_against:
            self.checked_against = rid
            self.recheck()
        return reserved

    def allowed(self, job: Job, reserved: Job | None) -> bool:
        """Whether starting `job` now cannot delay the reservation (or it waited longer)."""
        if reserved is None or job.order <= reserved.order:
            return True  # it waited longer (or it is the reserved job)
        d = self.d
        shadow = plan(need(reserved.spec), d.free_slots, d.free_gpus or [], self.holders)
        return shadow.allows(need(job.spec), end_of(job, d.res.now), d.free_gpus or ())

    def explain_held(self, reserved_id: int, reasons: dict[int, str]) -> None:
        """Wait reasons of the held jobs (held for job `reserved_id`) and of their users'
        later jobs."""
        for uid, job_id in self.held.items():
            reasons[job_id] = f"behind reservation for job {reserved_id}"
            for later in self.d.users[uid].ready:
                reasons[later.id] = f"queued behind job {job_id}"

    def protected(self, job: Job) -> set[int]:
        """Pinned GPUs of a reservation `job` comes after: it takes others first."""
        reserved = self.job()
        if reserved is None or reserved.order >= job.order:
            return set()
        return set(reserved.spec.gpu_indices or ())

    def recheck(self) -> None:
        """Held candidates are checked again (after a start or a new reservation)."""
        for uid in self.held:
            self.d.push(self.d.users[uid])
        self.held.clear()

    def explain(self, reserved: Job, reasons: dict[int, str]) -> None:
        """Wait reasons of the held jobs, and of the reserved job while it holds some."""
        d = self.d
        self.explain_held(reserved.id, reasons)
        if self.held:  # else its own wait reason says enough
            gpus = d.free_gpus or ()
            reasons[reserved.id] = reserved_reason(
                reserved.spec, d.free_slots, d.res.total_slots, gpus
            )

