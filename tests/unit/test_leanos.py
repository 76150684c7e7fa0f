"""tsd.leanos answers as os and os.path do, for the calls `ts` makes without loading os."""

from __future__ import annotations

import os
import posixpath
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tsd import leanos

REPO = Path(__file__).resolve().parents[2]
# Paths built from the parts that matter to the rules: slashes, dots, names.
paths = st.lists(st.sampled_from(["/", "//", ".", "..", "a", "b.c", "..d", "", "é"]),
                 max_size=8).map("".join)  # fmt: skip


@given(paths)
def test_normpath_agrees_with_posixpath(path: str) -> None:
    assert leanos.normpath(path) == posixpath.normpath(path)


@given(paths)
def test_dirname_agrees_with_posixpath(path: str) -> None:
    assert leanos.dirname(path) == posixpath.dirname(path)


@given(paths, st.lists(paths, max_size=3))
def test_join_agrees_with_posixpath(first: str, rest: list[str]) -> None:
    assert leanos.join(first, *rest) == posixpath.join(first, *rest)


@given(paths)
def test_abspath_agrees_with_posixpath(path: str) -> None:
    assert leanos.abspath(path) == posixpath.abspath(path)


def test_exists_lexists_and_isdir_tell_links_files_and_directories_apart(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "dirlink").symlink_to(tmp_path)
    for name in ("file", "dangling", "dirlink", "nowhere", "file/below", "bad\0name"):
        path = str(tmp_path / name)
        assert leanos.exists(path) == os.path.exists(path), name
        assert leanos.lexists(path) == os.path.lexists(path), name
        assert leanos.isdir(path) == os.path.isdir(path), name


def test_environ_is_os_environ_once_os_is_loaded() -> None:
    # Tests and the daemon change the environment through os: posix's copy would miss it.
    assert leanos.environ() is os.environ


def test_environ_without_os_decodes_every_variable_as_os_would() -> None:
    """In a fresh interpreter without site (as the launcher runs ts): os stays unloaded,
    and the environment, undecodable bytes included, reads as os.environ would."""
    probe = (
        "import sys; from tsd import leanos; env = leanos.environ(); "
        "assert 'os' not in sys.modules, 'os loaded'; import os; "
        "assert env == dict(os.environ), (env, dict(os.environ)); print(env['TSD_PROBE'])"
    )
    env = {b"PYTHONPATH": str(REPO).encode(), b"TSD_PROBE": b"caf\xc3\xa9 \xff raw"}
    proc = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"caf\xc3\xa9 \xff raw\n"
