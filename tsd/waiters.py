"""Clients parked until something happens to a job, or until a full queue has room.

`ts -w/-t/-c/-f` park on a job's end (and -t/-c first on its start); `ts` on a
full queue parks until the user's queue shrinks. The job table calls the
`started`/`ended`/`room` hooks (it sees every transition); the handlers await.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, TypeVar

from tsd.model import Job

F = TypeVar("F", bound="asyncio.Future[Any]")


class Waiters:
    """Futures keyed by job id, and one condition for "a queue got shorter"."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._ends: dict[int, list[asyncio.Future[Job | None]]] = defaultdict(list)
        self._starts: dict[int, list[asyncio.Future[None]]] = defaultdict(list)
        self._room = asyncio.Condition()
        self._room_waiting = 0  # blocked submitters: only they need a wake-up task

    # -- hooks the job table calls (tsd.jobtable.JobEvents)

    def started(self, job_id: int) -> None:
        """The job runs, or learnt its output path: wake its start waiters."""
        _wake(self._starts.pop(job_id, []))

    def ended(self, job_id: int, final: Job | None = None) -> None:
        """The job is done (`final`, its last record) or gone: wake everyone waiting on it.

        The record travels with the wake-up because a -nf job is forgotten before its
        waiter runs again.
        """
        for fut in self._ends.pop(job_id, []):
            if not fut.done():
                fut.set_result(final)
        self.started(job_id)

    def room(self) -> None:
        """A pending job left some queue: blocked submitters check again."""
        if self._room_waiting:
            self.loop.create_task(self._notify_room())

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    # -- what handlers await

    async def next_start(self, job_id: int) -> None:
        """Until job `job_id` starts or changes what it reports at start."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self._starts[job_id].append(fut)
        try:
            await fut
        finally:
            # Cancelled (a waiter that gave up: tsd.handlers.get_job's timeout, a client
            # gone): not left behind for a job that may run for days.
            _unlist(self._starts, job_id, fut)

    async def next_end(self, job_id: int) -> Job | None:
        """Until job `job_id` ends (its final record) or is removed (None)."""
        return await self.end_ticket(job_id)

    def end_ticket(self, job_id: int) -> asyncio.Future[Job | None]:
        """Job `job_id`'s end (its final record) or removal (None), waited for from now
        on: an end that comes before anyone awaits it is not missed. `drop_ticket` it
        when it will not be awaited."""
        fut: asyncio.Future[Job | None] = self.loop.create_future()
        self._ends[job_id].append(fut)
        return fut

    def drop_ticket(self, job_id: int, fut: asyncio.Future[Job | None]) -> None:
        """Forget an `end_ticket` (awaited, or never to be)."""
        _unlist(self._ends, job_id, fut)
        fut.cancel()

    async def room_freed(self) -> None:
        """Until some pending job leaves the queue."""
        self._room_waiting += 1
        try:
            async with self._room:
                await self._room.wait()
        finally:
            self._room_waiting -= 1

    def waiting_on(self, job_id: int) -> bool:
        """Whether a client waits for this job's end."""
        return bool(self._ends.get(job_id))

    def parked(self) -> int:
        """How many job futures are parked (tests check nothing leaks)."""
        return sum(len(v) for v in self._ends.values()) + sum(
            len(v) for v in self._starts.values()
        )


def _unlist(waiting: dict[int, list[F]], job_id: int, fut: F) -> None:
    """Take `fut` off job `job_id`'s futures (if still there), and the list once empty."""
    futures = waiting.get(job_id)
    if futures is not None and fut in futures:
        futures.remove(fut)
        if not futures:
            del waiting[job_id]


def _wake(futures: list[asyncio.Future[None]]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)
