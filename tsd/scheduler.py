"""Pure scheduling decisions: which pending jobs start now, and with which GPUs.

The daemon calls `decide` after every submit, every job end and every GPU poll
that changed something, with the whole queue (up to 100,000 jobs) in global
order. Nothing here does I/O; everything the decision needs comes in as values
(`Resources`) or callbacks (`dep_outcome`, `Resources.limits`).

The rules, which are the product's semantics:

* Dependencies: -d/-D (`DependMode.AFTER`) wait until every dependency ended,
  however it ended; -W (`DependMode.SUCCESS`) also waits, but a failed or skipped
  dependency skips the job. A job whose dependencies are not ready does not hold
  up its user's later jobs.
* Within a user, queue order. The user's first ready job is their head. A head
  short of slots (server or the user's `max_running_slots`) holds back all of
  the user's later jobs. A head that has its slots but is short of GPUs goes to
  `allocating`; the user's later jobs that need no GPU may still start (a GPU
  shortage or a broken NVML never stalls CPU jobs), later GPU jobs stay behind it.
  The allocating head is still checked first: once the CPU jobs that passed it
  leave it too few slots, it holds its user back like any head short of slots.
* Between users, fair share: the least decayed usage / share (`fair_key`,
  tsd.usage) goes first; ties go to the fewest running slots (starts in this
  decision count), then to the earlier job.
* No starvation (tsd.backfill, where the rules are): the first job in queue
  order among the heads short of free slots or GPUs (within quota) holds a
  reservation that jobs after it in the queue may not delay; a head it holds
  back holds back its user's later jobs.
* GPUs: the lowest free indices, or exactly the pinned ones (`-g`); never one
  GPU to two jobs, except `--gpu-mem` jobs, which share a GPU while their
  declared sizes (plus the memory of processes outside tsd on it) fit in its
  total and NVML shows that much free; they go to the GPU already shared with
  the least room that fits, keeping idle GPUs whole for jobs that need them
  whole. A job without `--gpu-mem` never lands on a GPU another job holds.
* GPU use outside tsd (`Resources.outside_gpus`) counts against its user's
  `max_gpus`; `Resources.gpu_holds` holds a user's GPU jobs (gpu.unmanaged: hold).
* Job controls (tsd.eligibility): held jobs and jobs whose `--begin` has not
  come are passed over (they hold nobody up; `wake_at` says when to decide
  again); an `--array ...%K` element waits while K of its array run, holding
  nobody up either. `--priority` is already in the queue order.

Cost: a decision reads the queue lazily and stops as soon as no server slot is
left, so on a full server it costs in proportion to the jobs it starts, not to
the queue. While slots are free it reads on until no user it has not read a
startable job of could go first (`Resources.pending_users`: a user whose only
job is last in the queue may be the one that should start), or, without that
set, to the end of the queue.
"""

from __future__ import annotations

import enum
import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from tsd import backfill as bf
from tsd.eligibility import ArrayCounts, apart_reason, begins_later
from tsd.errors import NeverFits
from tsd.gpumem import GpuRoom, fitting, shared_room
from tsd.model import DependMode, Job, JobSpec, UserLimits

__all__ = [
    "Decision",
    "DepOutcome",
    "GpuRoom",
    "Resources",
    "Start",
    "check_fits",
    "decide",
    "dep_ready",
    "fits_problem",
    "job_slots",
]


class DepOutcome(enum.Enum):
    """What became of a job another job depends on."""

    PENDING = "pending"  # queued, allocating or running: not ended yet
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # ended with a non-zero code, a signal, a timeout or lost
    SKIPPED = "skipped"
    GONE = "gone"  # id not known any more (cleared): treated as ended well


@dataclass(frozen=True)
class Start:
    """Start job `job_id` now, with these GPU indices (empty for a CPU job)."""

    job_id: int
    gpu_ids: tuple[int, ...]


def _no_reasons() -> Mapping[int, str]:
    return MappingProxyType({})


def _no_counts() -> Mapping[int, int]:
    return MappingProxyType({})


@dataclass(frozen=True)
class Decision:
    """The outcome of one `decide` call.

    `start`: jobs to start, in the order they were picked. `skip`: jobs to mark
    skipped (a -W dependency failed); only jobs this call visited, the daemon
    cascades further. `allocating`: jobs whose dependencies and slots are fine
    but that wait for GPUs; the other visited pending jobs are (back to) queued.
    `reasons`: one short line per visited job that does not start, for `ts -i`.
    `unvisited_reason`: why the pending jobs this call did not read wait (the
    server is full); empty when it read them all.
    """

    start: tuple[Start, ...] = ()
    skip: tuple[int, ...] = ()
    allocating: tuple[int, ...] = ()
    reasons: Mapping[int, str] = field(default_factory=_no_reasons, hash=False)
    unvisited_reason: str = ""
    reserved: int | None = None  # the job holding the reservation, if any
    # When to decide again: the earliest --begin time a visited job waits for, or now
    # when jobs were held for a reservation that this decision's own starts dissolved.
    wake_at: float | None = None


@dataclass(frozen=True)
class Resources:
    """What the server has to give right now."""

    total_slots: int  # config `slots`; 0 drains the server
    limits: Callable[[int], UserLimits]  # a user's quota, by uid
    # Free GPU indices now, already without GPUs held by running tsd jobs and
    # without busy ones; None when GPU information is unavailable.
    free_gpus: tuple[int, ...] | None
    gpu_problem: str = ""  # why free_gpus is None, shown in reasons
    visible_gpus: tuple[int, ...] | None = None  # the pool, when known
    # The clock, for --begin and running jobs' expected ends (start + --timeout).
    now: float = field(default_factory=time.time)
    # --gpu-mem: the memory of each GPU of the pool (visible and present); None
    # while unknown, and then no --gpu-mem job starts.
    gpu_memory: Mapping[int, GpuRoom] | None = field(default=None, hash=False)
    # uid -> GPUs their processes outside tsd use now (they count against max_gpus).
    outside_gpus: Mapping[int, int] = field(default_factory=_no_counts, hash=False)
    # uid -> why that user's GPU jobs are held (gpu.unmanaged: hold).
    gpu_holds: Mapping[int, str] = field(default_factory=_no_reasons, hash=False)
    # Fair share: a user's decayed usage divided by their share (None: 0 for everyone),
    # and a lower bound of it over every user with a pending job.
    fair_key: Callable[[int], float] | None = None
    fair_floor: float = 0.0
    # The previous decision's `reserved`: a big job keeps its reservation (tsd.backfill).
    reserved_hint: int | None = None
    # The uids with a job in the queue, when the caller knows them: once each has been
    # read far enough, the decision starts jobs without reading the rest (see `run`).
    # None: the queue is read as far as free slots allow.
    pending_users: frozenset[int] | None = field(default=None, hash=False)


def job_slots(spec: JobSpec) -> int:
    """Slots a job occupies while it runs: `-N`, and never less than one."""
    return max(1, spec.slots)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _over_quota(n: int, noun: str, key: str, limit: int) -> str:
    return f"job needs {_count(n, noun)} but your quota ({key}) is {limit}"


def _ids(ids: Iterable[int]) -> str:
    return ",".join(str(i) for i in ids)


def _not_visible(pinned: Iterable[int], pool: Sequence[int]) -> str | None:
    for index in pinned:
        if index not in pool:
            return f"GPU {index} is not in the visible set ({_ids(pool)})"
    return None


def _mib(n: int) -> str:
    return f"{n / 1024:.1f} GiB" if n >= 1024 else f"{n} MiB"


def _gpu_mem_problem(
    spec: JobSpec, totals: Mapping[int, int], pool: Sequence[int] | None
) -> str | None:
    """Why no GPU of this server could ever hold the job's --gpu-mem (totals in MiB)."""
    need = spec.gpu_mem
    if need is None or not totals:
        return None
    if spec.gpu_indices is not None:
        for index in spec.gpu_indices:
            if index in totals and totals[index] < need:
                return f"job needs {_mib(need)} on GPU {index}, which has {_mib(totals[index])}"
        return None
    candidates = [t for i, t in totals.items() if pool is None or i in pool]
    big = sum(1 for t in candidates if t >= need)
    if big >= spec.gpus_wanted:
        return None
    largest = max(candidates, default=0)
    if big == 0:
        return f"job needs {_mib(need)} per GPU but the largest GPU has {_mib(largest)}"
    return f"job needs {_count(spec.gpus_wanted, 'GPU')} with {_mib(need)} but {big} have that"


def fits_problem(
    spec: JobSpec,
    limits: UserLimits,
    total_slots: int,
    pool_size: int | None,
    visible: tuple[int, ...] | None,
    gpu_totals: Mapping[int, int] | None = None,
) -> str | None:
    """Why `spec` can never start on this server under this quota, or None if it can.

    A draining server (`total_slots` 0) refuses nothing: jobs queue until it
    reopens. With `pool_size` None (GPU information unavailable) nothing is
    refused for the GPU pool, only for the user's GPU quota. `visible` is the
    configured GPU set; None means the indices 0 .. pool_size-1. `gpu_totals`
    (index -> MiB) refuses a --gpu-mem no GPU could hold.
    """
    slots = job_slots(spec)
    if 0 < total_slots < slots:
        return f"job needs {_count(slots, 'slot')} but the server has {total_slots}"
    max_slots = limits.max_running_slots
    if max_slots is not None and slots > max_slots:
        return _over_quota(slots, "slot", "max_running_slots", max_slots)
    wanted = spec.gpus_wanted
    if wanted == 0:
        return None
    if limits.max_gpus is not None and wanted > limits.max_gpus:
        return _over_quota(wanted, "GPU", "max_gpus", limits.max_gpus)
    if pool_size is None:
        return None
    if pool_size == 0:
        return f"job needs {_count(wanted, 'GPU')} but this server has no GPUs"
    if spec.gpu_indices is not None:
        pool = visible if visible is not None else tuple(range(pool_size))
        why = _not_visible(spec.gpu_indices, pool)
        if why is not None:
            return why
    elif wanted > pool_size:
        return f"job needs {_count(wanted, 'GPU')} but the server has {pool_size}"
    return _gpu_mem_problem(spec, gpu_totals or {}, visible)


def check_fits(
    spec: JobSpec,
    limits: UserLimits,
    total_slots: int,
    pool_size: int | None,
    visible: tuple[int, ...] | None,
    gpu_totals: Mapping[int, int] | None = None,
) -> None:
    """Refuse at submit time a job that can never start: raises NeverFits naming the limit."""
    problem = fits_problem(spec, limits, total_slots, pool_size, visible, gpu_totals)
    if problem is not None:
        raise NeverFits(problem)


def dep_ready(spec: JobSpec, dep_outcome: Callable[[int], DepOutcome]) -> tuple[bool | None, str]:
    """Whether the dependencies let the job run.

    (True, "") ready; (None, why) it waits; (False, why) it must be skipped.
    """
    waiting: list[int] = []
    for dep in spec.depends:
        outcome = dep_outcome(dep)
        if outcome is DepOutcome.PENDING:
            waiting.append(dep)
        elif spec.depend_mode is DependMode.SUCCESS and outcome is DepOutcome.FAILED:
            return False, f"dependency job {dep} failed"
        elif spec.depend_mode is DependMode.SUCCESS and outcome is DepOutcome.SKIPPED:
            return False, f"dependency job {dep} was skipped"
    if waiting:
        noun = "job" if len(waiting) == 1 else "jobs"
        return None, f"waiting for {noun} {', '.join(map(str, waiting))}"
    return True, ""


class _User:
    """One user's state during a decision."""

    __slots__ = (
        "blocker", "cand", "fair", "gpu_head", "gpus", "limits", "name", "ready", "slots", "uid",
    )

    def __init__(self, uid: int, limits: UserLimits, slots: int, gpus: int, fair: float) -> None:
        self.uid = uid
        self.fair = fair  # decayed usage / share: fixed for the decision
        self.name = str(uid)
        self.limits = limits
        self.slots = slots  # held by running jobs and jobs started in this decision
        self.gpus = gpus
        self.ready: deque[Job] = deque()  # read, dependencies met, not examined yet
        self.cand: Job | None = None  # the job this user would start next
        self.blocker: Job | None = None  # head short of slots: all later jobs wait
        self.gpu_head: Job | None = None  # first job short of GPUs: later GPU jobs wait


class _Decider:
    """The mutable state of one `decide` call.

    Resources only shrink during a decision (free slots and GPUs go down, a
    user's usage goes up, dependency outcomes are fixed), so a job found unable
    to start stays unable for the rest of the decision. That is what lets each
    job be examined once and the queue be read lazily. The one thing that can
    change is why: an allocating head (short of GPUs) may stop fitting in the
    slots later jobs took, and then it blocks its user (`head_blocks`), so the
    outcome is the same as deciding one start at a time.
    """

    def __init__(
        self,
        running: Sequence[Job],
        dep_outcome: Callable[[int], DepOutcome],
        res: Resources,
    ) -> None:
        self.res = res
        self.dep_outcome = dep_outcome
        self.running_ids: set[int] = set()
        self.seen: set[int] = set()
        self.used_slots = 0
        self.run_slots: dict[int, int] = {}
        self.run_gpus: dict[int, int] = {}
        held: set[int] = set()
        for job in running:
            self.running_ids.add(job.id)
            slots = job_slots(job.spec)
            gpus = len(job.gpu_ids) if job.gpu_ids else job.spec.gpus_wanted
            self.used_slots += slots
            self.run_slots[job.uid] = self.run_slots.get(job.uid, 0) + slots
            self.run_gpus[job.uid] = self.run_gpus.get(job.uid, 0) + gpus
            held.update(job.gpu_ids)
        for uid, gpus in res.outside_gpus.items():
            self.run_gpus[uid] = self.run_gpus.get(uid, 0) + gpus
        self.room = (
            {} if res.gpu_memory is None or res.free_gpus is None
            else shared_room(running, res.gpu_memory, res.visible_gpus)
        )
        # GPUs --gpu-mem jobs already share: the next one goes there first.
        self.shared: dict[int, int] = {}
        for job in running:
            if job.spec.gpu_mem is not None:
                for index in job.gpu_ids:
                    self.shared[index] = self.shared.get(index, 0) + job.spec.gpu_mem
        self.free_slots = res.total_slots - self.used_slots
        self.free_gpus: list[int] | None = None
        if res.free_gpus is not None:
            # Defensive: never hand out a GPU a running job holds or one outside the pool.
            pool = None if res.visible_gpus is None else set(res.visible_gpus)
            self.free_gpus = sorted(
                {g for g in res.free_gpus if g not in held and (pool is None or g in pool)}
            )
        self.users: dict[int, _User] = {}
        # (fair key, user slots, order, uid, job id)
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.fair_key = res.fair_key
        self.rsv = bf.Reservation(self, running)
        # Bumped whenever a user's head, candidate or the resources change: what was
        # computed at the same generation (the reservation, the best user) still holds.
        self.gen = 0
        self.job_users: dict[int, int] = {}  # started job -> its uid
        self.starts: list[Start] = []
        self.skips: list[int] = []
        self.allocating: dict[int, None] = {}  # ordered set
        self.reasons: dict[int, str] = {}
        self.arrays = ArrayCounts(running)
        self.wake_at: float | None = None

    # -- reading the queue

    def user(self, uid: int) -> _User:
        user = self.users.get(uid)
        if user is None:
            limits = self.res.limits(uid)
            fair = self.fair_key(uid) if self.fair_key is not None else 0.0
            user = _User(uid, limits, self.run_slots.get(uid, 0), self.run_gpus.get(uid, 0), fair)
            self.users[uid] = user
        return user

    def ingest(self, job: Job) -> None:
        """Take in the next pending job of the queue."""
        if job.id in self.running_ids or job.id in self.seen:
            return
        self.seen.add(job.id)
        if self.set_apart(job):
            return
        ready, why = dep_ready(job.spec, self.dep_outcome)
        if ready is None:
            self.reasons[job.id] = why
            return
        if ready is False:
            self.skips.append(job.id)
            self.reasons[job.id] = why
            return
        user = self.user(job.uid)
        user.name = job.user
        if user.blocker is not None:
            self.reasons[job.id] = f"queued behind job {user.blocker.id}"
            return
        user.ready.append(job)
        if user.cand is None:
            self.search(user)

    def set_apart(self, job: Job) -> bool:
        """Held, or its --begin has not come: it waits and holds nobody up."""
        why = apart_reason(job, self.res.now)
        if why is None:
            return False
        self.reasons[job.id] = why
        begin = begins_later(job, self.res.now)
        if begin is not None and (self.wake_at is None or begin < self.wake_at):
            self.wake_at = begin
        return True

    # -- one user's next candidate

    def search(self, user: _User) -> None:
        """Examine the user's ready jobs in order until one could start now, or none can."""
        while user.cand is None and user.blocker is None and user.ready:
            self.examine(user, user.ready.popleft())

    def examine(self, user: _User, job: Job) -> None:
        self.gen += 1
        spec = job.spec
        wanted = spec.gpus_wanted
        throttled = self.arrays.throttled(spec)
        if throttled is not None:
            self.reasons[job.id] = throttled  # its array's other elements run: nobody held up
            return
        never = self.never_fits(user, spec)
        if never is not None:
            # It was accepted when the server or the quota was bigger (or NVML was down):
            # it waits, with the reason, but holds nobody else back.
            self.reasons[job.id] = never
            return
        head = user.gpu_head
        if head is not None and (wanted or self.head_blocks(user)):
            self.reasons[job.id] = f"queued behind job {head.id}"
            return
        why = self.slot_problem(user, spec)
        if why is not None:
            self.block(user, job, why)
            return
        if wanted:
            why = self.gpu_problem(user, spec)
            if why is not None:
                user.gpu_head = job
                self.allocating[job.id] = None
                self.reasons[job.id] = why
                return
        user.cand = job
        self.push(user)

    def push(self, user: _User) -> None:
        job = user.cand
        assert job is not None
        heapq.heappush(self.heap, (user.fair, user.slots, job.order, user.uid, job.id))

    def never_fits(self, user: _User, spec: JobSpec) -> str | None:
        """Why the job could not start even on an idle server, as configured now."""
        pool = self.res.visible_gpus if self.res.free_gpus is not None else None
        memory = self.res.gpu_memory
        totals = None if memory is None else {i: r.total for i, r in memory.items()}
        return fits_problem(
            spec, user.limits, self.res.total_slots, None if pool is None else len(pool), pool,
            totals,
        )

    def block(self, user: _User, job: Job, why: str) -> None:
        """`job`, the user's head, is short of slots: it and all their later jobs wait."""
        self.gen += 1
        if user.blocker is not None:  # a later job blocked first; the head now does
            self.reasons[user.blocker.id] = f"queued behind job {job.id}"
        user.blocker = job
        self.reasons[job.id] = why
        self.allocating.pop(job.id, None)
        behind = f"queued behind job {job.id}"
        if user.cand is not None:
            self.reasons[user.cand.id] = behind
            user.cand = None  # its heap entry goes stale
        for later in user.ready:
            self.reasons[later.id] = behind
        user.ready.clear()

    def head_blocks(self, user: _User) -> bool:
        """Whether the user's allocating head stopped fitting in the slots; if so, block on it.

        The head waits for GPUs but is still the head: the user's CPU jobs may
        pass it only while it would itself fit in the free slots, exactly as if
        each start were decided on its own.
        """
        head = user.gpu_head
        if head is None or user.blocker is head:
            return False
        why = self.slot_problem(user, head.spec)
        if why is None:
            return False
        self.block(user, head, why)
        return True

    def slot_problem(self, user: _User, spec: JobSpec) -> str | None:
        slots = job_slots(spec)
        total = self.res.total_slots
        if slots > total:
            return f"job needs {_count(slots, 'slot')} but the server has {total}"
        if slots > self.free_slots:
            return (
                f"waiting for {_count(slots, 'free slot')}"
                f" ({max(self.free_slots, 0)} of {total} free)"
            )
        limit = user.limits.max_running_slots
        if limit is not None and user.slots + slots > limit:
            if slots > limit:
                return _over_quota(slots, "slot", "max_running_slots", limit)
            return f"user quota: {user.slots} of {limit} slots in use (max_running_slots)"
        return None

    def gpu_problem(self, user: _User, spec: JobSpec) -> str | None:
        wanted = spec.gpus_wanted
        free = self.free_gpus
        if free is None:
            problem = self.res.gpu_problem
            return "GPU information unavailable" + (f": {problem}" if problem else "")
        hold = self.res.gpu_holds.get(user.uid)
        if hold is not None:
            return hold
        limit = user.limits.max_gpus
        if limit is not None and user.gpus + wanted > limit:
            if wanted > limit:
                return _over_quota(wanted, "GPU", "max_gpus", limit)
            return f"user quota: {user.gpus} of {limit} GPUs in use (max_gpus)"
        visible = self.res.visible_gpus
        if spec.gpu_mem is not None:
            return _shared_problem(self, spec)
        if spec.gpu_indices is not None:
            if visible is not None:
                why = _not_visible(spec.gpu_indices, visible)
                if why is not None:
                    return why
            busy = [i for i in dict.fromkeys(spec.gpu_indices) if i not in free]
            if busy:
                return f"waiting for {'GPU' if len(busy) == 1 else 'GPUs'} {_ids(busy)} (in use)"
            return None
        if visible is not None and wanted > len(visible):
            return f"job needs {_count(wanted, 'GPU')} but the server has {len(visible)}"
        if wanted > len(free):
            return f"waiting for {_count(wanted, 'free GPU')} ({len(free)} free)"
        return None

    def fitting(self, spec: JobSpec) -> list[int]:
        """GPUs a --gpu-mem job fits on now, best first (tsd.gpumem.fitting)."""
        return fitting(self.room, self.shared, spec)

    # -- picking between users

    def fits_now(self, user: _User, spec: JobSpec) -> bool:
        return self.slot_problem(user, spec) is None and (
            not spec.gpus_wanted or self.gpu_problem(user, spec) is None
        )

    def best(self) -> _User | None:
        """The user whose candidate goes first, its candidate still able to start."""
        while self.heap:
            reserved = self.rsv.refresh()
            fair, slots, _, uid, job_id = self.heap[0]
            user = self.users[uid]
            cand = user.cand
            if cand is None or cand.id != job_id or user.slots != slots or uid in self.rsv.held:
                heapq.heappop(self.heap)  # stale entry
                continue
            if self.head_blocks(user):
                heapq.heappop(self.heap)
                continue
            if self.fits_now(user, cand.spec):
                heapq.heappop(self.heap)
                if self.rsv.allowed(cand, reserved):
                    heapq.heappush(self.heap, (fair, slots, cand.order, uid, job_id))
                    return user
                self.rsv.held[uid] = cand.id  # it stays the user's candidate: later jobs wait
                continue
            # Others' starts took what it needed: examine it again as a head.
            heapq.heappop(self.heap)
            user.cand = None
            user.ready.appendleft(cand)
            self.search(user)
        return None

    def start(self, user: _User) -> None:
        heapq.heappop(self.heap)
        job = user.cand
        assert job is not None
        user.cand = None
        spec = job.spec
        gpu_ids: tuple[int, ...] = ()
        if spec.gpus_wanted:
            assert self.free_gpus is not None
            if spec.gpu_mem is not None:
                gpu_ids = tuple(self.fitting(spec)[: spec.gpus_wanted])
            elif spec.gpu_indices is not None:
                gpu_ids = tuple(spec.gpu_indices)
            else:
                keep = self.rsv.protected(job)  # around pinned GPUs reserved: others first
                pick = sorted(self.free_gpus, key=lambda g: (g in keep, g))[: spec.gpus_wanted]
                gpu_ids = tuple(sorted(pick))
            self.take_gpus(gpu_ids, spec.gpu_mem)
        self.rsv.holders.append(bf.Holder(job_slots(spec), gpu_ids, bf.end_of(job, self.res.now)))
        slots = job_slots(spec)
        self.free_slots -= slots
        self.used_slots += slots
        user.slots += slots
        user.gpus += spec.gpus_wanted
        # A new state, once all of it is changed: the reservation of this generation may
        # have been read above (rsv.protected, for a GPU job's GPUs) with the slots still
        # free, and kept, it let a later job past a head that no longer fits.
        self.gen += 1
        self.starts.append(Start(job.id, gpu_ids))
        self.job_users[job.id] = user.uid
        self.rsv.recheck()
        self.arrays.started(spec)
        self.search(user)

    def take_gpus(self, gpu_ids: tuple[int, ...], mem: int | None) -> None:
        """These GPUs go to a job: whole (`mem` None), or `mem` MiB of each."""
        taken = set(gpu_ids)
        assert self.free_gpus is not None
        self.free_gpus = [g for g in self.free_gpus if g not in taken]
        for index in gpu_ids:
            if mem is None:
                self.room.pop(index, None)
            else:
                left, free = self.room[index]
                self.room[index] = (left - mem, free - mem)
                self.shared[index] = self.shared.get(index, 0) + mem

    def full_reason(self) -> str:
        total = self.res.total_slots
        if total <= 0:
            return "the server is draining (slots: 0)"
        return f"waiting for a free slot ({self.used_slots} of {total} in use)"

    def run(self, pending: Iterable[Job]) -> Decision:
        queue = iter(pending)
        read_all = False
        seen_gen = -1
        user: _User | None = None
        # A look for rivals costs a step per queued user: once per that many jobs read
        # (stopping later than possible reads more, and decides the same).
        reads = rivals_at = 0
        users = len(self.res.pending_users or ())
        while self.free_slots > 0:
            if self.gen != seen_gen:  # else the same user is still the best
                user = self.best()
                seen_gen = self.gen
            # The least possible fair key and no running slot, or no user whose jobs are
            # not all read could come first: no job not read yet can beat it (it would
            # lose on order) nor hold it back (it comes later).
            early = user is not None and user.slots == 0 and user.fair <= self.res.fair_floor
            if user is not None and not early and not read_all and reads >= rivals_at:
                early = _unrivalled(self, user)
                if not early:
                    rivals_at = reads + users
            if user is not None and (early or read_all):
                self.start(user)
                continue
            if read_all:
                break
            job = next(queue, None)
            if job is None:
                read_all = True
            else:
                reads += 1
                self.ingest(job)
        for user in self.users.values():
            self.head_blocks(user)  # classify allocating heads as of the final state
        reserved = self.rsv.job()
        if self.free_slots <= 0:
            _full_server_reasons(self)  # read but cut short by the full server
        elif reserved is not None:
            self.rsv.explain(reserved, self.reasons)
        elif self.rsv.held:
            # Held for a reservation that a later start dissolved (it made another head
            # of that user block, one that reserves nothing): they say what held them
            # in this pass (the one they were checked against), and the next pass, right
            # away, may start them.
            assert self.rsv.checked_against is not None  # set whenever one is held
            self.rsv.explain_held(self.rsv.checked_against, self.reasons)
            self.wake_at = self.res.now
        return Decision(
            start=tuple(self.starts),
            skip=tuple(self.skips),
            allocating=tuple(self.allocating),
            reasons=MappingProxyType(self.reasons),
            unvisited_reason="" if read_all else self.full_reason(),
            reserved=None if reserved is None else reserved.id,
            wake_at=self.wake_at,
        )


def _shared_problem(d: _Decider, spec: JobSpec) -> str | None:
    """Why a --gpu-mem job cannot have its GPUs now, or None."""
    if d.res.gpu_memory is None:
        return "GPU information unavailable"
    need = spec.gpu_mem or 0
    fits = d.fitting(spec)
    if spec.gpu_indices is not None:
        short = [i for i in spec.gpu_indices if i not in fits]
        if short:
            which = "GPU" if len(short) == 1 else "GPUs"
            return f"waiting for {_mib(need)} on {which} {_ids(short)}"
        return None
    if len(fits) < spec.gpus_wanted:
        return (
            f"waiting for {_count(spec.gpus_wanted, 'GPU')} with {_mib(need)} free"
            f" ({len(fits)} ha{'s' if len(fits) == 1 else 've'} it)"
        )
    return None


def _unrivalled(d: _Decider, best: _User) -> bool:
    """Whether no job not read yet could start before `best`'s candidate: it comes
    after every job read, so only as the first startable job of a user with a smaller
    (fair key, running slots) who has no candidate nor blocker yet."""
    uids = d.res.pending_users
    if uids is None:
        return False
    key = (best.fair, best.slots)
    for uid in uids:
        user = d.users.get(uid)
        if user is None:
            fair = d.fair_key(uid) if d.fair_key is not None else 0.0
            if (fair, d.run_slots.get(uid, 0)) < key:
                return False
        elif user.cand is None and user.blocker is None and (user.fair, user.slots) < key:
            return False
    return True

# -- the whole decision


def _full_server_reasons(d: _Decider) -> None:
    """Jobs read but cut short by the full server wait for a slot (and maybe for the
    user fair share puts first)."""
    started = {d.job_users[st.job_id] for st in d.starts}
    waiting = [u for u in d.users.values() if u.cand is not None or u.uid in started]
    for user in d.users.values():
        reason = d.full_reason() + _fair_hint(user, waiting)
        for job in [user.cand, *user.ready]:
            if job is not None:
                d.reasons[job.id] = reason


def _fair_hint(user: _User, waiting: Iterable[_User]) -> str:
    """`; fair share: user bob first` when another waiting user goes before this one."""
    ahead = [u for u in waiting if u is not user and u.fair < user.fair]
    if not ahead:
        return ""
    first = min(ahead, key=lambda u: (u.fair, u.slots, u.uid))
    return f"; fair share: user {first.name} first"


def decide(
    pending: Iterable[Job],
    running: Sequence[Job],
    dep_outcome: Callable[[int], DepOutcome],
    res: Resources,
) -> Decision:
    """Decide which pending jobs start now (see the module docstring for the rules).

    `pending`: every queued and allocating job, in global queue order (ascending
    `Job.order`); it is read lazily and only as far as needed. `running`: every
    running job, with its slots and `gpu_ids`. `dep_outcome`: what became of a
    job id. Jobs in `pending` that are also in `running`, or repeated, are ignored.
    """
    return _Decider(running, dep_outcome, res).run(pending)
