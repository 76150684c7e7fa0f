"""Frames on the wire, and the protocol's limits: the light half of the protocol.

A frame is a 4-byte big-endian length and a UTF-8 JSON object. This module
needs only _struct and the json package's C half (`_json`), so the `ts` client
can send any request without loading the typed requests (tsd.protocol, which
re-exports all of this).

`_json` is a shared library (lib-dynload), ~0.3 ms to find and load, and is loaded
on first use, not at import: the `ts` client writes its request with `plain_dumps`
(pure Python, the same bytes) and loads `_json` once the request is out
(`ready_to_decode`), while the daemon works on it, instead of before it leaves.
"""

# No `from __future__ import annotations` here: this module is on the way of
# `ts COMMAND` (tsd.plainsubmit), and that import loads __future__ (0.12 ms of each
# call). Annotations that name what only mypy imports are strings instead.

# struct.py only re-exports this built-in module: one file fewer for every `ts` call.
from _struct import Struct

from tsd.errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs a few ms at import and is needed only by mypy
    from collections.abc import Mapping
    from typing import Any

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20  # 1 MiB: frames above this are refused and the connection closed
HEADER = Struct(">I")

MAX_ID = 2**53  # ids travel as JSON numbers
MAX_ARGS = 65536
MAX_COMMAND = 131072  # characters in all of a command's words (Linux: one argument's limit)
LIST_CHUNK = 512 * 1024  # rough bytes of job records per frame of a long list
MAX_ENV = 16384
MAX_TEXT = 1 << 16
MAX_DEPENDS = 4096
MAX_SLOTS = 65536
MAX_GPUS = 1024
MAX_TIMEOUT = 10 * 365 * 86400.0
MAX_GPU_MEM = 1 << 30  # MiB (1 PiB): --gpu-mem's ceiling on the wire; GPUs refuse far less


class Encoded(dict):  # type: ignore[type-arg]
    """A frame's object together with its body, already encoded by whoever built it
    (a piece of a long listing, encoded once to be sized): `encode` sends that body."""

    __slots__ = ("body",)

    def __init__(self, body: bytes, obj: "Mapping[str, Any]") -> None:
        super().__init__(obj)
        self.body = body


def encode(obj: "Mapping[str, Any]", plain: bool = False) -> bytes:
    """One frame: length header plus compact JSON. Refuses to build an oversized frame.
    `plain`: written by `plain_dumps`, without loading `_json` (the client's requests)."""
    if type(obj) is Encoded:
        body = obj.body
    else:
        body = (plain_dumps(obj) if plain else dumps(obj)).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    """Length announced by a header; refuses oversized frames before reading them."""
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    return int(length)


def decode(body: bytes) -> "dict[str, Any]":
    """Parse a frame body into a JSON object, or raise ProtocolError."""
    try:
        obj = loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed frame: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed frame: expected a JSON object")
    return obj


# ------------------------------------------------------------------ JSON
# json.dumps(obj, separators=(",", ":"), ensure_ascii=False) and json.loads(text),
# byte for byte, from the C accelerators those very calls use (CPython's _json).
# The json package around them compiles a few regular expressions at import: a
# tenth of a quick `ts` call.

_WHITESPACE = " \t\n\r"


def _not_serializable(o: "Any") -> "Any":
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


class _DecodeContext:
    """What json.decoder.JSONDecoder() gives the C scanner: the defaults of json.loads."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                      "NaN": float("nan")}.__getitem__  # fmt: skip
    memo: dict[str, str] = {}


_c: "Any" = None  # the _json module, once loaded (`_accelerator`)
_scan: "Any" = None  # its scanner with json.loads' defaults


def _accelerator() -> "Any":
    """The _json module, loaded on the first call (see the module docstring)."""
    global _c, _scan
    if _c is None:
        import _json

        _scan = _json.make_scanner(_DecodeContext())  # type: ignore[arg-type]
        _c = _json
    return _c


def ready_to_decode() -> None:
    """Load what `loads` needs now (a client whose request is out: the daemon works
    on it meanwhile)."""
    _accelerator()


def dumps(obj: "Any") -> str:
    """json.dumps(obj, separators=(",", ":"), ensure_ascii=False)."""
    c = _c or _accelerator()
    encode = c.make_encoder(
        {}, _not_serializable, c.encode_basestring, None, ":", ",", False, False, True
    )
    return "".join(encode(obj, 0))


def loads(text: str) -> "Any":
    """json.loads(text): a ValueError (json.JSONDecodeError) for anything but one value."""
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM")
    if _scan is None:
        _accelerator()
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        obj, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"Expecting value at {exc.value}") from None
    if end != len(text) and text[end:].strip(_WHITESPACE):
        raise ValueError(f"Extra data at {end}")
    return obj


# What encode_basestring escapes (json.encoder's ESCAPE_DCT): every control character,
# the quote and the backslash; the rest (non-ASCII included) is written as it is.
_ESCAPES = {i: f"\\u{i:04x}" for i in range(0x20)}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"', ord("\b"): "\\b", ord("\f"): "\\f",
                 ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})  # fmt: skip
_FLOATS = {float("inf"): "Infinity", float("-inf"): "-Infinity"}


def plain_dumps(obj: "Any") -> str:
    """`dumps` in pure Python, without loading _json: the same text for what JSON can
    hold (dicts with str keys, lists, tuples, str, int, float, bool, None); TypeError
    for anything else. For small objects (a request): it is several times slower
    per byte than `dumps`."""
    out: list[str] = []
    _plain(obj, out)
    return "".join(out)


def _plain(o: "Any", out: list[str]) -> None:
    if isinstance(o, str):
        out.append('"' + o.translate(_ESCAPES) + '"')
    elif o is None:
        out.append("null")
    elif o is True:
        out.append("true")
    elif o is False:
        out.append("false")
    elif isinstance(o, int):
        out.append(int.__repr__(o))
    elif isinstance(o, float):
        out.append("NaN" if o != o else _FLOATS.get(o) or float.__repr__(o))
    elif isinstance(o, dict):
        out.append("{")
        first = True
        for key, value in o.items():
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {key.__class__.__name__}")
            if not first:
                out.append(",")
            first = False
            out.append('"' + key.translate(_ESCAPES) + '":')
            _plain(value, out)
        out.append("}")
    elif isinstance(o, (list, tuple)):
        out.append("[")
        for i, value in enumerate(o):
            if i:
                out.append(",")
            _plain(value, out)
        out.append("]")
    else:
        _not_serializable(o)
