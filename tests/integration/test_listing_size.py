"""A listing never fails because commands are long or full of characters JSON escapes.

JSON writes a `"` as 2 bytes and a control character as 6 (`\\u0001`), so a list
split into pieces by characters overflows the 1 MiB frame limit; pieces are sized
by their encoded bytes (issue 9).
"""

from __future__ import annotations

import json

from integration.harness import Runner, queue, wait_state

WORD = 60000  # two such words: a command near the 128 KiB limit, one argv string each


def queue_long(ts: Runner, char: str) -> int:
    """Queue `true` with two WORD-long words of `char`; it ends at once."""
    return queue(ts, "true", char * WORD, char * WORD)


def test_list_of_jobs_with_control_character_commands_is_sent_in_pieces(ts: Runner) -> None:
    # Each record is ~720 KB as JSON: two of them can never share a frame.
    ids = [queue_long(ts, "\x01") for _ in range(3)]
    for job in ids:
        wait_state(ts, job, "finished")
    listed = json.loads(ts("-M", "json").stdout)
    assert [j["ID"] for j in listed] == ids
    assert all(j["Command"] == "true " + "\x01" * WORD + " " + "\x01" * WORD for j in listed)
    text = ts("-l").stdout
    assert len(text.splitlines()) == 1 + len(ids)
    assert "\x01" not in text and "\\x01" * 10 in text  # escaped for the terminal


def test_list_of_many_jobs_with_quote_commands_never_fails(ts: Runner) -> None:
    # ~240 KB each as JSON (twice their characters): many pieces, each under 1 MiB.
    ids = [queue_long(ts, '"') for _ in range(12)]
    ids += [queue_long(ts, "\\") for _ in range(4)]
    for job in ids:
        wait_state(ts, job, "finished")
    listed = json.loads(ts("-M", "json").stdout)
    assert sorted(j["ID"] for j in listed) == ids
    assert len(ts("-l").stdout.splitlines()) == 1 + len(ids)
    info = ts("-i", str(ids[0])).stdout  # one record alone, too
    assert '"' * WORD in info
