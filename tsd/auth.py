"""Who is calling, from SO_PEERCRED only, and what they may do.

A uid or user name inside a request is never looked at: the kernel tells us
who connected. Group membership comes from the group database (what the
socket's 0660 root:tsd mode also relies on).
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Callable, Iterable

from tsd.errors import NotOwner, PermissionDenied
from tsd.model import HIDDEN, PLAIN, ExitInfo, Job, JobSpec, Peer, SpecOptions
from tsd.paths import SUBMIT_GROUP
from tsd.userdb import UserDb

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def user_name(uid: int, entry: Callable[[int], pwd.struct_passwd] = pwd.getpwuid) -> str:
    """The user's name, or the uid as text for a uid without a passwd entry."""
    try:
        return entry(uid).pw_name
    except KeyError:
        return str(uid)


def group_ids(
    user: str, gid: int, grouplist: Callable[[str, int], Iterable[int]] = os.getgrouplist
) -> tuple[int, ...]:
    """The user's primary and supplementary groups from the group database."""
    try:
        return tuple(sorted(set(grouplist(user, gid))))
    except (KeyError, OSError):
        return (gid,)


def group_names(
    gids: Iterable[int], group: Callable[[int], grp.struct_group] = grp.getgrgid
) -> tuple[str, ...]:
    """Names of these groups (unknown ones are skipped)."""
    names = []
    for gid in gids:
        try:
            names.append(group(gid).gr_name)
        except KeyError:
            continue
    return tuple(names)


def make_peer(
    pid: int, uid: int, gid: int, is_admin: Callable[[str, tuple[str, ...]], bool],
    users: UserDb | None = None,
) -> Peer:
    """Resolve a connection's credentials into a Peer: through `users` (the daemon's
    cache of a second, tsd.userdb) when given, else asking the databases now."""
    if users is None:
        user = user_name(uid)
        groups = group_ids(user, gid)
        names = group_names(groups)
    else:
        user = user_name(uid, users.entry)
        groups = group_ids(user, gid, users.groups)
        names = group_names(groups, users.group)
    return Peer(
        pid=pid,
        uid=uid,
        gid=gid,
        user=user,
        groups=groups,
        admin=uid == 0 or is_admin(user, names),
    )


def check_may_connect(peer: Peer, system: bool, daemon_uid: int) -> None:
    """Refuse callers who may not use this daemon at all."""
    if system:
        if peer.uid == 0 or peer.admin:
            return
        try:
            tsd_gid = grp.getgrnam(SUBMIT_GROUP).gr_gid
        except KeyError:
            raise PermissionDenied(
                f"group {SUBMIT_GROUP} does not exist; ask an admin to install tsd properly"
            ) from None
        if tsd_gid not in peer.groups:
            raise PermissionDenied(
                f"user {peer.user} is not in group {SUBMIT_GROUP}; "
                f"ask an admin to add you (usermod -aG {SUBMIT_GROUP} {peer.user})"
            )
    elif peer.uid != daemon_uid and peer.uid != 0:
        raise PermissionDenied(f"this personal tsd belongs to {user_name(daemon_uid)}")


def check_owner(peer: Peer, job: Job) -> None:
    """A user acts only on their own jobs; admins on all."""
    if job.uid != peer.uid and not peer.admin:
        raise NotOwner(f"job {job.id} belongs to {job.user}")


def check_admin(peer: Peer, what: str) -> None:
    """Server-wide actions are for admins."""
    if not peer.admin:
        raise PermissionDenied(f"{what} is for admins (root or admins: in the config)")


def _visible_options(o: SpecOptions) -> SpecOptions:
    """What another user may see of a job's options (the shared PLAIN as it is)."""
    if o is PLAIN:
        return PLAIN
    return SpecOptions(
        gpu_indices=o.gpu_indices,
        depend_mode=o.depend_mode,
        store_output=o.store_output,
        begin=o.begin,
        priority=o.priority,
        retry=o.retry,
        array_job=o.array_job,
        array_task=o.array_task,
        array_throttle=o.array_throttle,
    )


def visible_to(peer: Peer, job: Job) -> Job:
    """The job as `peer` may see it: whole for its owner and admins; for anyone else
    only what `ts -A -l` shows (id, user, state, slots, GPUs, times, exit code,
    dependencies, label, command, unit, wait reason).

    Every record the daemon sends goes through here (tsd.handlers.handle), so no
    request can show another user's environment, TS_ENV output, working
    directory, output path, pids or exit note.
    """
    if job.uid == peer.uid or peer.admin:
        return job
    s, ex = job.spec, job.exit
    return Job(
        id=job.id,
        uid=job.uid,
        user=job.user,
        spec=JobSpec(
            command=s.command,
            cwd=HIDDEN,
            env=(),
            label=s.label,
            slots=s.slots,
            gpus=s.gpus,
            depends=s.depends,
            options=_visible_options(s.options),
        ),
        state=job.state,
        order=job.order,
        enqueue_time=job.enqueue_time,
        start_time=job.start_time,
        end_time=job.end_time,
        exit=None if ex is None else ExitInfo(
            code=ex.code, signal=ex.signal, timed_out=ex.timed_out, lost=ex.lost
        ),
        gpu_ids=job.gpu_ids,
        gpu_uuids=job.gpu_uuids,
        unit=job.unit,
        wait_reason=job.wait_reason,
        attempts=job.attempts,
        slurm_id=job.slurm_id,  # squeue shows it to everyone anyway
        slurm_task=job.slurm_task,
    )
