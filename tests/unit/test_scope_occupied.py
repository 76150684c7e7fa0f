"""A job scope's leftovers are read from its cgroup (tsd.scope.SystemdScopes.occupied):
no D-Bus round trip to stop a scope its job left empty, and a stop whenever that
cannot be told for sure."""

from __future__ import annotations

from pathlib import Path

from tsd.scope import SystemdScopes

UNIT = "tsd-job-7.scope"


def scope_dir(root: Path, uid: int = 1000) -> Path:
    d = root / "tsd.slice" / f"tsd-u{uid}.slice" / UNIT
    d.mkdir(parents=True)
    return d


def test_a_populated_scope_is_occupied_and_an_empty_one_is_not(tmp_path: Path) -> None:
    events = scope_dir(tmp_path) / "cgroup.events"
    scopes = SystemdScopes(cgroup_root=str(tmp_path))
    events.write_text("populated 1\nfrozen 0\n")
    assert scopes.occupied(UNIT, 1000)
    events.write_text("populated 0\nfrozen 0\n")
    assert not scopes.occupied(UNIT, 1000)


def test_a_scope_gone_from_its_users_slice_is_not_occupied(tmp_path: Path) -> None:
    (tmp_path / "tsd.slice" / "tsd-u1000.slice").mkdir(parents=True)
    assert not SystemdScopes(cgroup_root=str(tmp_path)).occupied(UNIT, 1000)


def test_a_scope_that_cannot_be_read_counts_as_occupied(tmp_path: Path) -> None:
    scopes = SystemdScopes(cgroup_root=str(tmp_path))
    assert scopes.occupied(UNIT, 1000)  # no such slice here: the tree is not where we look
    scope_dir(tmp_path)  # a scope without cgroup.events (cgroup v1 only, say)
    assert scopes.occupied(UNIT, 1000)
    (tmp_path / "tsd.slice" / "tsd-u1000.slice" / UNIT / "cgroup.events").write_text("frozen 0\n")
    assert scopes.occupied(UNIT, 1000)


def test_the_supervisor_alone_does_not_occupy_its_scope_but_anything_else_does(
    tmp_path: Path,
) -> None:
    """The supervisor reports the job's end on its pipe and waits in the scope for the
    ACK: a scope holding only it needs no stop; another process, or a cgroup below
    (its processes are not in cgroup.procs), does."""
    scope = scope_dir(tmp_path)
    (scope / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    scopes = SystemdScopes(cgroup_root=str(tmp_path))
    (scope / "cgroup.procs").write_text("4242\n")
    assert scopes.occupied(UNIT, 1000)  # nobody said whose pid that is
    assert not scopes.occupied(UNIT, 1000, besides=4242)
    (scope / "cgroup.procs").write_text("4242\n4243\n")
    assert scopes.occupied(UNIT, 1000, besides=4242)
    (scope / "cgroup.procs").write_text("4242\n")
    (scope / "sub").mkdir()
    assert scopes.occupied(UNIT, 1000, besides=4242)
    (scope / "sub").rmdir()
    (scope / "cgroup.procs").unlink()
    assert scopes.occupied(UNIT, 1000, besides=4242)  # cannot tell: occupied
