"""The ledger: every user's decayed usage (fair share) and the per-job history (`ts --stats`).

It owns the usage book (tsd.usage) and writes through the store: a job's end
and its accounting row go into one transaction (`Store.save_ended`), so the
history never misses an end nor counts one twice; its user's new usage is owed
(tsd.owedusage: written every few seconds, replayed from the history after a
crash), so usage survives restarts (table `usage`, one row per user).

`charge(uid, slot_seconds, gpu_seconds, at)` charges usage that did not come
from a tsd job to its owner; `charge_gpu` does so for GPU use outside tsd
(tsd.gpuwatch hands it each NVML sample's GPU-seconds per user).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from tsd.config import Config
from tsd.model import Job, JobState
from tsd.store import StatsRow
from tsd.usage import Running, Usage, UsageBook

log = logging.getLogger("tsd")

PRUNE_EVERY = 86400.0  # seconds between prunings of the history (and at start)


class LedgerStore(Protocol):
    """The part of tsd.store.Store the ledger writes through."""

    def save(self, *jobs: Job) -> None: ...

    def save_ended(
        self, job: Job, usage: tuple[int, float, float] | None, ran: Job | None = None
    ) -> None: ...

    def on_rollback(self, undo: Callable[[], None]) -> None: ...

    def load_usage(self) -> dict[int, tuple[float, float]]: ...

    def set_usage(self, uid: int, value: float, at: float) -> None: ...

    def set_usages(self, rows: Iterable[tuple[int, float, float]]) -> None: ...

    def stats(self, since: float, uid: int | None = None) -> list[StatsRow]: ...

    def prune_accounting(self, before: float) -> int: ...

    def unpaid_runs(self) -> list[tuple[int, str, int, int, float, float]]: ...

    def owe(
        self, usage: tuple[int, float, float] | None, user: str | None,
        slot_seconds: float, gpu_seconds: float,
    ) -> None: ...


def running_of(jobs: Iterable[Job], now: float) -> list[Running]:
    """What the jobs holding slots and GPUs are adding to their users' usage."""
    return [
        Running(
            j.uid, max(1, j.spec.slots), len(j.gpu_ids) or j.spec.gpus_wanted,
            j.start_time if j.start_time is not None else now,
        )
        for j in jobs
    ]


class Ledger:
    """Usage for fair share and the history of ended jobs, both durable."""

    def __init__(
        self,
        store: LedgerStore,
        config: Callable[[], Config],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._config = config
        self._clock = clock
        rows = {uid: Usage(v, at) for uid, (v, at) in store.load_usage().items()}
        self.book = UsageBook(config().fair_share, rows)
        # Runs whose usage the store had not written yet when the daemon stopped (or
        # crashed): owed again, as their ends owed them (tsd.owedusage).
        for uid, user, slots, gpus, run_s, end in store.unpaid_runs():
            usage = self.book.after_run(uid, slots, gpus, end - run_s, end)
            self.book.set(uid, usage)
            store.owe((uid, usage.value, usage.at), user, run_s * slots, run_s * gpus)

    def _sync(self) -> None:
        # A reload may change half_life or gpu_weight: the stored values stay valid.
        self.book.settings = self._config().fair_share

    def save_ended(self, job: Job, ran: Job | None = None) -> None:
        """Write a job's end (it just finished or was skipped) with its history row and
        its user's usage, in one transaction; memory follows only once it is stored.

        `ran`: the run that just ended when `job` is that job queued again (a failed
        --retry attempt, an idle-GPU requeue), so that no attempt is free.
        """
        self._sync()
        usage: Usage | None = None
        run = job if ran is None else ran
        if run.start_time is not None and (ran is not None or job.state is JobState.FINISHED):
            end = run.end_time if run.end_time is not None else self._clock()
            gpus = len(run.gpu_ids)
            usage = self.book.after_run(run.uid, max(1, run.spec.slots), gpus, run.start_time, end)
        row = None if usage is None else (job.uid, usage.value, usage.at)
        self.store.save_ended(job, row, ran)
        if usage is not None:
            before = self.book.usage(job.uid)
            self.book.set(job.uid, usage)
            # A grouped write (tsd.store) may still be rolled back: the book follows.
            self.store.on_rollback(lambda: self.book.set(job.uid, before))

    def charge(
        self, uid: int, slot_seconds: float, gpu_seconds: float, at: float | None = None
    ) -> Usage:
        """Charge usage to a user from any source (durable before it counts); the new usage."""
        self._sync()
        usage = self.book.after_charge(uid, slot_seconds, gpu_seconds, at or self._clock())
        self.store.set_usage(uid, usage.value, usage.at)
        self.book.set(uid, usage)
        return usage

    def charge_gpu(self, gpu_seconds: Mapping[int, float], at: float | None = None) -> None:
        """Charge GPU-seconds to several users at once (GPU use outside tsd, per sample),
        in one transaction."""
        self._sync()
        when = at or self._clock()
        rows = {
            uid: self.book.after_charge(uid, 0.0, seconds, when)
            for uid, seconds in gpu_seconds.items()
            if seconds > 0
        }
        if not rows:
            return
        self.store.set_usages([(uid, u.value, u.at) for uid, u in rows.items()])
        for uid, usage in rows.items():
            self.book.set(uid, usage)

    def keys(
        self, holding: Iterable[Job], uids: Iterable[int], share: Callable[[int], float]
    ) -> dict[int, float]:
        """Usage now (running jobs included) divided by share, for these users."""
        self._sync()
        now = self._clock()
        running = running_of(holding, now)
        wanted = list(dict.fromkeys(uids))
        shares = {uid: share(uid) for uid in wanted}
        keys = self.book.keys(now, running, shares)
        return {uid: keys.get(uid, 0.0) for uid in wanted}

    def usage_now(self, uid: int, holding: Iterable[Job]) -> float:
        """One user's usage now, running jobs included."""
        self._sync()
        now = self._clock()
        return self.book.now(uid, now, running_of(holding, now))

    def stats(self, since: float, uid: int | None) -> list[StatsRow]:
        """Per-user accounting of the jobs ended since `since` (every user's with uid None)."""
        return self.store.stats(since, uid)

    def prune(self) -> int:
        """Forget the history older than `accounting.keep_days`."""
        keep = self._config().keep_days * 86400.0
        gone = self.store.prune_accounting(self._clock() - keep)
        if gone:
            log.info("accounting: %d job records older than %d days pruned", gone,
                     self._config().keep_days)
        return gone
