"""Nothing is lost: daemon crashes and restarts keep queued, running and finished jobs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from integration.harness import Env, Runner, make_env, run_ts, stop_daemon, wait_until


def jobs(ts: Runner) -> dict[int, dict[str, object]]:
    return {j["ID"]: j for j in json.loads(ts("-M", "json").stdout)}


def kill9_daemon(env: Env) -> int:
    pid = env.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: env.daemon_pid() is None)
    return pid


def test_kill9_keeps_queued_running_and_finished_jobs(ts: Runner, tsd_env: Env) -> None:
    flag = tsd_env.tmp / "go"
    assert ts("sh", "-c", "exit 3").stdout.strip() == "1"
    ts("-w", "1", check=False)
    # job 2 runs until we create the flag, then exits 7; job 3 waits behind it (1 slot)
    ts("sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; exit 7")
    ts("sh", "-c", "exit 0")
    wait_until(lambda: jobs(ts)[2]["State"] == "running")
    old = kill9_daemon(tsd_env)

    listed = jobs(ts)  # the next ts call starts a new daemon
    assert tsd_env.daemon_pid() not in (None, old)
    assert listed[1]["State"] == "finished" and listed[1]["E-Level"] == 3
    assert listed[2]["State"] == "running"
    assert listed[3]["State"] == "queued"

    flag.touch()
    assert ts("-w", "2", check=False).returncode == 7
    assert ts("-w", "3", check=False).returncode == 0
    after = jobs(ts)
    assert after[2]["E-Level"] == 7 and after[3]["E-Level"] == 0


def test_job_that_ends_while_no_daemon_runs_keeps_its_exit_code(ts: Runner, tsd_env: Env) -> None:
    flag = tsd_env.tmp / "go"
    ts("sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; exit 5")
    wait_until(lambda: jobs(ts)[1]["State"] == "running")
    kill9_daemon(tsd_env)
    flag.touch()
    time.sleep(0.5)  # the job ends with nobody listening
    assert ts("-w", "1", check=False).returncode == 5
    assert jobs(ts)[1]["E-Level"] == 5


def test_clean_shutdown_leaves_running_jobs_running(ts: Runner, tsd_env: Env) -> None:
    flag = tsd_env.tmp / "go"
    ts("sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; exit 0")
    wait_until(lambda: jobs(ts)[1]["State"] == "running")
    pid = int(ts("-p", "1").stdout)
    ts("-K")
    wait_until(lambda: tsd_env.daemon_pid() is None)
    os.kill(pid, 0)  # still alive
    assert jobs(ts)[1]["State"] == "running"
    flag.touch()
    assert ts("-w", "1", check=False).returncode == 0


def test_kill9_at_random_moments_loses_no_acknowledged_job_and_runs_each_once(
    tsd_env: Env, ts: Runner
) -> None:
    log = tsd_env.tmp / "ran.log"
    acknowledged: list[int] = []
    rng = random.Random(7)
    ts("-S", "2")
    for _round in range(6):
        for _ in range(8):
            proc = run_ts(
                tsd_env, "-n", "sh", "-c", f'echo "$TS_JOBID" >> {log}', check=False
            )
            if proc.returncode == 0:
                acknowledged.append(int(proc.stdout))
        time.sleep(rng.random() * 0.2)
        pid = tsd_env.daemon_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: tsd_env.daemon_pid() is None)
    assert len(acknowledged) == 48
    assert ts("-S").stdout.strip() == "2"  # a setting survives too
    for job_id in acknowledged:
        ts("-w", str(job_id), check=False)
    listed = jobs(ts)
    assert set(acknowledged) <= set(listed)
    assert all(listed[i]["State"] == "finished" and listed[i]["E-Level"] == 0 for i in acknowledged)
    ran = [int(x) for x in log.read_text().split()]
    assert sorted(ran) == sorted(acknowledged), "every job ran exactly once"


# Loaded by the daemon's Python (site, through PYTHONPATH), not by `ts` (isolated): the
# daemon dies (exit 9) once job DIE_AT's start is committed, before it is sent to its
# supervisor: the one moment a reused supervisor holds nothing of a job recorded on it.
DIE_BEFORE_SEND = """
import dataclasses, os
if os.environ.get("DIE_AT"):
    import tsd.supervisorpool as pool
    _launched = pool.SupervisorPool.launched
    def launched(self, member, plan):
        got = _launched(self, member, plan)
        if plan.job_id != int(os.environ["DIE_AT"]):
            return got
        return dataclasses.replace(got, go=lambda: os._exit(9))
    pool.SupervisorPool.launched = launched
"""


def test_a_job_stored_as_started_but_never_sent_before_a_crash_runs_after_it(
    tmp_path: Path,
) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(DIE_BEFORE_SEND)
    env = make_env(tmp_path / "t", PYTHONPATH=str(inject), DIE_AT="2")
    mark = env.tmp / "ran"
    try:
        run_ts(env, "-S", "1")
        first = int(run_ts(env, "true").stdout)
        run_ts(env, "-w", str(first))  # its supervisor is idle now, kept for the next job
        # Job 2 is stored (queued, then started) before the daemon dies; its submit's
        # answer waits for the fsync after, so the client hears nothing.
        run_ts(env, "sh", "-c", f"touch {mark}", check=False)
        second = 2
        wait_until(lambda: env.daemon_pid() is None)
        assert not mark.exists()
        exits = env.state / "tsd" / "exits"
        assert list(exits.glob("idle.*")), "the idle supervisor left its mark"
        del env["DIE_AT"]
        run_ts(env, "-w", str(second), check=False)  # a new daemon: job 2 queued again
        listed = {j["ID"]: j for j in json.loads(run_ts(env, "-M", "json").stdout)}
        assert listed[second]["State"] == "finished" and listed[second]["E-Level"] == 0
        assert mark.exists()
        assert not list(exits.glob("idle.*"))  # acted on, gone
    finally:
        stop_daemon(env)


def test_ts_maxfinished_drops_oldest_finished_jobs_also_across_a_restart() -> None:
    # The rows of jobs forgotten beyond the cap are deleted in batches (tsd.finishedcap):
    # a daemon that stops before a batch leaves them, and the next one's load drops them.
    env = make_env(_short_root(), TS_MAXFINISHED="3")
    try:
        for _ in range(5):
            run_ts(env, "true")
        run_ts(env, "-w", "5")
        time.sleep(0.2)
        listed = json.loads(run_ts(env, "-M", "json").stdout)
        assert [j["ID"] for j in listed] == [3, 4, 5]
        stop_daemon(env)
        with sqlite3.connect(env.state / "tsd" / "state.db") as db:
            assert len(db.execute("SELECT id FROM jobs").fetchall()) == 5  # no batch yet
        listed = json.loads(run_ts(env, "-M", "json").stdout)  # a new daemon
        assert [j["ID"] for j in listed] == [3, 4, 5]
        with sqlite3.connect(env.state / "tsd" / "state.db") as db:
            assert [r[0] for r in db.execute("SELECT id FROM jobs ORDER BY id")] == [3, 4, 5]
            assert [r[0] for r in db.execute("SELECT id FROM job_envs ORDER BY id")] == [3, 4, 5]
    finally:
        stop_daemon(env)
        shutil.rmtree(env.root, ignore_errors=True)


def test_ts_savelist_exports_the_list_when_the_daemon_stops() -> None:
    root = _short_root()
    env = make_env(root, TS_SAVELIST=str(root / "saved.txt"))
    try:
        run_ts(env, "-L", "mylabel", "true")
        run_ts(env, "-w")
        run_ts(env, "-K")
        saved = (root / "saved.txt").read_text() if _wait_file(root / "saved.txt") else ""
        assert "[mylabel]true" in saved.replace(" ", "") or "mylabel" in saved
        assert saved.splitlines()[0].startswith("ID")
    finally:
        stop_daemon(env)
        shutil.rmtree(env.root, ignore_errors=True)


def test_stale_socket_from_a_dead_daemon_is_recovered(ts: Runner, tsd_env: Env) -> None:
    ts("true")
    kill9_daemon(tsd_env)
    assert tsd_env.socket.exists()  # left behind by the dead daemon
    assert ts("echo", "again").stdout.strip() == "2"


def _short_root() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="tsd-it-", dir="/tmp"))


def _wait_file(path: Path, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.stat().st_size:
            return True
        time.sleep(0.05)
    return False


def test_daemon_does_not_poll_when_idle(ts: Runner, tsd_env: Env) -> None:
    ts("true")
    ts("-w")
    pid = tsd_env.daemon_pid()
    assert pid is not None
    # The last job's tail (writes nobody waits for go to disk within 100 ms, the
    # group commit's fsync) settles first; idle is what follows.
    time.sleep(0.5)
    before = _ctx_switches(pid)
    time.sleep(2.0)
    after = _ctx_switches(pid)
    assert after - before <= 2, f"idle daemon woke {after - before} times in 2 s"


def _ctx_switches(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
            total += int(line.split()[1])
    return total


def test_many_concurrent_submitters_lose_nothing(tsd_env: Env, ts: Runner) -> None:
    ts("-S", "4")
    log = tsd_env.tmp / "ran.log"
    script = (
        "import os, sys\n"
        "from tsd.client import Client\n"
        "from tsd import protocol\n"
        "from tsd.model import JobSpec\n"
        "c = Client()\n"
        "ids = []\n"
        "for _ in range(100):\n"
        f"    spec = JobSpec(command=('sh', '-c', 'echo $TS_JOBID >> {log}'), cwd='/',"
        " env=tuple(os.environ.items()), store_output=False)\n"
        "    ids.append(c.call(protocol.Submit(spec=spec))['id'])\n"
        "print(' '.join(map(str, ids)))\n"
    )
    procs = [
        subprocess.Popen(
            [_python(), "-c", script],
            env=dict(tsd_env), stdout=subprocess.PIPE, text=True,
        )
        for _ in range(50)
    ]
    ids: list[int] = []
    # A guard against a hang, not a speed test: 5,000 submits on a loaded 2-core
    # machine may take minutes (bench/ measures speed).
    deadline = time.monotonic() + 900
    for p in procs:
        out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert p.returncode == 0
        ids.extend(int(x) for x in out.split())
    assert len(ids) == 5000 and len(set(ids)) == 5000
    wait_until(lambda: ts("-R").stdout.strip() == "0" and _count(log) == 5000, timeout=240,
               interval=0.5)
    ran = [int(x) for x in log.read_text().split()]
    assert sorted(ran) == sorted(ids)


def _count(path: Path) -> int:
    try:
        return len(path.read_text().split())
    except OSError:
        return 0


def _python() -> str:
    import sys

    return sys.executable
