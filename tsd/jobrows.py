"""Rows of the `jobs` table -> `Job` records, fast and compact, for the daemon's start.

The daemon reads every job at start (100,000 queued ones are a use it must
serve), so decoding a row is on the path of the start time and its records are
most of the daemon's memory. Two things make it cheaper than decoding each
row's JSON on its own, with the same result as `tsd.codec.spec_from_dict`:

* A spec is written by `tsd.codec.spec_to_dict` with `command` first. Jobs
  submitted the same way differ in their command only, so the rest of the JSON
  text (`, "cwd": ...}`) repeats: it is decoded once and its fields reused for
  every spec with the same text (a bounded cache; a text never seen before is
  decoded in full, as any row that does not start the usual way).
* Values that repeat across rows (user names, uids, working directories,
  program names, enqueue times of jobs submitted together) are one object
  each, not one per job.
* Records are built by `tsd.twin.record_builder`'s functions, which fill a
  record's slots directly: a frozen dataclass's own `__init__` sets each field
  through `object.__setattr__` by name, and was a third of the decoding time.

Pure: text and tuples in, records out (tsd.store runs the query).
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields, replace
from typing import Any

from tsd.codec import exit_from_dict, spec_from_dict
from tsd.model import Job, JobSpec, JobState
from tsd.twin import record_builder

# How a spec's JSON text starts (json.dumps's default separators, `command` first).
_HEAD = '{"command": '
# Distinct spec texts (without their command) remembered during one load.
_REST_CACHE = 1024
_STATES = {s.value: s for s in JobState}
_SPEC_FIELDS = tuple(f.name for f in fields(JobSpec) if f.name != "command")
# The fields a row holds, in the order of the query's columns (tsd.store.load_all).
_ROW_FIELDS = (
    "id", "uid", "user", "spec", "state", "order", "enqueue_time", "start_time", "end_time",
    "exit", "pid", "supervisor_pid", "supervisor_start", "gpu_ids", "gpu_uuids",
    "output_path", "unit", "attempts",
)  # fmt: skip

_new_spec = record_builder(JobSpec, [f.name for f in fields(JobSpec)])
_new_job = record_builder(Job, _ROW_FIELDS)


class RowDecoder:
    """Decodes the rows of one load (the caches live as long as the decoder)."""

    def __init__(self) -> None:
        # The C scanner itself (raw_decode wraps it in a Python frame per call).
        scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
        self._scan = scan
        self._rest: dict[str, tuple[Any, ...]] = {}
        self._uids: dict[int, int] = {}
        self._enqueue: float | None = None

    def spec(self, text: str) -> JobSpec:
        """A spec's JSON text (as the store holds it, without the environment) -> JobSpec."""
        if text.startswith(_HEAD):
            try:
                command, end = self._scan(text, len(_HEAD))
            except (StopIteration, ValueError):
                command = None
            if isinstance(command, list):
                rest = self._rest.get(text[end:]) or self._rest_fields(text[end:])
                if rest is not None:
                    if command and isinstance(command[0], str):
                        command[0] = sys.intern(command[0])  # the program: one object
                    return _new_spec(tuple(command), *rest)
        return spec_from_dict(json.loads(text))

    def _rest_fields(self, rest: str) -> tuple[Any, ...] | None:
        """The fields after `command`, from their text `, "cwd": ...}`, decoded once."""
        try:
            obj = json.loads('{"command": []' + rest)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        decoded = spec_from_dict(obj)
        decoded = replace(decoded, cwd=sys.intern(decoded.cwd))
        values = tuple(getattr(decoded, name) for name in _SPEC_FIELDS)
        if len(self._rest) < _REST_CACHE:
            self._rest[rest] = values
        return values

    def job(self, r: Sequence[Any]) -> Job:
        """One row of `SELECT id, uid, user, spec, state, ord, enqueue, start, end_, exit,
        pid, sup_pid, sup_start, gpu_ids, gpu_uuids, output, unit, attempts`."""
        enqueue = float(r[6])
        if enqueue == self._enqueue:
            enqueue = self._enqueue  # jobs submitted together (an --array) share one
        self._enqueue = enqueue
        ex = r[9]
        return _new_job(  # the fields of _ROW_FIELDS
            int(r[0]),
            self._uids.setdefault(r[1], int(r[1])),
            sys.intern(str(r[2])),
            self.spec(r[3]),
            _STATES.get(r[4]) or JobState(r[4]),
            int(r[5]),
            enqueue,
            r[7],
            r[8],
            exit_from_dict(json.loads(ex)) if ex else None,
            r[10],
            r[11],
            r[12],
            _int_tuple(r[13]),
            () if r[14] == "[]" else tuple(json.loads(r[14])),
            r[15],
            r[16],
            int(r[17] or 0),
        )


@contextmanager
def gc_paused_then_frozen() -> Iterator[None]:
    """No cyclic garbage collection in the block; at its end every object alive is
    frozen out of later collections (gc.freeze), and collection goes on as before.

    For the daemon's load: it makes a few objects per job that all live on and hold
    no cycles (what it drops is freed by its reference count). Collections during it
    find nothing, yet cost 0.15 s on 100,000 jobs, and each later full one would walk
    every record again (the first, right after the load, walked all 300,000 objects
    made in it). Frozen objects that later become cyclic garbage are not reclaimed:
    the records are freed by reference count, the rest (modules, the loop) live on.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _int_tuple(text: str) -> tuple[int, ...]:
    return () if text == "[]" else tuple(json.loads(text))
