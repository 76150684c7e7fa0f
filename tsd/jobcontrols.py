"""The job controls' values as `ts` spells them: `--begin WHEN` and `--array SPEC`.

Pure text -> value functions, shared by the command line (tsd.cli_options, which
turns a ValueError into one `ts: invalid value for --begin: ...` line) and the
daemon (tsd.protocol checks an array spec again: nothing from a socket is
trusted). Light on purpose: `ts` imports it on every call, so the date parsing
loads only when a `--begin` is given.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from collections.abc import Mapping
    from typing import Any

MAX_ARRAY = 10_000  # elements of one --array
MAX_ARRAY_INDEX = 1_000_000_000
MAX_RETRY = 100
PRIORITY_RANGE = (-100, 100)
# --begin: at most this far ahead (seconds); also the daemon's bound on the wire.
MAX_BEGIN_AHEAD = 10 * 366 * 86400

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
WHEN_SHAPES = "+90s, +30m, +2h, HH:MM or an ISO time such as 2026-12-03T08:00"


def _int(word: str, what: str) -> int:
    if not (word.isascii() and word.isdigit()):
        raise ValueError(f"{word!r} is not {what}")
    return int(word)


def parse_when(text: str, now: float) -> float:
    """`--begin WHEN` as epoch seconds: `+90s`/`+30m`/`+2h`/`+1d` from `now`, `HH:MM`
    (the next such local time), or an ISO date and time (local unless it names a zone).

    Raises ValueError with one line for anything else, or a time in the past.
    """
    word = text.strip()
    if word.startswith("+"):
        body, unit = word[1:], "s"
        if body and body[-1] in _UNITS:
            body, unit = body[:-1], body[-1]
        if not (body.isascii() and body.isdigit()):
            raise ValueError(f"{text!r} is not a time: expected {WHEN_SHAPES}")
        ahead = int(body) * _UNITS[unit]
        if ahead > MAX_BEGIN_AHEAD:
            raise ValueError(f"{text} is too far ahead")
        return now + ahead
    import time

    parts = word.split(":")
    if len(parts) in (2, 3) and all(p.isascii() and p.isdigit() and len(p) <= 2 for p in parts):
        hour, minute = int(parts[0]), int(parts[1])
        second = int(parts[2]) if len(parts) == 3 else 0
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{text!r} is not a time of day (HH:MM)")
        today = time.localtime(now)
        fields = (today.tm_year, today.tm_mon, today.tm_mday, hour, minute, second, 0, 0, -1)
        when = time.mktime(fields)
        if when <= now:  # that time today has passed: the same time tomorrow
            fields = (today.tm_year, today.tm_mon, today.tm_mday + 1, hour, minute, second,
                      0, 0, -1)  # fmt: skip
            when = time.mktime(fields)
        return when
    from datetime import datetime

    try:
        parsed = datetime.fromisoformat(word)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: expected {WHEN_SHAPES}") from None
    when = parsed.timestamp()  # naive: local time
    if when < now:
        raise ValueError(f"{text} is in the past")
    if when - now > MAX_BEGIN_AHEAD:
        raise ValueError(f"{text} is too far ahead")
    return when


def parse_array(text: str) -> tuple[tuple[int, ...], int | None]:
    """`--array SPEC`: `A-B`, `A-B:STEP` or `A,B,C`, optionally `%K`; the indices in
    order and K (None without `%`). Raises ValueError with one line."""
    spec, pct, throttle_text = text.partition("%")
    throttle = None
    if pct:
        throttle = _int(throttle_text, "a number of elements (after %)")
        if throttle < 1:
            raise ValueError("%K must be at least 1")
    if "-" in spec:
        rng, colon, step_text = spec.partition(":")
        first_text, _, last_text = rng.partition("-")
        first = _int(first_text, "an array index")
        last = _int(last_text, "an array index")
        step = _int(step_text, "a step") if colon else 1
        if step < 1:
            raise ValueError("the step must be at least 1")
        if last < first:
            raise ValueError(f"{rng}: the range ends before it starts")
        if last > MAX_ARRAY_INDEX:
            raise ValueError(f"index {last} is over {MAX_ARRAY_INDEX}")
        count = (last - first) // step + 1
        if count > MAX_ARRAY:
            raise ValueError(f"{count} elements, over the limit of {MAX_ARRAY}")
        return tuple(range(first, last + 1, step)), throttle
    if ":" in spec:
        raise ValueError(f"{text!r}: a step needs a range (A-B:STEP)")
    words = spec.split(",")
    if len(words) > MAX_ARRAY:
        raise ValueError(f"{len(words)} elements, over the limit of {MAX_ARRAY}")
    indices = tuple(_int(w, "an array index") for w in words)
    if max(indices) > MAX_ARRAY_INDEX:
        raise ValueError(f"index {max(indices)} is over {MAX_ARRAY_INDEX}")
    if len(set(indices)) != len(indices):
        raise ValueError("an index is repeated")
    return indices, throttle


def _bounded(obj: Mapping[str, Any], key: str, lo: float, hi: float, integer: bool) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"spec.{key}: expected {kind} in {lo:g}..{hi:g}")
    return value


def spec_controls(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The job controls of a spec from the wire, checked (ValueError names the key)."""
    lo, hi = PRIORITY_RANGE
    retry = _bounded(obj, "retry", 0, MAX_RETRY, True) or 0
    if retry and obj.get("output_name") is not None:
        raise ValueError("--retry cannot be used with -O (each attempt writes a new file)")
    begin = _bounded(obj, "begin", 0, 1e11, False)
    return {
        "begin": None if begin is None else float(begin),
        "priority": _bounded(obj, "priority", lo, hi, True) or 0,
        "retry": retry,
        "array_job": _bounded(obj, "array_job", 1, 2**53, True),
        "array_task": _bounded(obj, "array_task", 0, MAX_ARRAY_INDEX, True),
        "array_throttle": _bounded(obj, "array_throttle", 1, MAX_ARRAY, True),
    }


def check_submit(array: str | None, store_output: bool, output_name: str | None) -> None:
    """What a submit's --array may not be combined with (ValueError, one line)."""
    if array is None:
        return
    parse_array(array)
    if not store_output:
        raise ValueError("--array cannot be used with -n (one terminal, many jobs)")
    if output_name is not None:
        raise ValueError("--array cannot be used with -O (each element writes its own file)")
