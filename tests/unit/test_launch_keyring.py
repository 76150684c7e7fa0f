"""A job's process joins a session keyring of its own (privdrop.new_session_keyring)."""

from __future__ import annotations

import ctypes
import os

import pytest

from tsd import privdrop

KEYCTL_GET_KEYRING_ID = 0


def session_keyring_id(create: bool) -> int:
    """The serial of this process's session keyring (keyctl GET_KEYRING_ID @s)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr = privdrop._SYS_KEYCTL[os.uname().machine]
    return int(libc.syscall(ctypes.c_long(nr), ctypes.c_long(KEYCTL_GET_KEYRING_ID),
                            ctypes.c_long(privdrop.KEY_SPEC_SESSION_KEYRING),
                            ctypes.c_long(int(create))))


def test_new_session_keyring_replaces_the_inherited_one_in_the_child_only() -> None:
    if os.uname().machine not in privdrop._SYS_KEYCTL:
        pytest.skip("keyctl's number is unknown on this architecture")
    before = session_keyring_id(create=True)
    if before < 0:
        pytest.skip("keyctl is not available here (no keyrings, or a seccomp filter)")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            privdrop.new_session_keyring()
            os.write(w, str(session_keyring_id(create=False)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        child = int(fh.read() or "-1")
    os.waitpid(pid, 0)
    assert child > 0 and child != before
    assert session_keyring_id(create=False) == before  # the parent keeps its own
