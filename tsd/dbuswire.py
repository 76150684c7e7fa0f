"""D-Bus spoken directly: the wire format and a blocking connection, for the call the
system service makes once per job (systemd's StartTransientUnit, tsd.scope).

pydbus, over PyGObject and GDBus, spends about 1 ms of CPU per method call here:
a GLib.Variant built per value, a proxy's signature checks, and GDBus's own
worker thread that writes and reads the socket and hands the reply back. The
same call marshalled here and written on the socket by the calling thread costs
a third of it (bench/system_dispatch.py's floor, both ways, in one box). pydbus
stays for everything else tsd asks systemd, none of it per job.

What is here is what tsd needs: method calls out (little-endian); method
returns and errors in (either byte order), other messages skipped; values of
the basic types, strings, arrays, structs, dict entries and variants. Every
byte read is checked against the message's own lengths: a malformed message is
a WireError, never an IndexError or a hang. The bus is the system bus, reached
where DBUS_SYSTEM_BUS_ADDRESS says (its first unix:path= or unix:abstract=, as
GDBus reads it) or at its well-known path, and authenticated as this process's
uid (EXTERNAL); the bus daemon checks that against SO_PEERCRED.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote  # D-Bus addresses escape bytes as %XX

SYSTEM_BUS = "/run/dbus/system_bus_socket"  # where DBUS_SYSTEM_BUS_ADDRESS names none
TIMEOUT = 25.0  # seconds for a reply: D-Bus's usual default
MAX_MESSAGE = 1 << 27  # the specification's limit on a whole message (128 MiB)
MAX_DEPTH = 32  # nesting of containers in a signature (the specification's is 64)

METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
# Header field codes.
PATH, INTERFACE, MEMBER, ERROR_NAME, REPLY_SERIAL, DESTINATION, SENDER, SIGNATURE = range(1, 9)

_ALIGN = {
    "y": 1, "b": 4, "n": 2, "q": 2, "i": 4, "u": 4, "x": 8, "t": 8, "d": 8, "h": 4,
    "s": 4, "o": 4, "g": 1, "a": 4, "(": 8, "{": 8, "v": 1,
}  # fmt: skip
_ORDERS = {b"l": "<", b"B": ">"}  # the message's first byte: its byte order
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I", "x": "q", "t": "Q",
          "d": "d", "h": "I"}


class WireError(ValueError):
    """Bytes that are not a D-Bus message (or a value that cannot be one)."""


class DBusError(Exception):
    """An error reply: its D-Bus error name and message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}" if message else name)
        self.name = name
        self.message = message


@dataclass(frozen=True)
class Message:
    """A message read from the bus: what a caller of a method needs of it."""

    kind: int
    serial: int
    reply_serial: int | None
    error_name: str | None
    signature: str
    body: tuple[Any, ...]


# ------------------------------------------------------------ signatures


def _type_end(sig: str, i: int, depth: int = 0) -> int:
    """Index just past the single complete type that starts at sig[i]."""
    if depth > MAX_DEPTH or i >= len(sig):
        raise WireError(f"bad signature {sig!r}")
    c = sig[i]
    if c == "a":
        return _type_end(sig, i + 1, depth + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        j = i + 1
        while j < len(sig) and sig[j] != close:
            j = _type_end(sig, j, depth + 1)
        if j >= len(sig) or j == i + 1:
            raise WireError(f"bad signature {sig!r}")
        return j + 1
    if c not in _ALIGN or c in ")}":
        raise WireError(f"bad signature {sig!r}")
    return i + 1


def split_signature(sig: str) -> list[str]:
    """The complete types of a signature, in order ("sa(sv)" -> ["s", "a(sv)"])."""
    types, i = [], 0
    while i < len(sig):
        j = _type_end(sig, i)
        types.append(sig[i:j])
        i = j
    return types


# ------------------------------------------------------------ marshalling


def _pad(buf: bytearray, n: int) -> None:
    buf.extend(bytes(-len(buf) % n))


def marshal(sig: str, value: Any, buf: bytearray) -> None:
    """Append `value`, of the single complete type `sig`, to `buf` (little-endian; the
    alignment counts from buf's start, which must be the message's or 8-aligned to it).
    A variant is a (signature, value) pair; an array of dict entries, a sequence of
    pairs; a struct, a sequence."""
    c = sig[0]
    _pad(buf, _ALIGN[c])
    if c in _FIXED:
        try:
            buf += struct.pack("<" + _FIXED[c], value)
        except struct.error as e:
            raise WireError(f"{value!r} is not a D-Bus {sig!r}: {e}") from None
    elif c in "so":
        data = str(value).encode()
        if b"\0" in data:
            raise WireError(f"a D-Bus string holds no NUL: {value!r}")
        buf += struct.pack("<I", len(data)) + data + b"\0"
    elif c == "g":
        data = str(value).encode()
        if len(data) > 255:
            raise WireError(f"signature over 255 bytes: {value!r}")
        buf += bytes((len(data),)) + data + b"\0"
    elif c == "v":
        inner, inner_value = value
        split_signature(inner)  # checked: one complete type
        marshal("g", inner, buf)
        marshal(inner, inner_value, buf)
    elif c == "a":
        element = sig[1:]
        at = len(buf)
        buf += b"\0\0\0\0"
        _pad(buf, _ALIGN[element[0]])  # padding before the first element is not counted
        start = len(buf)
        for item in value:
            marshal(element, item, buf)
        struct.pack_into("<I", buf, at, len(buf) - start)
    else:  # struct or dict entry
        members = split_signature(sig[1:-1])
        items = tuple(value)
        if len(items) != len(members):
            raise WireError(f"{value!r} does not have the {len(members)} members of {sig!r}")
        for member_sig, item in zip(members, items, strict=True):
            marshal(member_sig, item, buf)


def method_call(
    serial: int, destination: str, path: str, interface: str, member: str,
    signature: str = "", args: Sequence[Any] = (),
) -> bytes:
    """One method call message, whole."""
    body = bytearray()
    types = split_signature(signature)
    if len(types) != len(args):
        raise WireError(f"{len(args)} arguments for the signature {signature!r}")
    for arg_sig, arg in zip(types, args, strict=True):
        marshal(arg_sig, arg, body)
    fields: list[tuple[int, tuple[str, Any]]] = [
        (PATH, ("o", path)), (INTERFACE, ("s", interface)), (MEMBER, ("s", member)),
        (DESTINATION, ("s", destination)),
    ]
    if signature:
        fields.append((SIGNATURE, ("g", signature)))
    msg = bytearray(b"l" + bytes((METHOD_CALL, 0, 1)))
    msg += struct.pack("<II", len(body), serial)
    marshal("a(yv)", fields, msg)
    _pad(msg, 8)
    return bytes(msg + body)


# ------------------------------------------------------------ unmarshalling


class _Reader:
    """Values read off one message, every offset checked against its end."""

    def __init__(self, data: bytes, order: str) -> None:
        self.data = data
        self.order = order
        self.pos = 0

    def _align(self, n: int) -> None:
        self.pos += -self.pos % n
        if self.pos > len(self.data):
            raise WireError("message ends inside its padding")

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise WireError("message ends inside a value")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def _string(self, length: int) -> str:
        raw = self._take(length + 1)
        if raw[-1:] != b"\0":
            raise WireError("string without its NUL")
        try:
            return raw[:-1].decode()
        except UnicodeDecodeError:
            raise WireError("string is not UTF-8") from None

    def value(self, sig: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise WireError("values nested too deep")
        c = sig[0]
        self._align(_ALIGN[c])
        if c in _FIXED:
            fmt = self.order + _FIXED[c]
            (got,) = struct.unpack(fmt, self._take(struct.calcsize(fmt)))
            return bool(got) if c == "b" else got
        if c in "so":
            (length,) = struct.unpack(self.order + "I", self._take(4))
            return self._string(length)
        if c == "g":
            return self._string(self._take(1)[0])
        if c == "v":
            inner = self._string(self._take(1)[0])
            if len(split_signature(inner)) != 1:
                raise WireError(f"variant of signature {inner!r}")
            return (inner, self.value(inner, depth + 1))
        if c == "a":
            (length,) = struct.unpack(self.order + "I", self._take(4))
            element = sig[1:]
            self._align(_ALIGN[element[0]])
            end = self.pos + length
            if end > len(self.data):
                raise WireError("array longer than its message")
            items = []
            while self.pos < end:
                items.append(self.value(element, depth + 1))
            if self.pos != end:
                raise WireError("array elements overrun its length")
            return items
        return tuple(self.value(m, depth + 1) for m in split_signature(sig[1:-1]))


def message_length(head: bytes) -> int | None:
    """The whole length of the message that starts with `head`; None until 16 bytes."""
    if len(head) < 16:
        return None
    order = _ORDERS.get(head[:1])
    if order is None:
        raise WireError(f"unknown byte order {head[:1]!r}")
    body_len, _, fields_len = struct.unpack_from(order + "III", head, 4)
    total = 16 + fields_len + (-(16 + fields_len) % 8) + body_len
    if total > MAX_MESSAGE:
        raise WireError(f"message of {total} bytes")
    return int(total)


def parse(data: bytes) -> Message:
    """One whole message (message_length bytes)."""
    order = _ORDERS.get(data[:1])
    if order is None or len(data) < 16:
        raise WireError("not a D-Bus message")
    kind = data[1]
    body_len, serial = struct.unpack_from(order + "II", data, 4)
    reader = _Reader(data, order)
    reader.pos = 12
    fields = dict(reader.value("a(yv)"))
    reader._align(8)
    if len(data) - reader.pos != body_len:
        raise WireError("body length does not match the message")
    sig_field = fields.get(SIGNATURE, ("g", ""))
    signature = sig_field[1] if sig_field[0] == "g" else ""
    # The body's alignment counts from its own start, which is 8-aligned in the message.
    body_reader = _Reader(data[reader.pos:], order)
    body = tuple(body_reader.value(t) for t in split_signature(signature))
    if body_reader.pos != body_len:
        raise WireError("body longer than its signature")
    reply = fields.get(REPLY_SERIAL)
    error = fields.get(ERROR_NAME)
    return Message(
        kind=kind,
        serial=serial,
        reply_serial=reply[1] if reply and reply[0] == "u" else None,
        error_name=error[1] if error and error[0] == "s" else None,
        signature=signature,
        body=body,
    )


# ------------------------------------------------------------ the connection


def system_bus_address(environ: Mapping[str, str] = os.environ) -> str:
    """The socket of the system bus: a path, or an abstract name (starting with NUL)."""
    for address in environ.get("DBUS_SYSTEM_BUS_ADDRESS", "").split(";"):
        transport, _, params = address.partition(":")
        if transport != "unix":
            continue
        keys = dict(p.partition("=")[::2] for p in params.split(","))
        if keys.get("path"):
            return unquote(keys["path"])
        if keys.get("abstract"):
            return "\0" + unquote(keys["abstract"])
    return SYSTEM_BUS


class BusConnection:
    """A blocking connection to a message bus, for method calls from one thread at a
    time (the caller serialises them). Any failure of the connection itself (an OSError,
    a timeout, a malformed message) closes it; make a new one to go on."""

    def __init__(self, path: str | None = None, timeout: float = TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._buf = b""
        self._serial = 0
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(system_bus_address() if path is None else path)
            uid = str(os.geteuid()).encode().hex().encode()
            self._sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\n")
            answer = self._line()
            if not answer.startswith(b"OK "):
                raise WireError(f"the bus refused us: {answer.decode(errors='replace').strip()}")
            self._sock.sendall(b"BEGIN\r\n")
            (self.unique_name,) = self.call(
                "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello"
            )
        except BaseException:
            self.close()
            raise

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            if len(self._buf) > 4096:
                raise WireError("authentication line too long")
            self._recv()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def _recv(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise EOFError("the bus closed the connection")
        self._buf += data

    def call(
        self, destination: str, path: str, interface: str, member: str,
        signature: str = "", args: Sequence[Any] = (),
    ) -> tuple[Any, ...]:
        """Call a method; its return values. DBusError for an error reply."""
        self._serial += 1
        serial = self._serial
        try:
            self._sock.sendall(
                method_call(serial, destination, path, interface, member, signature, args)
            )
            while True:
                reply = self._message()
                if reply.reply_serial != serial or reply.kind not in (METHOD_RETURN, ERROR):
                    continue  # a signal (NameAcquired after Hello), or another's reply
                if reply.kind == ERROR:
                    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
                    raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", text)
                return reply.body
        except DBusError:
            raise
        except BaseException:
            self.close()
            raise

    def _message(self) -> Message:
        while True:
            total = message_length(self._buf)
            if total is not None and len(self._buf) >= total:
                data, self._buf = self._buf[:total], self._buf[total:]
                return parse(data)
            self._recv()

    def close(self) -> None:
        """Hang up (calls after this fail with OSError)."""
        self._sock.close()
