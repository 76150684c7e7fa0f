"""The personal daemon's log lines: the time made once a second, the same text as logging's."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from tsd.daemonlog import SecondFormatter

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("tsd", logging.INFO, __file__, 1, "job %d finished", (7,), None)
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it
    return record


@given(st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=20))
def test_each_line_reads_as_loggings_own_formatter_writes_it(times: list[float]) -> None:
    ours, theirs = SecondFormatter(FORMAT), logging.Formatter(FORMAT)
    for created in sorted(times) + times:  # forward in time, and back again
        record = _record(created)
        assert ours.format(record) == theirs.format(record)


def test_lines_within_one_second_share_its_text_and_the_next_second_is_new() -> None:
    ours = SecondFormatter(FORMAT)
    first = ours.format(_record(1_800_000_000.0015))
    same = ours.format(_record(1_800_000_000.9995))
    after = ours.format(_record(1_800_000_001.0))
    assert first[:19] == same[:19] != after[:19]
    assert first[19:23] == ",001" and same[19:23] == ",999" and after[19:23] == ",000"
