"""A job starts the same whether its supervisor spawns it (posix_spawn) or forks it.

The personal daemon's jobs keep the supervisor's user and are started with
posix_spawn; jobs that drop privileges, reset limits or gzip their output are
forked. Both must give a job the same process (working directory, umask, own
process group, default signals, stdin /dev/null) and the same exit codes and
messages when it cannot start.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsd import execpath, exitreport, joboutput, launch
from tsd.exitreport import ExitReport

# nofile_soft set: the supervisor forks the job (the other path); the value is harmless.
PATHS = {"spawned": {}, "forked": {"nofile_soft": 1024}}


def run_job(
    tmp: Path, how: str, *command: str, cwd: str | None = None, path: str = "/usr/bin:/bin"
) -> tuple[ExitReport, str]:
    """Run a job through a supervisor forked here; its report and its output."""
    exits = tmp / "exits"
    exits.mkdir(exist_ok=True)
    plan = launch.LaunchPlan(
        job_id=1, uid=os.getuid(), gid=os.getgid(), user="me", command=command,
        cwd=cwd or str(tmp), env={"PATH": path}, umask=0o027,
        log_dir=str(tmp), exits_dir=str(exits), drop_privileges=False,
        **PATHS[how],  # type: ignore[arg-type]
    )
    started = launch.spawn(plan)
    started.go()
    os.waitpid(started.supervisor_pid, 0)
    os.close(started.report_fd)
    report = exitreport.read(exits, 1)
    assert report is not None
    exitreport.discard(exits, 1)
    output = Path(report.output).read_text() if report.output else ""
    return report, output


@pytest.mark.parametrize("how", PATHS)
def test_the_job_gets_its_cwd_umask_own_group_default_signals_and_null_stdin(
    tmp_path: Path, how: str
) -> None:
    report, out = run_job(tmp_path, how, "cat", "/proc/self/status", "/proc/self/stat")
    assert report.exit.code == 0
    status = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
    assert status["Umask"].strip() == "0027"
    # Signals 1-31 (above are glibc's own and whatever this test's caller ignores).
    assert int(status["SigIgn"], 16) & 0x7FFFFFFF == 0
    assert int(status["SigBlk"], 16) & 0x7FFFFFFF == 0
    stat_line = out.splitlines()[-1]
    fields = stat_line[stat_line.rfind(")") + 2 :].split()
    assert fields[2] == stat_line.split()[0]  # pgrp == pid: its own process group
    report, out = run_job(tmp_path, how, "sh", "-c", "pwd; readlink /proc/self/fd/0")
    assert out.split() == [str(tmp_path), "/dev/null"]
    assert stat.S_IMODE(os.stat(report.output or "").st_mode) == 0o600


@pytest.mark.parametrize("how", PATHS)
def test_an_unknown_command_exits_127_and_says_so_in_its_output(tmp_path: Path, how: str) -> None:
    report, out = run_job(tmp_path, how, "no-such-command-here")
    assert report.exit.code == 127
    assert out == "tsd: cannot run 'no-such-command-here': No such file or directory\n"


@pytest.mark.parametrize("how", PATHS)
def test_a_file_that_is_not_executable_exits_126(tmp_path: Path, how: str) -> None:
    script = tmp_path / "script"
    script.write_text("echo no\n")
    report, out = run_job(tmp_path, how, str(script))
    assert report.exit.code == 126
    assert out == f"tsd: cannot run {str(script)!r}: Permission denied\n"


@pytest.mark.parametrize("how", PATHS)
def test_a_missing_working_directory_means_the_job_could_not_start(
    tmp_path: Path, how: str
) -> None:
    gone = tmp_path / "gone"
    report, _ = run_job(tmp_path, how, "true", cwd=str(gone))
    assert report.exit.code == 127
    assert report.exit.note.startswith("could not start: ") and str(gone) in report.exit.note


@pytest.mark.parametrize("how", PATHS)
def test_a_command_is_found_on_the_jobs_path_not_the_supervisors(
    tmp_path: Path, how: str
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "my-tool"
    tool.write_text("#!/bin/sh\necho mine\n")
    tool.chmod(0o755)
    exits = tmp_path / "exits"
    exits.mkdir()
    plan = launch.LaunchPlan(
        job_id=2, uid=os.getuid(), gid=os.getgid(), user="me", command=("my-tool",),
        cwd=str(tmp_path), env={"PATH": f"/nonexistent:{bin_dir}"}, umask=0o022,
        log_dir=str(tmp_path), exits_dir=str(exits), drop_privileges=False,
        **PATHS[how],  # type: ignore[arg-type]
    )
    started = launch.spawn(plan)
    started.go()
    os.waitpid(started.supervisor_pid, 0)
    os.close(started.report_fd)
    report = exitreport.read(exits, 2)
    assert report is not None and report.exit.code == 0 and report.output
    assert Path(report.output).read_text() == "mine\n"


@pytest.mark.parametrize("how", PATHS)
def test_path_is_searched_as_execvp_does(tmp_path: Path, how: str) -> None:
    """The first executable on PATH runs: a directory without it or with a file that
    cannot run is passed over, and an empty entry is the job's working directory."""
    (tmp_path / "none").mkdir()
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "hello").write_text("#!/bin/sh\necho blocked\n")  # mode 0644
    for where in ("first", "second"):
        (tmp_path / where).mkdir()
        exe = tmp_path / where / "hello"
        exe.write_text(f"#!/bin/sh\necho {where}\n")
        exe.chmod(0o755)
    dirs = [tmp_path / d for d in ("none", "blocked", "first", "second")]
    report, out = run_job(tmp_path, how, "hello", path=":".join(map(str, dirs)))
    assert (report.exit.code, out) == (0, "first\n")
    report, out = run_job(
        tmp_path, how, "hello", cwd=str(tmp_path / "second"), path=f"{tmp_path / 'none'}::/bin"
    )
    assert (report.exit.code, out) == (0, "second\n")


def test_a_reused_supervisor_searches_path_again_for_each_job(tmp_path: Path) -> None:
    """The same PATH and command in one process (a reused supervisor): a program put
    in an earlier PATH directory since the last job is the one the next job runs."""
    early, late = tmp_path / "early", tmp_path / "late"
    for d in (early, late):
        d.mkdir()
    (late / "hello").write_text("#!/bin/sh\necho late\n")
    (late / "hello").chmod(0o755)
    plan = launch.LaunchPlan(
        job_id=5, uid=os.getuid(), gid=os.getgid(), user="me", command=("hello",),
        cwd=str(tmp_path), env={"PATH": f"{early}:{late}"}, umask=0o022,
        log_dir=str(tmp_path), exits_dir=str(tmp_path), drop_privileges=False, reuse=True,
    )
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            launch.become_supervisor()
            launch.run_job(plan, rep_w, None)
            (early / "hello").write_text("#!/bin/sh\necho early\n")
            (early / "hello").chmod(0o755)
            launch.run_job(plan, rep_w, None)
        finally:
            os._exit(0)
    os.close(rep_w)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with os.fdopen(rep_r) as fh:
        outputs = [line.split()[1] for line in fh.read().splitlines() if line.startswith("out ")]
    assert [Path(o).read_text() for o in outputs] == ["late\n", "early\n"]


def _outcome(tmp: Path, start: Callable[[], None]) -> str:
    """What a child running `start` (which execs or spawns "hello") printed, or the
    errno it failed with."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(w, 1)
            os.chdir(tmp)
            start()
        except OSError as exc:
            os.write(w, f"errno {exc.errno}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as fh:
        return fh.read().strip()


KINDS = ("missing", "empty", "not executable", "a directory", "runs")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(KINDS), max_size=4), st.booleans(), st.booleans())
def test_the_spawned_search_runs_what_execvp_runs_or_fails_as_it_does(
    kinds: list[str], has_path: bool, empty_entry: bool
) -> None:
    """Whatever PATH holds (directories without the command, with a file or directory
    of its name that cannot run, with one that runs; an empty entry, the working
    directory; no PATH at all), a spawned job runs the program os.execvpe runs, or
    fails with the same error."""
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        entries = []
        for i, kind in enumerate(kinds):
            d = tmp / f"d{i}"
            entries.append(str(d))
            if kind == "missing":
                continue
            d.mkdir()
            if kind == "a directory":
                (d / "hello").mkdir()
            elif kind != "empty":
                (d / "hello").write_text(f"#!/bin/sh\necho {i}\n")
                (d / "hello").chmod(0o755 if kind == "runs" else 0o644)
        if empty_entry:  # the working directory, where a "hello" runs
            entries.insert(len(entries) // 2, "")
            (tmp / "hello").write_text("#!/bin/sh\necho cwd\n")
            (tmp / "hello").chmod(0o755)
        env = {"PATH": ":".join(entries)} if has_path else {}
        argv = ["hello"]

        def spawned() -> None:
            pid = execpath.spawn_on_path(argv, env)
            os.waitpid(pid, 0)

        execvp = _outcome(tmp, lambda: os.execvpe("hello", argv, env))
        assert _outcome(tmp, spawned) == execvp
        assert _outcome(tmp, spawned) == execvp  # again, with PATH already in place


def test_an_output_file_name_is_the_job_id_and_six_random_letters_or_digits(
    tmp_path: Path,
) -> None:
    names = set()
    for _ in range(50):
        fd, path = joboutput.mkstemp(str(tmp_path), "ts-out.7.")
        os.close(fd)
        assert re.fullmatch(r"ts-out\.7\.[A-Za-z0-9]{6}", Path(path).name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        names.add(path)
    assert len(names) == 50
