"""The lean `ts` launcher that install.sh and the .deb install (tsd/entry.py, issue 10).

The launcher is written by `python -m tsd.entry` exactly as the packaging
writes it, here for this venv's interpreter and this checkout, and run by its
own shebang line (`python -S`), as a shell runs it. It must load neither
site.py (nor the .pth files' modules) nor pip's `re` on everyday calls, and do
everything pip's console script (this venv's `ts`) does, with the same output
and exit codes, against the same real daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from integration.harness import TS, Env, Runner, queue, wait_state, wait_until

REPO = Path(__file__).resolve().parents[2]
# What only a full start-up (site.py and its .pth files) or pip's launcher loads,
# and what an everyday `ts` call must never load (test_client_path.py).
NOT_LOADED = {
    "site", "sitecustomize", "usercustomize", "_distutils_hack", "_sitebuiltins",
    "re", "enum", "dataclasses", "typing", "json", "inspect", "ast",
}  # fmt: skip


@pytest.fixture
def lean_ts(tsd_env: Env) -> str:
    """The launcher, written by `python -m tsd.entry` into the test's directory."""
    text = subprocess.run(
        [sys.executable, "-m", "tsd.entry", "--site", str(REPO)], capture_output=True,
        text=True, check=True, timeout=60, cwd=str(REPO),
    ).stdout  # fmt: skip
    assert text.startswith(f"#!{sys.executable} -S\n")
    path = tsd_env.root / "bin" / "ts"
    path.parent.mkdir()
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def run(
    ts: str, env: Env, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ts, *args], env={**env, **(extra or {})}, capture_output=True, text=True, timeout=60,
        cwd=str(env.tmp),
    )  # fmt: skip


def imported(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules PYTHONPROFILEIMPORTTIME reported (the interpreter's own log of imports)."""
    lines = [x for x in proc.stderr.splitlines() if x.startswith("import time:")]
    assert len(lines) > 10, proc.stderr  # the log is there: the check below can fail
    return {x.rsplit("|", 1)[1].strip() for x in lines[1:]}


def test_everyday_calls_of_the_launcher_load_no_site_and_no_re(
    tsd_env: Env, ts: Runner, lean_ts: str
) -> None:
    job = queue(ts, "echo", "hi")
    wait_state(ts, job, "finished")
    calls = [["true"], ["-l"], [], ["-i", str(job)], ["-s", str(job)], ["-w", str(job)],
             ["-c", str(job)], ["-S"], ["-M", "tab"]]  # fmt: skip
    for args in calls:
        proc = run(lean_ts, tsd_env, *args, extra={"PYTHONPROFILEIMPORTTIME": "1"})
        assert proc.returncode == 0, proc.stderr
        mods = imported(proc)
        assert not mods & NOT_LOADED, f"ts {' '.join(args)} loaded {sorted(mods & NOT_LOADED)}"
        if args == ["true"]:
            # ts COMMAND... with no options: its light path (tsd.plainsubmit), without
            # the option table, the CLI's other actions or the listing.
            assert "tsd.plainsubmit" in mods, mods
            assert not mods & {"tsd.cli", "tsd.cli_options", "tsd.cli_request", "tsd.entry"}, mods
            # Nor __future__ (0.12 ms): its modules do without the annotations import.
            assert "__future__" not in mods, mods
        else:
            assert "tsd.cli" in mods, mods
    # The same call through pip's console script does load them: the difference is real.
    pip = run(TS, tsd_env, "-l", extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert {"site", "re"} <= imported(pip)


def test_the_launcher_answers_as_pips_console_script_does(
    tsd_env: Env, ts: Runner, lean_ts: str
) -> None:
    ok = queue(ts, "echo", "out")
    bad = queue(ts, "sh", "-c", "echo err >&2; exit 3")
    wait_state(ts, bad, "finished")
    wait_state(ts, ok, "finished")
    # A link named ts elsewhere, as /usr/local/bin/ts -> /opt/tsd/bin/ts: argv[0] differs.
    link = tsd_env.root / "link" / "ts"
    link.parent.mkdir()
    link.symlink_to(lean_ts)
    calls = [
        ["-l"], ["-M", "json"], ["-i", str(ok)], ["-c", str(ok)], ["-s", str(bad)],
        ["-w", str(bad)], ["-w", str(ok)], ["-h"], ["--help"], ["-V"], ["-x"],
        ["-i", "9999"], ["-w", "9999"], ["-D", "9999", "true"], ["-G", "-1", "true"],
        # ts COMMAND... (tsd.plainsubmit) refused: a word that is not UTF-8 (as the shell
        # passes it: bytes), and a command over the protocol's limit (the daemon says no).
        ["echo", os.fsdecode(b"\xff")], ["echo", "x" * 70000, "y" * 70000],
    ]  # fmt: skip
    for args in calls:
        want = run(TS, tsd_env, *args)
        for launcher in (lean_ts, str(link)):
            got = run(launcher, tsd_env, *args)
            assert (got.returncode, got.stdout, got.stderr) == (
                want.returncode, want.stdout, want.stderr
            ), f"ts {' '.join(args)} via {launcher}"
    assert run(lean_ts, tsd_env, "-w", str(bad)).returncode == 3
    assert run(lean_ts, tsd_env, "-x").stderr.startswith("ts: ")
    # A submit reads nothing from stdin and prints the new id; its job runs.
    sub = subprocess.run(
        [lean_ts, "sh", "-c", "exit 4"], env=tsd_env, input="ignored\n", capture_output=True,
        text=True, timeout=60, cwd=str(tsd_env.tmp),
    )  # fmt: skip
    assert sub.returncode == 0 and sub.stdout.strip().isdigit(), sub.stderr
    assert run(lean_ts, tsd_env, "-w", sub.stdout.strip()).returncode == 4
    # The light path's job gets the submitter's directory, environment and umask, as a
    # job queued through the full command line does.
    probe = "echo $PWD $TSD_PROBE $(umask)"
    ids = []
    for launcher in (TS, lean_ts):
        got = subprocess.run(
            ["sh", "-c", 'umask 027; exec "$0" sh -c "$1"', launcher, probe],
            env={**tsd_env, "TSD_PROBE": "seen"}, capture_output=True, text=True, timeout=60,
            cwd=str(tsd_env.root),
        )  # fmt: skip
        assert got.returncode == 0 and got.stdout.strip().isdigit(), got.stderr
        ids.append(got.stdout.strip())
    outputs = []
    for job in ids:
        assert run(lean_ts, tsd_env, "-w", job).returncode == 0
        outputs.append(run(lean_ts, tsd_env, "-c", job).stdout)
    assert outputs[0] == outputs[1] == f"{tsd_env.root} seen 0027\n"
    # TS_ENV (a script whose output the job gets) is not the light path's: the command
    # goes on to tsd.cli, which runs it.
    got = run(lean_ts, tsd_env, "true", extra={"TS_ENV": "echo host-info",
                                                "PYTHONPROFILEIMPORTTIME": "1"})
    assert got.returncode == 0 and got.stdout.strip().isdigit(), got.stderr
    assert "tsd.cli" in imported(got)
    assert run(lean_ts, tsd_env, "-i", got.stdout.strip()).stdout.startswith("host-info\n")


def test_the_launcher_prints_and_answers_the_same_shell_completion(
    tsd_env: Env, lean_ts: str
) -> None:
    for shell in ("bash", "zsh", "fish"):
        extra = {"_TS_COMPLETE": f"{shell}_source"}
        want = run(TS, tsd_env, extra=extra)
        got = run(lean_ts, tsd_env, extra=extra)
        assert want.returncode == got.returncode == 0 and got.stdout == want.stdout != ""
    ask = {"_TS_COMPLETE": "bash_complete", "COMP_WORDS": "ts --he", "COMP_CWORD": "1"}
    got = run(lean_ts, tsd_env, extra=ask)
    assert got.returncode == 0 and "--help" in got.stdout
    assert got.stdout == run(TS, tsd_env, extra=ask).stdout


def test_a_signal_ends_a_waiting_launcher_as_it_ends_pips_script(
    tsd_env: Env, ts: Runner, lean_ts: str
) -> None:
    job = queue(ts, "sleep", "60")
    wait_state(ts, job, "running")
    codes = []
    for launcher in (TS, lean_ts):
        for sig in (signal.SIGINT, signal.SIGTERM):
            proc = subprocess.Popen(
                [launcher, "-w", str(job)], env=tsd_env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, cwd=str(tsd_env.tmp),
            )  # fmt: skip
            # Signalled once it waits on the daemon's socket (not after a fixed time, which
            # a loaded machine may spend still starting the interpreter).
            wait_until(lambda p=proc: _connected(p.pid), timeout=30, what="ts -w connected")
            assert proc.poll() is None
            os.kill(proc.pid, sig)
            proc.communicate(timeout=30)
            codes.append(proc.returncode)
    pip_codes, lean_codes = codes[:2], codes[2:]
    assert lean_codes == pip_codes == [130, -signal.SIGTERM]
    ts("-k", str(job))


def _connected(pid: int) -> bool:
    """Whether the process holds a socket (ts connects only once it has started)."""
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            for fd in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False
