"""A round of work run again and again on the daemon's event loop until stopped.

The metrics writer and the idle-GPU watch both need "do a round, sleep, repeat,
survive a surprise, stop cleanly at shutdown"; this is that loop, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("tsd")


class Periodic:
    """Runs `round_` (it returns the seconds until the next round) until `stop`.

    A round that raises is logged with `failure` and tried again after `retry`
    seconds: one bad round must not end the work for the daemon's lifetime.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        round_: Callable[[], Awaitable[float]],
        failure: str,
        retry: float,
    ) -> None:
        self.loop = loop
        self._round = round_
        self._failure = failure
        self._retry = retry
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin the rounds (the first one now); a second call does nothing."""
        if self._task is None:
            self._task = self.loop.create_task(self._run())

    async def stop(self) -> None:
        """End the rounds (at shutdown); work a round handed to a thread finishes there."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                delay = await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(self._failure)
                delay = self._retry
            await asyncio.sleep(delay)
