"""Becoming a job's user, for good: groups, gid, uid (in that order), a session keyring
of its own, and the usual soft file limit.

Runs in the supervisor's child just before exec (tsd.launch), or in a process
forked to run a user's TS_ONFINISH or mail: only system calls, after fork.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
from collections.abc import Sequence


def drop_privileges(
    uid: int, gid: int, user: str, groups: Sequence[int] | None = None
) -> None:
    """Become the user for good: supplementary groups, then gid, then uid (that order).

    `groups`: the user's groups as the daemon looked them up (tsd.userdb), so that no
    NSS lookup runs after fork; None looks them up here (initgroups would)."""
    if os.getuid() == 0:
        os.setgroups(list(groups) if groups is not None else os.getgrouplist(user, gid))
    os.setgid(gid)
    os.setuid(uid)
    if uid != 0 and (os.geteuid() == 0 or os.getegid() != gid):
        raise PermissionError("privileges were not dropped")
    new_session_keyring()


_LIBC: list[ctypes.CDLL] = []


def libc() -> ctypes.CDLL:
    """The C library, loaded once (the spawner loads it before it forks, see prepare)."""
    if not _LIBC:
        _LIBC.append(ctypes.CDLL(None, use_errno=True))
    return _LIBC[0]


def prepare() -> None:
    """Load now what supervisors and jobs would otherwise each load after fork."""
    lib = libc()
    _ = lib.prctl, lib.syscall


KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_LINK = 8
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_SESSION_KEYRING = -3


def new_session_keyring() -> None:
    """Join a fresh session keyring owned by the current user, as pam_keyinit does at login.

    Without it every job would share the daemon's session keyring, and one user's
    job could read and change the keys another user's job added with `@s`. Call
    it after setuid, so the new keyring belongs to the user.
    """
    lib = libc()
    machine = os.uname().machine
    nr = _SYS_KEYCTL.get(machine)
    if nr is None:
        # Fail closed: running the job in the daemon's keyring is what this prevents.
        raise OSError(errno.ENOSYS, f"keyctl's system call number on {machine} is unknown")
    syscall = lib.syscall
    syscall.restype = ctypes.c_long
    # NULL name: a new anonymous keyring, not a named one other processes could join.
    if syscall(ctypes.c_long(nr), ctypes.c_long(KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        err = ctypes.get_errno()
        # ENOSYS (no keyrings in this kernel) or EPERM/EACCES (a seccomp filter or LSM
        # blocks keyctl, and blocks it for the job too): there is no keyring a job
        # could use, so nothing is shared. Anything else (EDQUOT...) would leave the
        # job in the daemon's keyring: refuse to start it.
        if err in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            return
        raise OSError(err, f"cannot make a session keyring: {os.strerror(err)}")
    # Like pam_keyinit: the user's own keyring stays reachable from the session.
    syscall(
        ctypes.c_long(nr),
        ctypes.c_long(KEYCTL_LINK),
        ctypes.c_long(KEY_SPEC_USER_KEYRING),
        ctypes.c_long(KEY_SPEC_SESSION_KEYRING),
    )


# keyctl's system call number, per architecture (asm/unistd.h).
_SYS_KEYCTL = {
    "x86_64": 250,
    "aarch64": 219,
    "riscv64": 219,
    "loongarch64": 219,
    "ppc64le": 271,
    "ppc64": 271,
    "s390x": 280,
    "i686": 288,
    "i386": 288,
    "armv7l": 311,
}


def reset_nofile(soft: int | None) -> None:
    """Give the job the usual soft file limit, not the daemon's raised one (select() and
    many programs assume at most 1024); the hard limit stays, so a job may raise it."""
    if soft is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
