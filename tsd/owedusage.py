"""Usage rows and usage totals the store owes the disk, written every few seconds.

A job's end used to rewrite, in its own commit, its user's row of `usage` (fair
share) and of `usage_totals` (the Prometheus counters): two more b-trees, two
more WAL pages in the commit of each end, where the jobs row and the accounting
row are all that the end itself needs. Both are derived from the accounting
rows (a run's user, slots, GPUs, length and end), so the store keeps them owed,
in memory, and writes them (`pay`) once PAY_EVERY seconds have passed since the
last time, before any other write of usage, before the history is pruned, and
at close: in one transaction with the number (`seq`) of the last accounting row
they include (meta `derived_seq`).

A crash loses nothing: the next daemon's ledger replays the accounting rows
after that number (`unpaid_runs`, tsd.ledger) into what is owed again, and a
row is never counted twice, as what is owed and that number are written
together. Nothing reads the two tables but the store: `usage_totals` (here)
adds what is owed, and the ledger's usage book holds it already.

At open, the last row's number and the unpaid rows are found by reading the
whole history (`seq` has no index: that would be one more b-tree for each end to
write): two scans, ~50 ms for 400,000 rows here.

A part of the store (tsd.store.Store builds on `OwedUsage`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass, field

from tsd.errors import StorageFull
from tsd.groupcommit import GroupCommit

log = logging.getLogger("tsd")

PAY_EVERY = 2.0  # seconds between writes of what is owed, while jobs end

# The runs whose usage and totals may be owed: every accounting row after `derived_seq`
# that ran (slots > 0; a job that never ran adds nothing), in the order they were written.
_UNPAID = (
    "SELECT uid, user, slots, gpus, run_s, end_ FROM accounting"
    " WHERE seq > ? AND slots > 0 ORDER BY seq"
)


@dataclass
class Owed:
    """What the store owes the disk: users' usage rows, and additions to their totals."""

    usage: dict[int, tuple[float, float]] = field(default_factory=dict)  # uid -> (value, at)
    totals: dict[str, tuple[float, float]] = field(default_factory=dict)  # user -> seconds


class OwedUsage(GroupCommit):
    """Usage and usage totals, owed and paid (see the module docstring)."""

    _owed: Owed
    _paid = 0  # the last accounting row (seq) that the stored usage and totals include
    _seq = 0  # the last accounting row written
    _pay_at = 0.0  # monotonic time of the next payment
    _kept_for: object = None  # the open group's undo list, once it holds a copy of _owed

    def _init_owed(self) -> None:
        """At open, once the schema is there: how far the stored usage goes."""
        row = self.db.execute("SELECT value FROM meta WHERE key='derived_seq'").fetchone()
        self._paid = int(row[0]) if row else 0
        (top,) = self.db.execute("SELECT MAX(seq) FROM accounting").fetchone()
        self._seq = max(self._paid, int(top or 0))
        self._owed = Owed()
        self._pay_at = time.monotonic() + PAY_EVERY

    def _next_seq(self) -> int:
        """The number of the accounting row about to be written (a rolled-back one leaves
        a gap, which is harmless: only the order counts)."""
        self._seq += 1
        return self._seq

    def owe(
        self, usage: tuple[int, float, float] | None, user: str | None,
        slot_seconds: float, gpu_seconds: float,
    ) -> None:
        """Owe a user's new usage (uid, value, at) and a run's slot- and GPU-seconds to
        `user`'s totals; right after the write of the accounting row they come from (a
        rollback of its group puts back what was owed before). Paid later: at a job's
        end once due (`pay_if_due`), never here, so that a replay (tsd.ledger) owes all
        its rows before any of them counts as paid."""
        self._keep_owed()
        if usage is not None:
            self._owed.usage[usage[0]] = (usage[1], usage[2])
        if user is not None and (slot_seconds > 0 or gpu_seconds > 0):
            slot_s, gpu_s = self._owed.totals.get(user, (0.0, 0.0))
            self._owed.totals[user] = (slot_s + max(0.0, slot_seconds),
                                       gpu_s + max(0.0, gpu_seconds))  # fmt: skip

    def pay_if_due(self) -> None:
        """Pay what is owed once PAY_EVERY seconds have passed since the last payment."""
        if time.monotonic() >= self._pay_at:
            try:
                self.pay()
            except (StorageFull, sqlite3.Error) as exc:
                # The end that owed it is written: it must not fail for this. Still
                # owed, tried again in a while (and replayed after a crash meanwhile).
                self._pay_at = time.monotonic() + PAY_EVERY
                log.warning("usage not written, tried again in %.0fs: %s", PAY_EVERY, exc)

    def pay(self) -> None:
        """Write what is owed, and how far it goes, in one transaction. With nothing
        owed, nothing: a store that no ledger replayed into leaves its unpaid rows be."""
        owed = self._owed
        if not owed.usage and not owed.totals:
            return
        seq = self._seq
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO usage VALUES (?, ?, ?)",
                                [(uid, v, at) for uid, (v, at) in owed.usage.items()])  # fmt: skip
            for user, (slot_s, gpu_s) in owed.totals.items():
                self._add_totals(user, slot_s, gpu_s)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('derived_seq', ?)", (str(seq),))
        self._keep_owed()
        self._owed, self._paid = Owed(), seq
        self._pay_at = time.monotonic() + PAY_EVERY

    def _pay_at_close(self) -> None:
        """Pay before the database closes; when that fails, the next start replays."""
        try:
            self.pay()
        except (StorageFull, sqlite3.Error) as exc:
            log.warning("usage not written at close (replayed at the next start): %s", exc)

    def unpaid_runs(self) -> list[tuple[int, str, int, int, float, float]]:
        """The runs that the stored usage and totals do not include yet (uid, user, slots,
        GPUs, run seconds, end), in the order they were written: for the ledger to owe
        again at its start (a crash came before their payment)."""
        return [
            (int(u), str(n), int(s), int(g), float(r), float(e))
            for u, n, s, g, r, e in self.db.execute(_UNPAID, (self._paid,))
        ]

    def usage_totals(self) -> dict[str, tuple[float, float]]:
        """Every user's (slot-seconds, GPU-seconds) of ended runs, ever (what is owed
        included)."""
        rows = self.db.execute("SELECT user, slot_seconds, gpu_seconds FROM usage_totals")
        totals = {str(u): (float(s), float(g)) for u, s, g in rows}
        for user, (slot_s, gpu_s) in self._owed.totals.items():
            before = totals.get(user, (0.0, 0.0))
            totals[user] = (before[0] + slot_s, before[1] + gpu_s)
        return totals

    def _keep_owed(self) -> None:
        """Before what is owed changes inside an open group: a copy, put back if that
        group is rolled back (one copy a group: a rollback undoes all of it)."""
        if not self.db.in_transaction or self._kept_for is self._undo:
            return
        kept = Owed(dict(self._owed.usage), dict(self._owed.totals)), self._paid
        self._kept_for = self._undo

        def put_back() -> None:
            self._owed, self._paid = kept

        self.on_rollback(put_back)

    def _add_totals(self, user: str, slot_seconds: float, gpu_seconds: float) -> None:
        """Add to a user's totals in the open write (`pay`, and tsd.store's save_run)."""
        if slot_seconds <= 0 and gpu_seconds <= 0:
            return  # a job that never ran: no row for a user who never used anything
        self.db.execute(
            "INSERT INTO usage_totals VALUES (?, ?, ?) ON CONFLICT(user) DO UPDATE SET"
            " slot_seconds = slot_seconds + excluded.slot_seconds,"
            " gpu_seconds = gpu_seconds + excluded.gpu_seconds",
            (user, max(0.0, slot_seconds), max(0.0, gpu_seconds)),
        )
