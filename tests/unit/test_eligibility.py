"""The job controls' scheduling rules: holds, --begin, array throttles, --priority, --retry.

Example tests pin each rule and its reason; hypothesis properties check, over
random queues, that held and not-yet-begun jobs never start and change nothing
else, that a throttled array never has more than K elements running, that a
single user's queue starts exactly what a naive walk of the rules starts, and
that priorities only reorder one user's own jobs.
"""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsd.eligibility import ArrayCounts, apart_reason, priority_keys, should_retry
from tsd.model import ExitInfo, Job, JobSpec, JobState, UserLimits
from tsd.scheduler import Decision, DepOutcome, Resources, decide

NOW = 1_000_000.0


def job(
    id: int,
    uid: int = 1000,
    *,
    order: int | None = None,
    slots: int = 1,
    state: JobState = JobState.QUEUED,
    begin: float | None = None,
    array: tuple[int, int | None] | None = None,  # (array job id, throttle)
    priority: int = 0,
    retry: int = 0,
    attempts: int = 0,
) -> Job:
    spec = JobSpec(
        command=("true",), cwd="/", env=(), slots=slots, begin=begin, priority=priority,
        retry=retry,
        array_job=None if array is None else array[0],
        array_task=None if array is None else id,
        array_throttle=None if array is None else array[1],
    )  # fmt: skip
    return Job(
        id=id, uid=uid, user=f"u{uid}", spec=spec, state=state,
        order=id if order is None else order, enqueue_time=0.0, attempts=attempts,
    )  # fmt: skip


def res(total_slots: int = 4, limits: dict[int, UserLimits] | None = None) -> Resources:
    table = limits or {}
    return Resources(
        total_slots=total_slots, limits=lambda uid: table.get(uid, UserLimits()),
        free_gpus=(), now=NOW,
    )  # fmt: skip


def run(pending: Sequence[Job], resources: Resources, active: Sequence[Job] = ()) -> Decision:
    return decide(pending, active, lambda _: DepOutcome.GONE, resources)


def started(decision: Decision) -> list[int]:
    return [s.job_id for s in decision.start]


# --- holds and --begin -----------------------------------------------------------


def test_a_held_job_never_starts_and_holds_nobody_back() -> None:
    d = run([job(1, state=JobState.HELD), job(2)], res(1))
    assert started(d) == [2]
    assert d.reasons[1] == "held: ts --release 1 queues it"


def test_a_job_before_its_begin_time_waits_with_the_time_and_a_wake_up() -> None:
    d = run([job(1, begin=NOW + 90), job(2, begin=NOW + 30), job(3)], res(4))
    assert started(d) == [3]
    assert d.reasons[1].startswith("begins at ")
    assert d.wake_at == NOW + 30  # the earliest: one timer, no polling


def test_a_job_whose_begin_time_has_come_starts() -> None:
    d = run([job(1, begin=NOW - 1), job(2, begin=NOW)], res(4))
    assert started(d) == [1, 2]
    assert d.wake_at is None


def test_a_held_job_with_a_begin_time_asks_for_no_wake_up() -> None:
    d = run([job(1, state=JobState.HELD, begin=NOW + 60)], res(4))
    assert started(d) == [] and d.wake_at is None
    assert apart_reason(job(1, state=JobState.HELD, begin=NOW + 60), NOW) == (
        "held: ts --release 1 queues it"
    )


# --- arrays ----------------------------------------------------------------------


def test_an_array_throttle_caps_its_running_elements_and_holds_nobody_back() -> None:
    elements = [job(i, array=(1, 2)) for i in range(1, 6)]
    d = run([*elements, job(9)], res(8))
    assert started(d) == [1, 2, 9]
    assert d.reasons[3] == "array 1: 2 of at most 2 elements running (%2)"


def test_an_array_throttle_counts_elements_already_running() -> None:
    active = [job(1, array=(1, 2), state=JobState.RUNNING)]
    d = run([job(i, array=(1, 2)) for i in range(2, 5)], res(8), active)
    assert started(d) == [2]


def test_array_counts_ignore_unthrottled_jobs() -> None:
    counts = ArrayCounts([job(1, array=(1, None), state=JobState.RUNNING), job(2)])
    assert counts.running == {}
    assert counts.throttled(job(3, array=(1, None)).spec) is None


# --- --priority placement -----------------------------------------------------------


def test_a_higher_priority_job_takes_the_place_of_the_first_lower_one() -> None:
    own = [(1, 10, 0), (2, 20, 5), (3, 30, 0)]
    keys, moved = priority_keys(own, 3, 1, 100)
    # After the last job of a higher priority (job 2; -u may have put job 1 first).
    assert keys == [30]
    assert moved == {3: 100}


def test_equal_priority_keeps_queue_order_and_moves_nothing() -> None:
    keys, moved = priority_keys([(1, 10, 0), (2, 20, 0)], 0, 2, 50)
    assert keys == [50, 51] and moved == {}


def test_a_block_of_array_elements_is_placed_together() -> None:
    keys, moved = priority_keys([(1, 10, 0), (2, 20, 0)], 1, 3, 50)
    assert keys == [10, 20, 50]
    assert moved == {1: 51, 2: 52}


# --- --retry -----------------------------------------------------------------------


def test_retry_only_after_a_nonzero_exit_of_its_own_while_attempts_are_left() -> None:
    j = job(1, retry=2, attempts=1, state=JobState.RUNNING)
    assert should_retry(j, ExitInfo(code=1), killed=False)
    assert not should_retry(j, ExitInfo(code=0), killed=False)
    assert not should_retry(j, ExitInfo(code=143), killed=True)  # ts -k
    assert not should_retry(j, ExitInfo(signal=9, timed_out=True), killed=False)
    assert not should_retry(j, ExitInfo(code=1, timed_out=True), killed=False)
    assert not should_retry(j, ExitInfo(lost=True), killed=False)
    assert not should_retry(j, ExitInfo(signal=11), killed=False)
    assert should_retry(job(1, retry=2, attempts=2), ExitInfo(code=1), killed=False)
    assert not should_retry(job(1, retry=2, attempts=3), ExitInfo(code=1), killed=False)
    assert not should_retry(job(1, retry=0, attempts=1), ExitInfo(code=1), killed=False)


# --- properties ---------------------------------------------------------------------

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UIDS = (1000, 1001, 1002)


@st.composite
def queues(draw: st.DrawFn, uids: Sequence[int] = UIDS) -> tuple[list[Job], list[Job], int]:
    """(pending, running, total slots): CPU jobs with holds, begin times and arrays."""
    arrays = {100 + a: draw(st.none() | st.integers(1, 3)) for a in range(2)}
    array_owner = {a: draw(st.sampled_from(uids)) for a in arrays}
    active = []
    for i in range(draw(st.integers(0, 4))):
        a = draw(st.none() | st.sampled_from(sorted(arrays)))
        uid = array_owner[a] if a is not None else draw(st.sampled_from(uids))
        arr = None if a is None else (a, arrays[a])
        active.append(job(300 + i, uid, state=JobState.RUNNING, array=arr))
    pending = []
    for i in range(1, draw(st.integers(0, 20)) + 1):
        a = draw(st.none() | st.sampled_from(sorted(arrays)))
        uid = array_owner[a] if a is not None else draw(st.sampled_from(uids))
        pending.append(
            job(
                i, uid,
                slots=draw(st.integers(1, 2)),
                state=JobState.HELD if draw(st.integers(0, 4)) == 0 else JobState.QUEUED,
                begin=draw(st.none() | st.sampled_from([NOW - 5, NOW, NOW + 1, NOW + 3600])),
                array=None if a is None else (a, arrays[a]),
            )
        )
    return pending, active, draw(st.integers(0, 8))


def _apart(j: Job) -> bool:
    return j.state is JobState.HELD or (j.spec.begin is not None and j.spec.begin > NOW)


@PROPS
@given(queues(), st.integers(0, 3))
def test_held_and_not_yet_begun_jobs_never_start_and_change_nothing_else(
    q: tuple[list[Job], list[Job], int], quota: int
) -> None:
    pending, active, slots = q
    limits = {uid: UserLimits(max_running_slots=quota + 1) for uid in UIDS}
    d = run(pending, res(slots, limits), active)
    apart = {j.id for j in pending if _apart(j)}
    assert not apart & set(started(d))
    # The same decision as on a queue without them: they hold nobody up.
    without = run([j for j in pending if j.id not in apart], res(slots, limits), active)
    assert started(d) == started(without)
    begins = [j.spec.begin for j in pending if j.state is not JobState.HELD and j.spec.begin]
    later = [b for b in begins if b > NOW]
    if d.unvisited_reason == "" and later:
        assert d.wake_at == min(later)


@PROPS
@given(queues())
def test_an_array_never_has_more_than_its_throttle_running(
    q: tuple[list[Job], list[Job], int],
) -> None:
    pending, active, slots = q
    d = run(pending, res(slots), active)
    by_id = {j.id: j for j in pending}
    count: dict[int, int] = {}
    for j in [*active, *(by_id[i] for i in started(d))]:
        if j.spec.array_throttle is not None and j.spec.array_job is not None:
            count[j.spec.array_job] = count.get(j.spec.array_job, 0) + 1
    for j in [*active, *pending]:
        limit, arr = j.spec.array_throttle, j.spec.array_job
        if limit is not None and arr is not None:
            already = sum(1 for a in active if a.spec.array_job == arr)
            assert count.get(arr, 0) <= max(limit, already)


def naive_one_user(pending: Sequence[Job], active: Sequence[Job], slots: int) -> list[int]:
    """One user's queue, the slow way: walk it in order as often as something starts."""
    free = slots - sum(j.spec.slots for j in active)
    running = [*active]
    out: list[int] = []
    while True:
        pick = None
        for j in pending:
            if j.id in out or _apart(j):
                continue
            throttle, arr = j.spec.array_throttle, j.spec.array_job
            if throttle is not None and sum(r.spec.array_job == arr for r in running) >= throttle:
                continue  # throttled: waits, holds nobody up
            if j.spec.slots > slots:
                continue  # never fits: waits, holds nobody up
            if j.spec.slots > free:
                break  # the head short of slots holds back the rest
            pick = j
            break
        if pick is None or free <= 0:
            return out
        out.append(pick.id)
        running.append(pick)
        free -= pick.spec.slots


@PROPS
@given(queues(uids=(1000,)))
def test_one_users_queue_starts_what_a_naive_walk_of_the_rules_starts(
    q: tuple[list[Job], list[Job], int],
) -> None:
    pending, active, slots = q
    assert started(run(pending, res(slots), active)) == naive_one_user(pending, active, slots)


@PROPS
@given(st.lists(st.tuples(st.sampled_from(UIDS), st.integers(-2, 2), st.integers(1, 3)),
                max_size=25))
def test_priorities_reorder_only_their_users_own_jobs(
    submits: list[tuple[int, int, int]],
) -> None:
    # Submit (uid, priority, count) batches the way the job table does, and compare
    # with the naive statement: each user's jobs in (priority desc, submit order), on
    # exactly the queue positions that user would hold without any priority.
    queue: dict[int, tuple[int, int, int]] = {}  # job id -> (uid, order key, priority)
    next_key = 0
    plain: list[int] = []  # uid at each position without priorities
    job_id = 0
    for uid, prio, count in submits:
        own = sorted(
            ((i, k, p) for i, (u, k, p) in queue.items() if u == uid), key=lambda t: t[1]
        )
        keys, moved = priority_keys(own, prio, count, next_key)
        for i, k in moved.items():
            queue[i] = (uid, k, queue[i][2])
        for k in keys:
            job_id += 1
            queue[job_id] = (uid, k, prio)
        next_key += count
        plain += [uid] * count
    in_order = sorted(queue, key=lambda i: queue[i][1])
    assert [queue[i][0] for i in in_order] == plain  # nobody passed another user
    assert len({k for _, k, _ in queue.values()}) == len(queue)  # keys stay unique
    for uid in UIDS:
        mine = [i for i in in_order if queue[i][0] == uid]
        assert mine == sorted(mine, key=lambda i: (-queue[i][2], i))
