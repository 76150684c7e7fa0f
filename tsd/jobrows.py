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

Pure: text and tuples in, records out (tsd.store runs the query).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from tsd.codec import exit_from_dict, spec_from_dict
from tsd.model import Job, JobSpec, JobState

# How a spec's JSON text starts (json.dumps's default separators, `command` first).
_HEAD = '{"command": '
# Distinct spec texts (without their command) remembered during one load.
_REST_CACHE = 1024
_STATES = {s.value: s for s in JobState}
_SPEC_FIELDS = tuple(f.name for f in fields(JobSpec) if f.name != "command")


class RowDecoder:
    """Decodes the rows of one load (the caches live as long as the decoder)."""

    def __init__(self) -> None:
        # The C scanner itself (raw_decode wraps it in a Python frame per call).
        scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
        self._scan = scan
        self._rest: dict[str, dict[str, Any]] = {}
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
                    return JobSpec(tuple(command), **rest)
        return spec_from_dict(json.loads(text))

    def _rest_fields(self, rest: str) -> dict[str, Any] | None:
        """The fields after `command`, from their text `, "cwd": ...}`, decoded once."""
        try:
            obj = json.loads('{"command": []' + rest)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        decoded = spec_from_dict(obj)
        kwargs = {name: getattr(decoded, name) for name in _SPEC_FIELDS}
        kwargs["cwd"] = sys.intern(kwargs["cwd"])
        if len(self._rest) < _REST_CACHE:
            self._rest[rest] = kwargs
        return kwargs

    def job(self, r: Sequence[Any]) -> Job:
        """One row of `SELECT id, uid, user, spec, state, ord, enqueue, start, end_, exit,
        pid, sup_pid, sup_start, gpu_ids, gpu_uuids, output, unit, attempts`."""
        enqueue = float(r[6])
        if enqueue == self._enqueue:
            enqueue = self._enqueue  # jobs submitted together (an --array) share one
        self._enqueue = enqueue
        ex = r[9]
        return Job(
            id=int(r[0]),
            uid=self._uids.setdefault(r[1], int(r[1])),
            user=sys.intern(str(r[2])),
            spec=self.spec(r[3]),
            state=_STATES.get(r[4]) or JobState(r[4]),
            order=int(r[5]),
            enqueue_time=enqueue,
            start_time=r[7],
            end_time=r[8],
            exit=exit_from_dict(json.loads(ex)) if ex else None,
            pid=r[10],
            supervisor_pid=r[11],
            supervisor_start=r[12],
            gpu_ids=_int_tuple(r[13]),
            gpu_uuids=() if r[14] == "[]" else tuple(json.loads(r[14])),
            output_path=r[15],
            unit=r[16],
            attempts=int(r[17] or 0),
        )


def _int_tuple(text: str) -> tuple[int, ...]:
    return () if text == "[]" else tuple(json.loads(text))
