"""UserDb: job owners' passwd entries through a cache of a second."""

from __future__ import annotations

import os
import pwd

import pytest

from tsd import userdb
from tsd.userdb import UserDb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_is_asked_once_within_the_ttl_and_again_after_it() -> None:
    asked: list[int] = []
    me = pwd.getpwuid(os.getuid())

    def lookup(uid: int) -> pwd.struct_passwd:
        asked.append(uid)
        return me

    clock = Clock()
    users = UserDb(lookup, clock)
    assert users.entry(7) is me
    clock.now += userdb.TTL / 2
    assert users.entry(7) is me
    assert asked == [7]
    clock.now += userdb.TTL
    users.entry(7)
    assert asked == [7, 7]


def test_a_change_in_the_user_database_is_seen_after_the_ttl() -> None:
    names = {"now": "alice"}
    base = pwd.getpwuid(os.getuid())

    def lookup(uid: int) -> pwd.struct_passwd:
        return pwd.struct_passwd((names["now"], *tuple(base)[1:]))

    clock = Clock()
    users = UserDb(lookup, clock)
    assert users.entry(1).pw_name == "alice"
    names["now"] = "bob"
    assert users.entry(1).pw_name == "alice"
    clock.now += userdb.TTL
    assert users.entry(1).pw_name == "bob"


def test_an_unknown_uid_is_never_cached_and_a_removed_user_goes_after_the_ttl() -> None:
    known = {5: pwd.getpwuid(os.getuid())}
    asked: list[int] = []

    def lookup(uid: int) -> pwd.struct_passwd:
        asked.append(uid)
        return known[uid]

    clock = Clock()
    users = UserDb(lookup, clock)
    for _ in range(2):
        with pytest.raises(KeyError):
            users.entry(6)
    assert asked == [6, 6]
    users.entry(5)
    del known[5]  # userdel
    users.entry(5)  # still within the TTL
    clock.now += userdb.TTL
    with pytest.raises(KeyError):
        users.entry(5)


def test_the_real_database_gives_this_users_entry() -> None:
    assert UserDb().entry(os.getuid()) == pwd.getpwuid(os.getuid())


def test_a_group_list_is_asked_once_within_the_ttl_per_user_and_gid() -> None:
    asked: list[tuple[str, int]] = []
    lists = {"alice": [100, 27]}

    def grouplist(user: str, gid: int) -> list[int]:
        asked.append((user, gid))
        return [gid, *lists[user]]

    clock = Clock()
    users = UserDb(clock=clock, grouplist=grouplist)
    assert users.groups("alice", 100) == (100, 100, 27)
    lists["alice"] = [100]  # gpasswd -d alice 27
    assert users.groups("alice", 100) == (100, 100, 27)  # within the TTL
    assert users.groups("alice", 5) == (5, 100)  # another primary group: asked
    assert asked == [("alice", 100), ("alice", 5)]
    clock.now += userdb.TTL
    assert users.groups("alice", 100) == (100, 100)
    assert len(asked) == 3


def test_the_real_group_database_gives_what_getgrouplist_does() -> None:
    me = pwd.getpwuid(os.getuid())
    assert UserDb().groups(me.pw_name, me.pw_gid) == tuple(
        os.getgrouplist(me.pw_name, me.pw_gid))


def test_a_callers_peer_through_the_cache_is_the_peer_asked_of_the_databases() -> None:
    from tsd.auth import make_peer

    def admins(user: str, groups: tuple[str, ...]) -> bool:
        return "root" in groups

    me = os.getuid()
    for uid, gid in ((me, os.getgid()), (0, 0), (4_000_123, 4_000_123)):  # the last: nobody
        direct = make_peer(42, uid, gid, admins)
        assert make_peer(42, uid, gid, admins, users=UserDb()) == direct


def test_a_caller_added_to_a_group_counts_in_it_after_the_ttl() -> None:
    import grp

    from tsd.auth import make_peer

    base = pwd.getpwuid(os.getuid())
    members: dict[str, list[int]] = {"alice": [1000]}
    clock = Clock()
    users = UserDb(
        lambda uid: pwd.struct_passwd(("alice", *tuple(base)[1:])), clock,
        lambda user, gid: [gid, *members[user]],
        lambda gid: grp.struct_group((f"g{gid}", "x", gid, [])),
    )  # fmt: skip

    def admins(user: str, groups: tuple[str, ...]) -> bool:
        return "g27" in groups

    assert make_peer(1, 1000, 1000, admins, users=users).groups == (1000,)
    members["alice"] = [1000, 27]
    still = make_peer(1, 1000, 1000, admins, users=users)
    assert (still.groups, still.admin) == ((1000,), False)
    clock.now += userdb.TTL
    now = make_peer(1, 1000, 1000, admins, users=users)
    assert (now.groups, now.admin) == ((27, 1000), True)
