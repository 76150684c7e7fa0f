"""Typed, bounded access to the JSON objects of requests: the checks every field passes.

A part of tsd.protocol (which validates every byte from a socket); kept apart so
that module stays readable. Every failure is a BadRequest naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from tsd.errors import BadRequest
from tsd.framing import MAX_TEXT

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ts a few ms at start and only mypy needs it here
    from typing import Any, TypeVar

    T = TypeVar("T")


class Fields:
    """Typed, bounded access to one JSON object; every failure is a BadRequest naming the key."""

    def __init__(self, obj: Mapping[str, Any], where: str) -> None:
        self.obj = obj
        self.where = where

    def _bad(self, key: str, what: str) -> BadRequest:
        return BadRequest(f"bad request: {self.where}{key}: {what}")

    def _get(self, key: str, default: T, check: Callable[[Any], bool], what: str) -> Any:
        if key not in self.obj or self.obj[key] is None:
            return default
        value = self.obj[key]
        if not check(value):
            raise self._bad(key, f"expected {what}")
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        return bool(self._get(key, default, lambda v: isinstance(v, bool), "true or false"))

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self._get(key, default, is_int, "an integer")
        if value is not None and not lo <= value <= hi:
            raise self._bad(key, f"{value} is out of range {lo}..{hi}")
        return None if value is None else int(value)

    def req_integer(self, key: str, lo: int, hi: int) -> int:
        value = self.integer(key, lo, hi)
        if value is None:
            raise self._bad(key, "missing")
        return value

    def number(self, key: str, lo: float, hi: float) -> float | None:
        value = self._get(key, None, is_num, "a number")
        if value is not None and not lo <= value <= hi:
            raise self._bad(key, f"{value} is out of range {lo}..{hi}")
        return None if value is None else float(value)

    def text(self, key: str, max_len: int = MAX_TEXT, default: str | None = None) -> str | None:
        value = self._get(key, default, lambda v: isinstance(v, str), "a string")
        if value is not None:
            check_text(value, max_len, lambda what: self._bad(key, what))
        return None if value is None else str(value)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.text(key, 64, default)
        if value not in choices:
            raise self._bad(key, f"expected one of {', '.join(choices)}")
        return str(value)

    def int_list(self, key: str, lo: int, hi: int, max_items: int) -> tuple[int, ...] | None:
        value = self._get(key, None, lambda v: isinstance(v, list), "a list")
        if value is None:
            return None
        if len(value) > max_items:
            raise self._bad(key, f"more than {max_items} items")
        if not all(is_int(v) and lo <= v <= hi for v in value):
            raise self._bad(key, f"expected integers in {lo}..{hi}")
        return tuple(int(v) for v in value)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def check_line(value: str | None, bad: Callable[[str], BadRequest]) -> None:
    """Refuse control characters in a value that ends up alone on a terminal line or
    in a path (label, log dir, -O, variable names): a newline there could forge a line
    in an admin's listing or the journal."""
    if value is not None and any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise bad("contains a control character (newline, tab, escape...)")


def check_text(value: str, max_len: int, bad: Callable[[str], BadRequest]) -> None:
    if len(value) > max_len:
        raise bad(f"longer than {max_len} characters")
    if "\0" in value:
        raise bad("contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("is not valid UTF-8") from None
