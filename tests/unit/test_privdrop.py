"""privdrop.drop_privileges: groups, gid, uid, in a forked child (root only)."""

from __future__ import annotations

import json
import os
import pwd

import pytest

from tsd import privdrop

root_only = pytest.mark.skipif(os.getuid() != 0, reason="dropping privileges needs root")


def _dropped(groups: tuple[int, ...] | None) -> dict[str, object]:
    """What a child that dropped to `nobody` with `groups` ends up with."""
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            privdrop.drop_privileges(nobody.pw_uid, nobody.pw_gid, "nobody", groups)
            ids = {"uid": os.getresuid(), "gid": os.getresgid(), "groups": sorted(os.getgroups())}
            os.write(w, json.dumps(ids).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        got: dict[str, object] = json.loads(fh.read() or "{}")
    os.waitpid(pid, 0)
    return got


@root_only
def test_the_groups_the_daemon_looked_up_are_set_before_gid_and_uid() -> None:
    nobody = pwd.getpwnam("nobody")
    got = _dropped((nobody.pw_gid, 4242))
    assert got == {
        "uid": [nobody.pw_uid] * 3,
        "gid": [nobody.pw_gid] * 3,
        "groups": sorted({nobody.pw_gid, 4242}),
    }


@root_only
def test_without_groups_the_child_looks_them_up_as_initgroups_would() -> None:
    nobody = pwd.getpwnam("nobody")
    got = _dropped(None)
    assert got["groups"] == sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    assert got["uid"] == [nobody.pw_uid] * 3
