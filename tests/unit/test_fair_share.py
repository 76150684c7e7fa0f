"""Fair share by decayed usage (tsd.usage, tsd.ledger) and reservations (tsd.backfill).

Hypothesis checks the decay arithmetic against its definition, the scheduler's
order against "least usage / share first", and that a reservation is never
delayed by a job that started after it, nor passed by a job without --timeout.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tsd.backfill import Holder, Need, plan
from tsd.config import Config
from tsd.configfile import parse_config
from tsd.ledger import Ledger
from tsd.model import ExitInfo, Job, JobSpec, JobState, UserLimits
from tsd.scheduler import DepOutcome, Resources, decide
from tsd.store import Store
from tsd.usage import FairShareSettings, Usage, UsageBook, decayed, run_charge

H = 7 * 86400.0


@given(
    value=st.floats(0, 1e9),
    halvings=st.integers(0, 20),
    half_life=st.floats(60, 1e7),
)
def test_usage_halves_every_half_life(value: float, halvings: int, half_life: float) -> None:
    u = Usage(value, 1000.0)
    got = decayed(u, 1000.0 + halvings * half_life, half_life)
    assert math.isclose(got, value / 2**halvings, rel_tol=1e-9, abs_tol=1e-300)


def test_usage_never_grows_when_the_clock_steps_back() -> None:
    assert decayed(Usage(10.0, 1000.0), 900.0, H) == 10.0


@given(rate=st.floats(0.5, 16), lives=st.floats(0, 10), half_life=st.floats(3600, 1e7))
def test_a_run_is_charged_as_the_sum_of_its_decayed_seconds(
    rate: float, lives: float, half_life: float
) -> None:
    span = lives * half_life
    steps = 2000
    dt = span / steps
    riemann = sum(rate * dt * 2 ** (-(span - (i + 0.5) * dt) / half_life) for i in range(steps))
    assert math.isclose(run_charge(rate, 0.0, span, half_life), riemann, rel_tol=1e-4, abs_tol=1e-6)
    assert run_charge(rate, 0.0, span, half_life) <= rate * span + 1e-9


def test_gpu_seconds_weigh_gpu_weight_slot_seconds() -> None:
    book = UsageBook(FairShareSettings(half_life=H, gpu_weight=4))
    assert book.after_charge(1, 10, 5, at=0.0).value == 30.0
    book.set(1, book.after_charge(1, 10, 5, at=0.0))
    assert math.isclose(book.after_charge(1, 0, 0, at=H).value, 15.0)


def job(
    id: int, uid: int, slots: int = 1, timeout: float | None = None,
    state: JobState = JobState.QUEUED, start: float | None = None,
) -> Job:
    spec = JobSpec(command=("true",), cwd="/", env=(), slots=slots, timeout=timeout)
    return Job(id, uid, f"u{uid}", spec, state, id, 0.0, start_time=start)


@settings(max_examples=200, deadline=None)
@given(
    usage=st.dictionaries(st.integers(1, 6), st.floats(0, 100), min_size=1, max_size=6),
    shares=st.dictionaries(st.integers(1, 6), st.sampled_from([0.5, 1.0, 2.0, 4.0])),
    free=st.integers(1, 4),
)
def test_users_start_in_order_of_least_usage_per_share(
    usage: dict[int, float], shares: dict[int, float], free: int
) -> None:
    # One job per user, all fit: the starts are the users sorted by usage / share.
    key = {uid: usage[uid] / shares.get(uid, 1.0) for uid in usage}
    pending = [job(i + 1, uid) for i, uid in enumerate(sorted(usage))]
    res = Resources(
        total_slots=free, limits=lambda uid: UserLimits(), free_gpus=(),
        fair_key=lambda uid: key[uid], fair_floor=min(key.values()),
    )
    d = decide(pending, [], lambda i: DepOutcome.GONE, res)
    naive = sorted(pending, key=lambda j: (key[j.uid], j.order))[:free]
    assert [s.job_id for s in d.start] == [j.id for j in naive]


# --- reservations -------------------------------------------------------------------

ENDS = st.sampled_from([None, 10.0, 20.0, 40.0, 80.0])


@st.composite
def busy_servers(draw: st.DrawFn) -> tuple[int, list[Job], list[Job]]:
    total = draw(st.integers(2, 6))
    active: list[Job] = []
    used = 0
    while used < total - 1 and draw(st.booleans()):
        slots = draw(st.integers(1, total - 1 - used))
        end = draw(ENDS)
        active.append(job(100 + len(active), 9, slots, end, JobState.RUNNING, start=0.0))
        used += slots
    big = job(1, 1, draw(st.integers(total - used + 1, total + 1)) if used else total + 1)
    small = [
        job(2 + i, draw(st.integers(2, 4)), draw(st.integers(1, 2)), draw(ENDS))
        for i in range(draw(st.integers(0, 6)))
    ]
    return total, active, [big, *small]


def earliest_start(need: int, total: int, holders: list[tuple[int, float | None]]) -> float:
    """When `need` slots are free at the earliest, if jobs end exactly at their ends."""
    free = total - sum(n for n, _ in holders)
    for t in sorted({e for _, e in holders if e is not None}):
        if free + sum(n for n, e in holders if e is not None and e <= t) >= need:
            return t
    return 0.0 if free >= need else math.inf


@settings(max_examples=300, deadline=None)
@given(busy_servers())
def test_a_reservation_is_never_delayed_nor_passed_by_a_job_without_timeout(
    server: tuple[int, list[Job], list[Job]],
) -> None:
    total, active, pending = server
    big = pending[0]
    if big.spec.slots > total:
        return
    res = Resources(total_slots=total, limits=lambda uid: UserLimits(), free_gpus=(), now=0.0)
    d = decide(pending, active, lambda i: DepOutcome.GONE, res)
    started = {s.job_id for s in d.start}
    if big.id in started:
        return
    assert d.reserved == big.id
    holders = [(j.spec.slots, None if j.spec.timeout is None else j.spec.timeout) for j in active]
    before = earliest_start(big.spec.slots, total, holders)
    by_id = {j.id: j for j in pending}
    after = holders + [(by_id[i].spec.slots, by_id[i].spec.timeout) for i in started]
    assert earliest_start(big.spec.slots, total, after) <= before
    for i in started:
        if by_id[i].spec.timeout is None:
            # It took only slots the big job will not need when it can start.
            assert before < math.inf
            free_then = total - sum(n for n, e in after if e is None or e > before)
            assert free_then >= big.spec.slots


def test_plan_shadow_is_when_enough_ends_and_extra_is_what_is_left() -> None:
    holders = [Holder(2, (), 50.0), Holder(1, (), None), Holder(2, (), 20.0)]
    p = plan(Need(4), 1, [], holders)
    assert (p.shadow, p.extra_slots) == (50.0, 1)
    assert p.allows(Need(1), None, [])  # the one slot to spare
    assert not p.allows(Need(2), None, [])
    assert p.allows(Need(2), 50.0, [])  # gone by then
    unknown = plan(Need(4), 1, [], [Holder(3, (), None)])
    assert unknown.shadow is None and not unknown.allows(Need(1), 5.0, [])


# --- config and the ledger --------------------------------------------------------------


def test_config_reads_fair_share_share_and_keep_days() -> None:
    cfg = parse_config(
        "scheduler: {fair_share: {half_life: 3d, gpu_weight: 2}}\n"
        "accounting: {keep_days: 30}\n"
        "defaults: {share: 2}\ngroups: {phd: {share: 3}}\nusers: {alice: {share: 0.5}}\n"
    )
    assert cfg.fair_share == FairShareSettings(half_life=3 * 86400.0, gpu_weight=2.0)
    assert cfg.keep_days == 30
    assert cfg.share_for("alice", ["phd"]) == 0.5
    assert cfg.share_for("bob", ["phd"]) == 3.0
    assert cfg.share_for("carol", []) == 2.0
    assert Config().share_for("x", []) == 1.0 and Config().keep_days == 365


def test_usage_and_history_survive_reopening_the_store(tmp_path: Path) -> None:
    clock = [1000.0]
    store = Store(tmp_path / "state.db")
    ledger = Ledger(store, Config, clock=lambda: clock[0])
    ran = Job(
        7, 1234, "alice", JobSpec(command=("x",), cwd="/", env=(), slots=2),
        JobState.FINISHED, 7, 0.0, start_time=900.0, end_time=1000.0, exit=ExitInfo(code=0),
    )
    store.db.execute("INSERT INTO jobs (id, uid, user, spec, state, ord, enqueue)"
                     " VALUES (7, 1234, 'alice', '{}', 'running', 7, 0)")
    ledger.save_ended(ran)
    ledger.charge(4321, 0.0, 10.0, at=1000.0)
    store.close()
    again = Ledger(Store(tmp_path / "state.db"), Config, clock=lambda: clock[0])
    assert math.isclose(again.usage_now(1234, []), 200.0, rel_tol=1e-3)
    assert again.usage_now(4321, []) == 40.0
    (row,) = again.stats(0.0, 1234)
    assert (row.jobs, row.failed, row.slot_seconds, row.mean_wait) == (1, 0, 200.0, 900.0)
    clock[0] = 1000.0 + 400 * 86400.0
    assert again.prune() == 1 and again.stats(0.0, None) == []


# The accounting table as older tsd made it: rows in insertion order, an index on the end.
_OLD_ACCOUNTING = (
    "CREATE TABLE accounting (job_id INTEGER NOT NULL, uid INTEGER NOT NULL,"
    " user TEXT NOT NULL, end_ REAL NOT NULL, slots INTEGER NOT NULL, gpus INTEGER NOT NULL,"
    " run_s REAL NOT NULL, wait_s REAL, failed INTEGER NOT NULL)",
    "CREATE INDEX accounting_end ON accounting(end_)",
)


def test_an_older_accounting_history_keeps_every_run_in_end_order_without_its_index(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE accounting")
    for stmt in _OLD_ACCOUNTING:
        db.execute(stmt)
    db.executemany(
        "INSERT INTO accounting VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(3, 1234, "alice", 3000.0, 1, 0, 10.0, 1.0, 0),
         (1, 1234, "alice", 1000.0, 2, 1, 50.0, 3.0, 1),
         (2, 4321, "bob", 2000.0, 1, 0, 20.0, None, 0),
         (2, 4321, "bob", 2000.0, 1, 0, 20.0, None, 0)],  # one run written twice
    )  # fmt: skip
    db.commit()
    db.close()
    clock = [3000.0]
    store = Store(path)
    ledger = Ledger(store, Config, clock=lambda: clock[0])
    (table,) = store.db.execute("SELECT sql FROM sqlite_master WHERE name='accounting'")
    assert "WITHOUT ROWID" in table[0]
    indexes = store.db.execute("SELECT name FROM sqlite_master WHERE type='index'").fetchall()
    assert ("accounting_end",) not in indexes
    assert [r[0] for r in store.db.execute("SELECT job_id FROM accounting")] == [1, 2, 3]
    alice, bob = ledger.stats(0.0, None)
    assert (alice.user, alice.jobs, alice.failed, alice.slot_seconds) == ("alice", 2, 1, 110.0)
    assert (bob.user, bob.jobs, bob.slot_seconds, bob.mean_wait) == ("bob", 1, 20.0, None)
    assert [r.jobs for r in ledger.stats(1500.0, None)] == [1, 1]
    store.close()
    again = Store(path)  # moved once: opening again changes nothing
    assert again.db.execute("SELECT COUNT(*) FROM accounting").fetchone() == (3,)
    clock[0] = 2500.0 + 365 * 86400.0
    assert Ledger(again, Config, clock=lambda: clock[0]).prune() == 2  # ended before 2500
    again.close()


def test_an_accounting_table_in_end_order_without_row_numbers_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE accounting")
    db.execute(_OLD_ACCOUNTING[0].replace(")", ", PRIMARY KEY (end_, job_id)) WITHOUT ROWID"))
    db.execute("INSERT INTO accounting VALUES (1, 1234, 'alice', 1000.0, 1, 0, 5.0, 0.0, 0)")
    db.commit()
    db.close()
    store = Store(path)
    assert store.db.execute("SELECT job_id, seq FROM accounting").fetchall() == [(1, 0)]
    assert store.unpaid_runs() == []  # a row from before: its usage is written
    store.close()


def test_waiting_reasons_name_the_reservation_and_the_user_fair_share_puts_first() -> None:
    keys = {1: 50.0, 2: 10.0, 3: 0.0}
    res = Resources(
        total_slots=2, limits=lambda uid: UserLimits(), free_gpus=(), now=0.0,
        fair_key=lambda uid: keys[uid], fair_floor=0.0,
    )
    active = [job(9, 3, state=JobState.RUNNING, start=0.0)]
    d = decide([job(1, 1), job(2, 2), job(3, 3, slots=2)], active, lambda i: DepOutcome.GONE, res)
    # user 2 (less usage than 1) takes the free slot; job 3 waits for 2 slots.
    assert [s.job_id for s in d.start] == [2]
    assert d.reasons[1] == "waiting for a free slot (2 of 2 in use); fair share: user u2 first"
    assert d.reasons[3].startswith("waiting for 2 free slots")
    res3 = Resources(total_slots=3, limits=lambda uid: UserLimits(), free_gpus=(), now=0.0)
    d = decide([job(3, 3, slots=3), job(4, 1)], active, lambda i: DepOutcome.GONE, res3)
    assert d.start == () and d.reserved == 3
    assert d.reasons[4] == "behind reservation for job 3"
    assert d.reasons[3] == "reserved: waits for 3 slots (2 of 3 free)"
    alone = decide([job(3, 3, slots=3)], active, lambda i: DepOutcome.GONE, res3)
    assert alone.reasons[3] == "waiting for 3 free slots (2 of 3 free)"  # holds nobody back


def test_stats_request_travels_and_bad_values_are_refused() -> None:
    from tsd import protocol
    from tsd.errors import BadRequest

    req = protocol.Stats(since=1.5e9, all_users=True)
    assert protocol.parse_request(protocol.request_to_wire(req)) == req
    assert protocol.parse_request({"v": protocol.PROTOCOL_VERSION, "op": "stats"}) == (
        protocol.Stats()
    )
    for bad in ("soon", -1, True):
        wire = {"v": protocol.PROTOCOL_VERSION, "op": "stats", "since": bad}
        try:
            protocol.parse_request(wire)
        except BadRequest as exc:
            assert exc.message.startswith("bad request: since:")
        else:
            raise AssertionError(f"since={bad!r} accepted")


def test_keys_count_running_jobs_as_they_run_and_divide_by_share(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    ledger = Ledger(store, Config, clock=lambda: 1000.0)
    ledger.charge(1, 100.0, 0.0, at=1000.0)
    running = [
        job(5, 2, slots=2, state=JobState.RUNNING, start=990.0),  # 2 slots for 10 s
        job(6, 9, state=JobState.RUNNING, start=0.0),  # not a waiting user: not asked for
    ]
    keys = ledger.keys(running, [1, 2, 3], {1: 2.0, 2: 1.0, 3: 4.0}.__getitem__)
    assert keys[1] == 50.0
    assert math.isclose(keys[2], 20.0, rel_tol=1e-4)
    assert keys[3] == 0.0 and 9 not in keys


def test_a_big_reserved_job_keeps_its_claim_once_what_it_waited_for_is_free() -> None:
    keys = {1: 100.0, 2: 0.0}  # user 2 goes first by fair share
    pending = [job(1, 1, slots=2), job(2, 2)]

    def decision(hint: int | None) -> list[int]:
        res = Resources(
            total_slots=2, limits=lambda uid: UserLimits(), free_gpus=(), now=0.0,
            fair_key=lambda uid: keys[uid], fair_floor=0.0, reserved_hint=hint,
        )
        return [s.job_id for s in decide(pending, [], lambda i: DepOutcome.GONE, res).start]

    assert decision(None) == [2]  # nothing reserved: fair share alone
    assert decision(1) == [1]  # job 1 waited for two slots: it takes them now
    one_slot = [job(3, 1), job(2, 2)]
    res = Resources(
        total_slots=1, limits=lambda uid: UserLimits(), free_gpus=(), now=0.0,
        fair_key=lambda uid: keys[uid], fair_floor=0.0, reserved_hint=3,
    )
    # A one-slot job needs nothing to pile up: fair share still decides.
    assert [s.job_id for s in decide(one_slot, [], lambda i: DepOutcome.GONE, res).start] == [2]


def test_gpu_use_outside_tsd_is_charged_to_its_owner_and_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    ledger = Ledger(store, Config, clock=lambda: 500.0)
    ledger.charge_gpu({7: 5.0, 8: 0.0})  # one sample: user 7 held a GPU for 5 s
    ledger.charge_gpu({7: 5.0})
    assert ledger.usage_now(7, []) == 40.0  # 10 GPU-seconds x gpu_weight 4
    assert ledger.usage_now(8, []) == 0.0
    store.close()
    assert Store(tmp_path / "state.db").load_usage() == {7: (40.0, 500.0)}
