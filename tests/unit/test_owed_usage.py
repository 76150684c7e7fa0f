"""Usage and usage totals owed by the store (tsd.owedusage): a job's end writes its row
and its history; its user's usage and totals follow every few seconds, and a crash
before that loses nothing and counts nothing twice."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from pathlib import Path

import pytest
from unit.daemon_fakes import Events, spec
from unit.test_group_commit import CommitsFail

from tsd import owedusage
from tsd.config import Config
from tsd.errors import StorageFull
from tsd.jobtable import JobTable
from tsd.ledger import Ledger
from tsd.model import ExitInfo, Job
from tsd.store import Store


class Daemon:
    """A store, its ledger and its job table, as the daemon puts them together."""

    def __init__(self, path: Path) -> None:
        self.store = Store(path / "state.db")
        self.ledger = Ledger(self.store, Config)
        self.table = JobTable(self.store, Events(), lambda: 1000,
                              save_end=self.ledger.save_ended)  # fmt: skip

    def run(self, uid: int, user: str, seconds: float, slots: int = 1,
            gpus: tuple[int, ...] = ()) -> None:  # fmt: skip
        """A job of `user` that ran `seconds` on `slots` slots and these GPUs, ended."""
        job = self.table.add(uid, user, spec(slots=slots, gpus=len(gpus)))
        self.table.begin_run(job, gpus, tuple(f"GPU-{i}" for i in gpus))
        started: Job = self.table.launched(job.id, 4242, 1, None)
        assert started.start_time is not None
        self.table.finish(job.id, ExitInfo(code=0), started.start_time + seconds, None)

    def usage(self, uid: int) -> float:
        return self.ledger.usage_now(uid, [])

    def crash(self) -> None:
        """The daemon dies: what is committed stays, what is owed is not written."""
        self.store.db.close()


def stored(path: Path) -> tuple[dict[int, float], dict[str, tuple[float, float]]]:
    """The usage and usage_totals tables as another reader sees them."""
    db = sqlite3.connect(path / "state.db")
    try:
        usage = {int(u): float(v) for u, v in db.execute("SELECT uid, value FROM usage")}
        rows = db.execute("SELECT user, slot_seconds, gpu_seconds FROM usage_totals")
        totals = {str(u): (float(s), float(g)) for u, s, g in rows}
        return usage, totals
    finally:
        db.close()


def test_an_end_owes_its_usage_and_totals_which_count_at_once_and_are_written_at_close(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path)
    d.run(1000, "alice", 10.0, slots=2, gpus=(0,))
    assert stored(tmp_path) == ({}, {})  # the end's commit held its row and history only
    assert d.usage(1000) == pytest.approx(20.0 + 4 * 10.0, rel=1e-3)
    assert d.store.usage_totals() == {"alice": (pytest.approx(20.0), pytest.approx(10.0))}
    assert len(d.store.unpaid_runs()) == 1
    d.store.close()
    usage, totals = stored(tmp_path)
    assert usage[1000] == pytest.approx(60.0, rel=1e-3)
    assert totals == {"alice": (pytest.approx(20.0), pytest.approx(10.0))}
    again = Daemon(tmp_path)
    assert again.store.unpaid_runs() == []
    assert again.usage(1000) == pytest.approx(60.0, rel=1e-3)
    assert again.store.usage_totals() == {"alice": (pytest.approx(20.0), pytest.approx(10.0))}
    again.store.close()


def test_usage_owed_at_a_crash_is_replayed_at_the_next_start_and_counted_once(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path)
    d.run(1000, "alice", 10.0)
    d.store.close()  # paid: 10 slot-seconds on disk
    d = Daemon(tmp_path)
    d.run(1000, "alice", 5.0, slots=2)
    d.run(2000, "bob", 3.0, gpus=(1, 2))
    usage = {uid: d.usage(uid) for uid in (1000, 2000)}
    totals = d.store.usage_totals()
    d.crash()
    assert stored(tmp_path)[1]["alice"] == (pytest.approx(10.0), 0.0)  # as paid before
    again = Daemon(tmp_path)
    assert {uid: again.usage(uid) for uid in (1000, 2000)} == pytest.approx(usage, rel=1e-6)
    assert again.store.usage_totals() == {u: pytest.approx(t) for u, t in totals.items()}
    again.store.close()
    third = Daemon(tmp_path)  # paid now: nothing is replayed twice
    assert third.store.unpaid_runs() == []
    assert {uid: third.usage(uid) for uid in (1000, 2000)} == pytest.approx(usage, rel=1e-6)
    assert third.store.usage_totals() == {u: pytest.approx(t) for u, t in totals.items()}
    assert totals["bob"] == (pytest.approx(3.0), pytest.approx(6.0))
    third.store.close()


def test_usage_owed_is_written_once_the_payment_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owedusage, "PAY_EVERY", 0.0)
    d = Daemon(tmp_path)
    d.run(1000, "alice", 10.0)
    usage, totals = stored(tmp_path)
    assert math.isclose(usage[1000], 10.0, rel_tol=1e-3) and totals == {"alice": (10.0, 0.0)}
    assert d.store.unpaid_runs() == []
    d.crash()
    assert Daemon(tmp_path).usage(1000) == pytest.approx(10.0, rel=1e-3)


def test_a_charge_pays_what_is_owed_first_and_each_counts_once_after_a_crash(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path)
    d.run(1000, "alice", 10.0)
    d.ledger.charge(1000, 0.0, 5.0)  # GPU use outside tsd: 4 x 5 with the default weight
    assert d.usage(1000) == pytest.approx(30.0, rel=1e-3)
    d.crash()
    assert stored(tmp_path)[0][1000] == pytest.approx(30.0, rel=1e-3)
    again = Daemon(tmp_path)
    assert again.usage(1000) == pytest.approx(30.0, rel=1e-3)
    assert again.store.usage_totals() == {"alice": (pytest.approx(10.0), 0.0)}
    again.store.close()


def test_a_group_rolled_back_takes_back_the_usage_it_owed(tmp_path: Path) -> None:
    async def body() -> None:
        d = Daemon(tmp_path)
        d.store.group(asyncio.get_running_loop())
        d.run(1000, "alice", 10.0)
        await d.table.durable()
        failing = CommitsFail(d.store.db)
        d.store.db = failing  # type: ignore[assignment]
        d.run(1000, "alice", 7.0)
        with pytest.raises(StorageFull):
            await d.table.durable()
        assert d.store.usage_totals() == {"alice": (pytest.approx(10.0), 0.0)}
        assert d.usage(1000) == pytest.approx(10.0, rel=1e-3)
        failing.failing = False
        d.store.close()
        usage, totals = stored(tmp_path)
        assert totals == {"alice": (pytest.approx(10.0), 0.0)}
        assert usage[1000] == pytest.approx(10.0, rel=1e-3)

    asyncio.run(body())


def test_an_end_whose_payment_fails_is_still_recorded_and_its_usage_paid_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(owedusage, "PAY_EVERY", 0.0)
    d = Daemon(tmp_path)
    d.store.db.execute("CREATE TRIGGER nospace BEFORE INSERT ON usage_totals BEGIN "
                       "SELECT RAISE(ABORT, 'disk full'); END")
    d.run(1000, "alice", 10.0)  # its payment fails: the end stands, the usage stays owed
    assert [j.state.value for j in d.store.load_all()] == ["finished"]
    assert stored(tmp_path) == ({}, {})
    assert d.store.usage_totals() == {"alice": (pytest.approx(10.0), 0.0)}
    d.store.db.execute("DROP TRIGGER nospace")
    d.store.close()
    usage, totals = stored(tmp_path)
    assert totals == {"alice": (pytest.approx(10.0), 0.0)}
    assert usage[1000] == pytest.approx(10.0, rel=1e-3)


def test_a_replay_owes_every_unpaid_run_before_it_pays_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = Daemon(tmp_path)
    d.run(1000, "alice", 10.0)
    d.run(2000, "bob", 4.0)
    d.crash()
    monkeypatch.setattr(owedusage, "PAY_EVERY", 0.0)  # a payment is due at once
    again = Daemon(tmp_path)
    # A payment in the middle would count every run as paid with only the first owed:
    # the next crash would lose the others.
    assert stored(tmp_path) == ({}, {})
    assert len(again.store.unpaid_runs()) == 2
    again.run(1000, "alice", 1.0)  # the next end pays all of it
    usage, totals = stored(tmp_path)
    assert totals == {"alice": (pytest.approx(11.0), 0.0), "bob": (pytest.approx(4.0), 0.0)}
    assert usage == {1000: pytest.approx(11.0, rel=1e-3), 2000: pytest.approx(4.0, rel=1e-3)}
    assert again.store.unpaid_runs() == []
