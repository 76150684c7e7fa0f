"""The job table's transitions keep its indexes true and write through the store first."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from unit.daemon_fakes import Events, FakeStore, spec

from tsd.eligibility import priority_keys
from tsd.errors import NoSuchJob, NotOwner
from tsd.finishedcap import TRIM_BATCH
from tsd.jobtable import JobTable
from tsd.model import DependMode, ExitInfo, Job, JobState, Peer
from tsd.scheduler import DepOutcome


def make(
    max_finished: int = 1000, store: FakeStore | None = None
) -> tuple[JobTable, FakeStore, Events]:
    store = store or FakeStore()
    events = Events()
    return JobTable(store, events, lambda: max_finished), store, events


def run(table: JobTable, job: Job, gpu_ids: tuple[int, ...] = ()) -> Job:
    """Launch a pending job as the runner does: reserve, then record its supervisor."""
    table.begin_run(job, gpu_ids, tuple(f"GPU-{i}" for i in gpu_ids))
    return table.launched(job.id, 4000 + job.id, 1, None)


def peer(uid: int = 1000, admin: bool = False) -> Peer:
    return Peer(pid=1, uid=uid, gid=uid, user=f"u{uid}", admin=admin)


def test_add_queues_behind_every_job_and_counts_pending_per_user_and_gpu() -> None:
    table, store, _ = make()
    a = table.add(1000, "alice", spec())
    b = table.add(1000, "alice", spec(gpus=1))
    c = table.add(2000, "bob", spec())
    assert table.pending == [a.id, b.id, c.id]
    assert a.order < b.order < c.order
    assert table.pending_count[1000] == 2 and table.pending_count[2000] == 1
    assert table.pending_gpu_jobs == 1
    assert store.rows[b.id].state is JobState.QUEUED


def test_begin_run_reserves_the_job_out_of_the_queue_until_launched_makes_it_run() -> None:
    table, store, events = make()
    job = table.add(1000, "alice", spec(gpus=1))
    table.begin_run(job, (0,), ("GPU-0",))
    assert table.pending == [] and table.pending_count[1000] == 0
    assert table.pending_gpu_jobs == 0 and events.rooms == 1
    # It holds its GPU and slot, but is not running (nor durable) before its supervisor is.
    assert table.gpu_holders()[0] == {0: job.id} and table.used_slots() == 1
    assert table.running == {} and not table.is_queued(table.jobs[job.id])
    assert store.rows[job.id].state is JobState.QUEUED
    launched = table.launched(job.id, 4242, 77, "tsd-job-1.scope")
    assert launched.state is JobState.RUNNING and launched.supervisor_pid == 4242
    assert store.rows[job.id] == launched and table.running[job.id] == launched
    assert table.launching == {} and table.last_run[1000] == job.id


def test_a_failed_launch_ends_the_job_without_it_having_run() -> None:
    table, store, events = make()
    job = table.add(1000, "alice", spec())
    table.begin_run(job, (), ())
    ended = table.end_launch(job.id, ExitInfo(lost=True, note="could not start its scope: x"))
    assert ended.state is JobState.FINISHED and store.rows[job.id] == ended
    assert table.launching == {} and events.ends == [job.id]


def test_finish_records_the_exit_and_wakes_waiters() -> None:
    table, store, events = make()
    job = run(table, table.add(1000, "alice", spec()))
    done = table.finish(job.id, ExitInfo(code=3), 12.5, "/tmp/out")
    assert done is not None and done.state is JobState.FINISHED
    assert done.exit == ExitInfo(code=3) and done.end_time == 12.5
    assert done.output_path == "/tmp/out"
    assert store.rows[job.id] == done
    assert job.id not in table.running and events.ends == [job.id]
    assert list(table.finished_by_user[1000]) == [job.id]
    assert table.finish(job.id, ExitInfo(code=0), None, None) is None  # only once


def test_requeue_puts_a_never_started_job_back_at_its_place() -> None:
    table, store, _ = make()
    first = table.add(1000, "alice", spec())
    second = table.add(1000, "alice", spec())
    run(table, first, (0,))
    again = table.requeue(first.id)
    assert table.pending == [first.id, second.id]
    assert again.state is JobState.QUEUED and again.supervisor_pid is None
    assert again.gpu_ids == () and store.rows[first.id] == again


def test_dependents_lists_only_pending_jobs_and_is_pruned_as_they_leave() -> None:
    table, _, _ = make()
    dep = table.add(1000, "alice", spec())
    waiter = table.add(1000, "alice", spec(depends=(dep.id,)))
    other = table.add(1000, "alice", spec(depends=(dep.id,)))
    assert table.dependents == {dep.id: {waiter.id, other.id}}
    table.remove(table.jobs[other.id])
    assert table.dependents == {dep.id: {waiter.id}}
    run(table, table.jobs[waiter.id])
    assert table.dependents == {}


def test_take_dependents_hands_them_out_once() -> None:
    table, _, _ = make()
    dep = table.add(1000, "alice", spec())
    w = table.add(1000, "alice", spec(depends=(dep.id,), depend_mode=DependMode.SUCCESS))
    assert table.take_dependents(dep.id) == [w.id]
    assert table.take_dependents(dep.id) == []


def test_jobs_waiting_on_an_unended_dependency_are_offered_once_their_last_one_ends() -> None:
    table, _, _ = make()
    a, b = table.add(1000, "alice", spec()), table.add(1000, "alice", spec())
    both = table.add(1000, "alice", spec(depends=(a.id, b.id)))
    on_b = table.add(1000, "alice", spec(depends=(b.id,)))
    free = table.add(1000, "alice", spec())

    def offered() -> list[int]:
        return [j.id for j in table.offered_queue()]

    assert offered() == [a.id, b.id, free.id]
    assert table.dep_blocked == {both.id, on_b.id}
    run(table, table.jobs[a.id])  # running is not ended: still blocked
    assert offered() == [b.id, free.id]
    ended = table.finish(a.id, ExitInfo(code=1), None, None)
    assert ended is not None
    assert table.take_dependents(a.id) == [both.id]
    assert offered() == [b.id, free.id]  # b has not ended
    table.remove(table.jobs[b.id])  # a forgotten dependency counts as ended well
    assert offered() == [both.id, on_b.id, free.id]
    assert table.dep_blocked == set()
    late = table.add(1000, "alice", spec(depends=(a.id,)))  # on an ended job: offered
    assert offered()[-1] == late.id


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("asfrmq"), st.integers(0, 30), st.integers(0, 30)),
                max_size=40))  # fmt: skip
def test_offered_is_the_queue_without_jobs_waiting_on_an_unended_dependency(
    ops: list[tuple[str, int, int]],
) -> None:
    # Whatever mix of submits (with dependencies), starts, ends (each followed by the
    # dispatcher's take_dependents), removals, moves and requeues: the scheduler is
    # offered exactly the pending jobs none of whose dependencies is still to end.
    table, _, _ = make()
    for op, x, y in ops:
        ids = sorted(table.jobs)
        pick = table.jobs[ids[x % len(ids)]] if ids else None
        if op == "a" or pick is None:
            deps = tuple(sorted({ids[x % len(ids)], ids[y % len(ids)]})) if ids and y % 3 else ()
            table.add(1000 + y % 2, "u", spec(depends=deps))
        elif op == "s" and table.is_queued(pick):
            run(table, pick)
        elif op == "f" and pick.id in table.running:
            table.finish(pick.id, ExitInfo(code=y % 2), None, None)
            table.take_dependents(pick.id)
        elif op == "r" and pick.id not in table.running:
            table.remove(pick)
        elif op == "m" and table.is_queued(pick):
            table.move_front(pick)
        elif op == "q" and pick.id in table.running:
            table.requeue(pick.id)
        blocked = [i for i in table.pending if table.waits_on_dependency(table.jobs[i])]
        assert table.dep_blocked == set(blocked)
        assert table.offered == [i for i in table.pending if i not in blocked]


def test_load_blocks_a_job_whose_dependency_comes_later_in_the_store() -> None:
    table, store, _ = make()
    early = table.add(1000, "alice", spec(depends=(2,)))  # job 2 does not exist yet
    later = table.add(1000, "alice", spec())
    assert later.id == 2 and table.offered == [early.id, later.id]
    again, _, _ = make(store=store)
    again.load()
    assert again.dep_blocked == {early.id} and again.offered == [later.id]


def test_forgetting_a_finished_job_beyond_max_finished_drops_its_dependents_entry() -> None:
    table, _, _ = make(max_finished=1)
    old = table.add(1000, "alice", spec())
    table.end_pending(old, JobState.SKIPPED, ExitInfo(note="x"))
    late = table.add(1000, "alice", spec(depends=(old.id,)))
    assert old.id in table.dependents
    newer = table.add(1000, "alice", spec())
    table.end_pending(newer, JobState.SKIPPED, ExitInfo(note="y"))
    assert old.id not in table.jobs  # its row goes with a batch (see the tests below)
    assert old.id not in table.dependents
    assert late.id in table.jobs


def skipped(table: JobTable, uid: int = 1000) -> Job:
    ended = table.end_pending(table.add(uid, "alice", spec()), JobState.SKIPPED, ExitInfo())
    assert ended is not None
    return ended


def test_jobs_beyond_the_cap_are_forgotten_at_once_and_their_rows_deleted_a_batch_at_once() -> None:
    table, store, _ = make(max_finished=1)
    first = [skipped(table) for _ in range(TRIM_BATCH)]
    assert [j.id for j in table.jobs.values()] == [first[-1].id]  # the newest alone, at once
    assert all(j.id in store.rows for j in first)  # TRIM_BATCH - 1 forgotten: rows kept
    writes = store.writes
    last = skipped(table)  # it forgets the TRIM_BATCH-th: all their rows go, in one write
    assert set(store.rows) == {last.id} and set(table.jobs) == {last.id}
    assert store.writes == writes + 3  # its submit, its end, and the one delete


def test_a_load_applies_the_cap_to_jobs_whose_rows_were_not_deleted_yet_or_to_a_lower_cap() -> None:
    table, store, _ = make(max_finished=1)
    ended = [skipped(table), skipped(table), skipped(table, uid=1001), skipped(table)]
    assert set(store.rows) == {j.id for j in ended}  # two forgotten, rows kept (a stop)
    again, _, _ = make(max_finished=1, store=store)
    again.load()
    kept = {ended[2].id, ended[3].id}  # each user's newest
    assert set(again.jobs) == kept and set(store.rows) == kept
    assert again.stored.of(1000) == ended[3].spec.stored_bytes
    lower, _, _ = make(max_finished=0, store=store)
    lower.load()
    assert lower.jobs == {} and store.rows == {}


def test_end_pending_keeps_the_wait_reason_unless_given_one() -> None:
    table, _, events = make()
    job = table.add(1000, "alice", spec())
    table.set_waiting([(job.id, JobState.QUEUED, "waiting for a slot")])
    ended = table.end_pending(table.jobs[job.id], JobState.FINISHED, ExitInfo(lost=True, note="n"))
    assert ended.wait_reason == "waiting for a slot"
    assert events.ends == [job.id] and events.rooms == 1
    skipped = table.add(1000, "alice", spec())
    assert table.end_pending(
        skipped, JobState.SKIPPED, ExitInfo(note="r"), wait_reason="r"
    ).wait_reason == "r"


def test_set_waiting_writes_only_changes_of_state() -> None:
    table, store, _ = make()
    job = table.add(1000, "alice", spec(gpus=1))
    writes = store.writes
    table.set_waiting([(job.id, JobState.QUEUED, "reason 1")])
    assert store.writes == writes and table.jobs[job.id].wait_reason == "reason 1"
    table.set_waiting([(job.id, JobState.ALLOCATING, "no free GPU")])
    assert store.writes == writes + 1
    assert store.rows[job.id].state is JobState.ALLOCATING


def test_move_front_and_swap_reorder_the_queue_durably() -> None:
    table, store, _ = make()
    a, b, c = (table.add(1000, "alice", spec()) for _ in range(3))
    table.move_front(table.jobs[c.id])
    assert table.pending == [c.id, a.id, b.id]
    assert store.rows[c.id].order < store.rows[a.id].order
    table.swap(table.jobs[a.id], table.jobs[b.id])
    assert table.pending == [c.id, b.id, a.id]
    assert store.rows[b.id].order < store.rows[a.id].order


def test_clear_forgets_only_the_callers_done_jobs() -> None:
    table, store, _ = make()
    mine = table.add(1000, "alice", spec())
    theirs = table.add(2000, "bob", spec())
    queued = table.add(1000, "alice", spec())
    for job in (mine, theirs):
        table.end_pending(job, JobState.SKIPPED, ExitInfo(note="x"))
    assert table.clear(1000) == 1
    assert set(store.rows) == {theirs.id, queued.id}


def test_listing_shows_running_then_queue_order_then_done_by_end() -> None:
    table, _, _ = make()
    a, b, c, d = (table.add(1000, "alice", spec()) for _ in range(4))
    table.end_pending(a, JobState.SKIPPED, ExitInfo(note="x"))
    run(table, table.jobs[c.id])
    table.move_front(table.jobs[d.id])
    assert [j.id for j in table.listing()] == [c.id, d.id, b.id, a.id]


def test_load_rebuilds_the_indexes_and_returns_the_running_jobs() -> None:
    table, store, _ = make()
    a = table.add(1000, "alice", spec())
    b = table.add(1000, "alice", spec(depends=(a.id,)))
    run(table, a)
    again, _, _ = make(store=store)
    running = again.load()
    assert [j.id for j in running] == [a.id]
    assert again.pending == [b.id] and again.dependents == {a.id: {b.id}}
    assert again.dep_blocked == {b.id} and again.offered == []  # a runs: b is not offered
    assert again.last_added[1000] == b.id and again.last_run[1000] == a.id
    c = again.add(1000, "alice", spec())
    assert c.order > b.order


def test_pick_defaults_to_the_last_added_or_run_and_refuses_others_jobs() -> None:
    table, _, _ = make()
    with pytest.raises(NoSuchJob):
        table.pick(peer(), None, "added")
    a = table.add(1000, "alice", spec())
    b = table.add(1000, "alice", spec())
    run(table, a)
    assert table.pick(peer(), None, "added").id == b.id
    assert table.pick(peer(), None, "run").id == a.id
    with pytest.raises(NotOwner):
        table.pick(peer(2000), a.id, "added")
    assert table.pick(peer(2000, admin=True), a.id, "added").id == a.id
    with pytest.raises(NoSuchJob):
        table.pick(peer(), 99, "added")


def test_dep_outcome_follows_the_dependency_state() -> None:
    table, _, _ = make()
    ok, bad, skipped, pending = (table.add(1000, "alice", spec()) for _ in range(4))
    for job, code in ((ok, 0), (bad, 1)):
        run(table, table.jobs[job.id])
        table.finish(job.id, ExitInfo(code=code), None, None)
    table.end_pending(skipped, JobState.SKIPPED, ExitInfo(note="x"))
    assert table.dep_outcome(ok.id) is DepOutcome.SUCCEEDED
    assert table.dep_outcome(bad.id) is DepOutcome.FAILED
    assert table.dep_outcome(skipped.id) is DepOutcome.SKIPPED
    assert table.dep_outcome(pending.id) is DepOutcome.PENDING
    assert table.dep_outcome(999) is DepOutcome.GONE


def test_report_saves_pid_and_output_and_announces_the_start() -> None:
    table, store, events = make()
    job = run(table, table.add(1000, "alice", spec()))
    table.report(job.id, 777, None, out_seen=False)
    assert store.rows[job.id].pid == 777 and events.starts == []
    table.report(job.id, None, "/tmp/ts-out.1.abc", out_seen=True)
    assert store.rows[job.id].output_path == "/tmp/ts-out.1.abc"
    assert events.starts == [job.id]


def test_a_transparent_job_ends_without_a_finished_entry_and_is_dropped() -> None:
    table, store, events = make()
    job = run(table, table.add(1000, "alice", spec(store_output=False, forget=True)))
    ended = table.finish(job.id, ExitInfo(code=3), None, None)
    assert ended is not None and events.finals == [ended]  # the waiter gets the record
    assert list(table.finished_by_user[1000]) == []
    table.drop_transparent(ended)
    assert table.get(job.id) is None and job.id not in store.rows


def test_an_ordinary_job_is_never_dropped_as_transparent() -> None:
    table, store, _ = make()
    job = run(table, table.add(1000, "alice", spec()))
    ended = table.finish(job.id, ExitInfo(code=0), None, None)
    assert ended is not None
    table.drop_transparent(ended)
    assert table.get(job.id) == ended and store.rows[job.id] == ended


def test_load_drops_transparent_jobs_that_ended_before_a_crash_and_keeps_running_ones() -> None:
    table, store, _ = make()
    done = run(table, table.add(1000, "alice", spec(store_output=False, forget=True)))
    table.finish(done.id, ExitInfo(code=0), None, None)  # crash before the drop
    running = run(table, table.add(1000, "alice", spec(store_output=False, forget=True)))
    again, _, _ = make(store=store)
    assert [j.id for j in again.load()] == [running.id]
    assert again.get(done.id) is None and done.id not in store.rows


def test_a_launched_job_started_when_its_launch_was_decided_not_when_its_scope_came_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table, _, _ = make()
    job = table.add(1000, "alice", spec())
    monkeypatch.setattr("tsd.jobtable.time.time", lambda: 100.0)
    table.begin_run(job, (), ())
    monkeypatch.setattr("tsd.jobtable.time.time", lambda: 105.0)
    assert table.launched(job.id, 4242, 1, None).start_time == 100.0


def test_queue_stays_in_order_through_priorities_moves_swaps_starts_and_requeues() -> None:
    # The queue is kept sorted as jobs come and go (never re-sorted nor scanned): after
    # any mix of edits it is the pending jobs by order key, and a user's new job's keys
    # are what the full rule (tsd.eligibility.priority_keys) gives.
    table, _, _ = make()
    for i in range(12):
        table.add(1000 + i % 3, "u", spec(priority=(i * 7) % 4 - 1))
    ids = list(table.pending)
    table.move_front(table.jobs[ids[7]])
    table.swap(table.jobs[ids[1]], table.jobs[ids[4]])
    first = run(table, table.jobs[table.pending[2]])
    run(table, table.jobs[table.pending[0]])  # the head: most starts take it
    table.set_held(table.jobs[ids[5]], True)
    table.add_many(1001, "u", [spec(priority=2)] * 2)
    table.requeue(first.id)
    table.remove(table.jobs[ids[9]])
    table.add(1002, "u", spec(priority=-5))

    def expected() -> list[int]:
        pending = [j for j in table.jobs.values() if j.state.pending]
        return [j.id for j in sorted(pending, key=lambda j: (j.order, j.id))]

    assert table.pending == expected()
    assert table.offered == expected()  # no dependencies: every pending job is offered
    for uid in (1000, 1001, 1002):
        own = [(j.id, j.order, j.spec.priority) for j in table.queue() if j.uid == uid]
        for priority in (-9, 0, 1, 9):
            next_key = table._orders[1] + 1
            assert table.place(uid, priority, 2) == priority_keys(own, priority, 2, next_key)


def test_stored_bytes_after_a_load_count_every_kept_job_also_across_adds_and_removes() -> None:
    table, store, _ = make()
    a = table.add(1000, "alice", spec("echo", "aaaa"))
    table.add(1001, "bob", spec("echo", "bb"))
    again, _, _ = make(store=store)
    again.load()
    # A change before anyone asked, then one after: both counted once.
    c = again.add(1000, "alice", spec("echo", "c"))
    expect = a.spec.stored_bytes + c.spec.stored_bytes
    assert again.stored.of(1000) == expect
    again.remove(again.get(a.id))
    assert again.stored.of(1000) == c.spec.stored_bytes
    assert again.stored.of(1001) == spec("echo", "bb").stored_bytes
