"""The daemon's log: journald's on the system service, a capped file for a personal daemon.

A personal daemon writes `tsd.log` in its state directory, two lines a job (queued,
finished: ~160 bytes), for as long as its user keeps it: without a cap that file
grows for good. Past LOG_MAX_BYTES (`TSD_LOG_MAX_BYTES` in the daemon's environment)
it becomes `tsd.log.1`, the older `.1` becomes `.2`, the one before is dropped, and
a new `tsd.log` starts: at most three files of about that size. The system service
logs to stderr, which journald keeps and rotates.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

LOG_MAX_BYTES = 8 << 20  # one file of the personal daemon's log: ~50,000 jobs
LOG_BACKUPS = 2  # older files kept beside it: tsd.log.1, tsd.log.2
LINE_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def max_bytes(env: dict[str, str]) -> int:
    """The cap of one log file: TSD_LOG_MAX_BYTES (a positive number of bytes), else
    LOG_MAX_BYTES."""
    try:
        value = int(env.get("TSD_LOG_MAX_BYTES", ""))
    except ValueError:
        return LOG_MAX_BYTES
    return value if value > 0 else LOG_MAX_BYTES


def setup(system: bool, state_dir: Path, env: dict[str, str]) -> None:
    """Send the daemon's log records where its mode keeps them."""
    # The formats below use none of the caller's file and line, thread or process: a
    # record that skips collecting them costs a third less (a line per job ended). These
    # are logging's documented switches (the logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if system:
        # journald adds time and unit; keep lines short.
        logging.basicConfig(
            level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr
        )
    else:
        handler = CappedFileHandler(state_dir / "tsd.log", max_bytes(env), LOG_BACKUPS)
        handler.setFormatter(SecondFormatter(LINE_FORMAT))
        logging.basicConfig(level=logging.INFO, handlers=[handler])


class CappedFileHandler(logging.FileHandler):
    """A log file kept under `cap` bytes (about: characters are counted), `backups`
    older ones beside it (NAME.1 the newest of them).

    logging.handlers.RotatingFileHandler asks the file for its size at every record and
    formats each record twice for that; this one counts what it writes, from the
    file's size at its start (a daemon started on a large log moves it aside at its
    first line)."""

    def __init__(self, path: Path, cap: int, backups: int) -> None:
        super().__init__(path, encoding="utf-8")
        self.cap = cap
        self.backups = max(1, backups)
        self._size = self._file_size()

    def _file_size(self) -> int:
        try:
            return os.fstat(self.stream.fileno()).st_size if self.stream is not None else 0
        except (OSError, ValueError):
            return 0

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record's line, moving the file aside first when it would pass the cap."""
        try:
            line = self.format(record) + self.terminator
            if self._size and self._size + len(line) > self.cap:
                self._move_aside()
            if self.stream is None:
                self.stream = self._open()
            self.stream.write(line)
            self.stream.flush()
            self._size += len(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _move_aside(self) -> None:
        """tsd.log -> tsd.log.1 -> ... -> tsd.log.<backups> (dropped past that), and a
        new tsd.log. A rename that fails (a read-only or full directory) leaves the file
        growing: the next try comes after another `cap` bytes, not at every line."""
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()
        self._size = 0
        base = self.baseFilename
        try:
            for n in range(self.backups - 1, 0, -1):
                if os.path.exists(f"{base}.{n}"):
                    os.replace(f"{base}.{n}", f"{base}.{n + 1}")
            os.replace(base, f"{base}.1")
        except OSError:
            pass
        self.stream = self._open()


class SecondFormatter(logging.Formatter):
    """logging's default time format (`2026-12-03 18:53:32,081`), with the part before
    the milliseconds made once a second rather than once a line (localtime and
    strftime are a third of the cost of a busy daemon's line per job)."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The record's local time, as logging.Formatter writes it without a datefmt."""
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
        return f"{self._text},{int(record.msecs):03d}"
