"""tsd.dbuswire: the D-Bus wire format both ways, checked against GDBus's own reading and
writing of the same messages, and a real dbus-daemon answering calls."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsd import dbuswire
from tsd.dbuswire import BusConnection, DBusError, WireError

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=20)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

# StartTransientUnit's own signature, with every kind of property value tsd sends.
prop = st.one_of(
    st.tuples(text, st.tuples(st.just("s"), text)),
    st.tuples(text, st.tuples(st.just("b"), st.booleans())),
    st.tuples(text, st.tuples(st.just("t"), u64)),
    st.tuples(text, st.tuples(st.just("au"), st.lists(u32, max_size=5))),
    st.tuples(text, st.tuples(st.just("a(ss)"), st.lists(st.tuples(text, text), max_size=3))),
)
start_args = st.tuples(text, text, st.lists(prop, max_size=6), st.just([]))


def _roundtrip(sig: str, value: Any) -> Any:
    """Marshal `value` behind a byte that misaligns it, and read it back."""
    buf = bytearray(b"\x07")
    dbuswire.marshal(sig, value, buf)
    reader = dbuswire._Reader(bytes(buf), "<")
    reader.pos = 1
    got = reader.value(sig)
    assert reader.pos == len(buf)
    return got


def _plain(value: Any) -> Any:
    """Tuples and lists alike (the reader gives lists for arrays, tuples for structs)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@given(start_args)
def test_start_transient_units_arguments_read_back_as_written(args: Any) -> None:
    assert _plain(_roundtrip("(ssa(sv)a(sa(sv)))", args)) == _plain(args)


@given(st.lists(st.tuples(st.integers(0, 255), u64, st.booleans(), text), max_size=4))
def test_structs_of_mixed_alignment_read_back_as_written(items: Any) -> None:
    assert _plain(_roundtrip("a(ytbs)", items)) == _plain(items)


def test_bad_signatures_and_values_are_wire_errors() -> None:
    for sig in ("a", "(", "()", "(s", "z", "a{"):
        with pytest.raises(WireError):
            dbuswire.split_signature(sig)
    with pytest.raises(WireError):
        dbuswire.marshal("s", "a\0b", bytearray())
    with pytest.raises(WireError):
        dbuswire.marshal("u", -1, bytearray())
    with pytest.raises(WireError):
        dbuswire.marshal("(su)", ("only one",), bytearray())
    with pytest.raises(WireError):
        dbuswire.method_call(1, "d", "/p", "i.f", "M", "s", ())


def test_every_truncation_of_a_message_is_a_wire_error_not_a_crash() -> None:
    whole = dbuswire.method_call(
        9, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))",
        ("tsd-job-1.scope", "fail", [("PIDs", ("au", [1, 2]))], []),
    )
    assert dbuswire.parse(whole).body[0] == "tsd-job-1.scope"
    for cut in range(16, len(whole)):
        with pytest.raises(WireError):
            dbuswire.parse(whole[:cut])


@given(st.binary(min_size=16, max_size=200))
def test_random_bytes_parse_or_fail_with_a_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):  # anything else (IndexError...) fails the test
        dbuswire.parse(data)


def test_a_huge_announced_length_is_refused_before_it_is_read() -> None:
    head = b"l\x02\x00\x01" + struct.pack("<III", 2**31, 1, 8)
    with pytest.raises(WireError):
        dbuswire.message_length(head)
    assert dbuswire.message_length(head[:15]) is None


def test_the_system_bus_is_where_its_variable_says_or_the_well_known_path() -> None:
    assert dbuswire.system_bus_address({}) == dbuswire.SYSTEM_BUS
    env = {"DBUS_SYSTEM_BUS_ADDRESS": "tcp:host=x,port=1;unix:path=/run/my%20bus"}
    assert dbuswire.system_bus_address(env) == "/run/my bus"
    env = {"DBUS_SYSTEM_BUS_ADDRESS": "unix:abstract=/tmp/dbus-x,guid=00"}
    assert dbuswire.system_bus_address(env) == "\0/tmp/dbus-x"


# ------------------------------------------------------------ against GDBus


def _gio() -> Any:
    pytest.importorskip("gi")
    from gi.repository import Gio

    return Gio


def test_gdbus_reads_our_method_call_as_we_meant_it() -> None:
    Gio = _gio()
    args = ("tsd-job-7.scope", "fail", [
        ("Slice", ("s", "tsd-u1000.slice")), ("PIDs", ("au", [41, 42])),
        ("CPUAccounting", ("b", True)), ("MemoryMax", ("t", 2**40)),
        ("DeviceAllow", ("a(ss)", [("/dev/nvidia1", "rw")])),
    ], [])
    blob = dbuswire.method_call(
        5, "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit", "ssa(sv)a(sa(sv))", args,
    )
    msg = Gio.DBusMessage.new_from_blob(blob, Gio.DBusCapabilityFlags.NONE)
    assert msg.get_serial() == 5
    assert msg.get_message_type() == Gio.DBusMessageType.METHOD_CALL
    assert (msg.get_destination(), msg.get_path(), msg.get_interface(), msg.get_member()) == (
        "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager", "StartTransientUnit",
    )
    assert msg.get_signature() == "ssa(sv)a(sa(sv))"
    assert msg.get_body().unpack() == (
        "tsd-job-7.scope", "fail", [
            ("Slice", "tsd-u1000.slice"), ("PIDs", [41, 42]), ("CPUAccounting", True),
            ("MemoryMax", 2**40), ("DeviceAllow", [("/dev/nvidia1", "rw")]),
        ], [],
    )


@pytest.mark.parametrize("big_endian", [False, True])
def test_we_read_gdbus_replies_and_errors_in_either_byte_order(big_endian: bool) -> None:
    Gio = _gio()
    from gi.repository import GLib

    call = Gio.DBusMessage.new_method_call("d.e", "/p", "i.f", "M")
    call.set_serial(11)
    reply = call.new_method_reply()
    reply.set_body(GLib.Variant("(ov)", ("/org/freedesktop/systemd1/job/9",
                                         GLib.Variant("a{su}", {"a": 1}))))
    reply.set_serial(3)
    error = call.new_method_error_literal("org.freedesktop.systemd1.UnitExists", "exists")
    error.set_serial(4)
    for msg in (reply, error):
        if big_endian:
            msg.set_byte_order(Gio.DBusMessageByteOrder.BIG_ENDIAN)
    got = dbuswire.parse(bytes(reply.to_blob(Gio.DBusCapabilityFlags.NONE)))
    assert (got.kind, got.serial, got.reply_serial) == (dbuswire.METHOD_RETURN, 3, 11)
    assert got.body == ("/org/freedesktop/systemd1/job/9", ("a{su}", [("a", 1)]))
    blob = bytes(error.to_blob(Gio.DBusCapabilityFlags.NONE))
    assert dbuswire.message_length(blob) == len(blob)
    got = dbuswire.parse(blob)
    assert (got.kind, got.reply_serial) == (dbuswire.ERROR, 11)
    assert (got.error_name, got.body) == ("org.freedesktop.systemd1.UnitExists", ("exists",))


# ------------------------------------------------------------ a real bus

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[str]:
    """A private dbus-daemon of our own, on a socket in tmp_path; its path."""
    daemon = shutil.which("dbus-daemon")
    if daemon is None:
        pytest.skip("no dbus-daemon here")
    path = tmp_path / "bus"
    conf = tmp_path / "bus.conf"
    conf.write_text(BUS_CONFIG.format(path=path))
    proc = subprocess.Popen([daemon, "--nofork", "--nopidfile", f"--config-file={conf}",
                             "--print-address"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("unix:path=")  # listening
        yield str(path)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_real_bus_answers_our_calls_and_our_errors_carry_its_names(bus: str) -> None:
    conn = BusConnection(bus)
    try:
        assert conn.unique_name.startswith(":")
        names = conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                          "org.freedesktop.DBus", "ListNames")[0]
        assert "org.freedesktop.DBus" in names and conn.unique_name in names
        (pid,) = conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "GetConnectionUnixProcessID", "s",
                           (conn.unique_name,))
        assert pid == os.getpid()  # the bus knows us by SO_PEERCRED
        with pytest.raises(DBusError) as caught:
            conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                      "org.freedesktop.DBus", "NoSuchMethod")
        assert caught.value.name == "org.freedesktop.DBus.Error.UnknownMethod"
        # An error reply leaves the connection as it was.
        assert conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                         "org.freedesktop.DBus", "NameHasOwner", "s",
                         ("org.freedesktop.DBus",)) == (True,)
    finally:
        conn.close()


def test_a_connection_the_bus_dropped_fails_as_an_oserror_and_stays_closed(bus: str) -> None:
    conn = BusConnection(bus)
    conn._sock.shutdown(2)  # as when the bus restarts
    with pytest.raises((OSError, EOFError)):
        conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                  "ListNames")
    with pytest.raises(OSError):
        conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                  "ListNames")
