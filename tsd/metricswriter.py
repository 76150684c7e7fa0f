"""Keeps the Prometheus textfile (config `metrics.textfile`) up to date.

At start, and then at most every `INTERVAL` seconds while the exposition
(tsd.metrics) changes, the daemon renders its state on the event loop and
hands the text to a worker thread, which writes a temporary file in the
target's directory (mode 0644) and renames it over the target, so that
node_exporter never reads half a file. A slow disk holds a worker thread,
never the event loop; a write still under way when the next one is due is
not doubled. A failure is one log line (again only when the reason changes),
never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from tsd.metrics import MetricsState, counters, render
from tsd.periodic import Periodic

log = logging.getLogger("tsd")

INTERVAL = 5.0  # seconds between two writes at most (node_exporter scrapes every 15 s or more)


def write_atomically(path: str, text: str) -> None:
    """Replace `path` with `text`: a temporary file in its directory, then a rename.

    Runs in a worker thread. The directory is created (0755) if missing, as
    node_exporter's package would have it.
    """
    import tempfile  # only with metrics on: keep it (and random, shutil) off the daemon's start

    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    # node_exporter reads only *.prom files: the temporary name ends otherwise.
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class MetricsWriter:
    """The textfile's timer: gathers, renders, and writes off the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        executor: Executor | None,
        path: Callable[[], str | None],
        gather: Callable[[], MetricsState],
        refresh_gpus: Callable[[], Awaitable[None]],
        interval: float = INTERVAL,
    ) -> None:
        self.loop = loop
        self._executor = executor
        self._path = path
        self._gather = gather
        self._refresh_gpus = refresh_gpus
        self.interval = interval
        self._last: tuple[str, str] | None = None  # (path, text) last written
        self._floors: dict[str, tuple[float, float]] = {}  # counters as last written
        self._problem = ""
        self._writing = False
        self._rounds = Periodic(
            self.loop, self._round, "metrics: writing the textfile failed", self.interval
        )

    def start(self) -> None:
        """Write now, then keep writing while the daemon runs."""
        self._rounds.start()

    async def stop(self) -> None:
        """Stop the timer (at shutdown); a write under way finishes in its thread."""
        await self._rounds.stop()

    async def _round(self) -> float:
        await self.tick()
        return self.interval

    async def tick(self) -> None:
        """One round: render the state and write it when it changed."""
        path = self._path()
        if path is None or self._writing:
            return
        await self._refresh_gpus()
        state = dataclasses.replace(self._gather(), floors=self._floors)
        text = render(state)
        if self._last == (path, text):
            return
        self._writing = True
        try:
            await self.loop.run_in_executor(self._executor, write_atomically, path, text)
        except OSError as exc:
            problem = f"{path}: {exc.strerror or exc}"
            if problem != self._problem:
                log.warning("metrics: cannot write %s", problem)
            self._problem = problem
            return
        finally:
            self._writing = False
        if self._problem:
            log.info("metrics: %s written again", path)
            self._problem = ""
        self._last = (path, text)
        self._floors = counters(state)
