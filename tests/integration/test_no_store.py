"""ts -n: the job's output is not stored; it goes to the terminal of the ts that queued it."""

from __future__ import annotations

import os
import re
import signal
import subprocess

from integration.harness import TS, Env, Runner, wait_until


def test_nf_prints_the_jobs_output_on_ts_stdout(ts: Runner) -> None:
    proc = ts("-nf", "echo", "hello")
    assert proc.stdout == "hello\n"


def test_n_job_writes_to_the_pipes_of_the_ts_that_queued_it(ts: Runner, tsd_env: Env) -> None:
    queuer = subprocess.Popen(
        [TS, "-n", "sh", "-c", "echo out; echo err >&2"], env=dict(tsd_env),
        cwd=str(tsd_env.tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert queuer.stdout is not None
    # Raw reads, as communicate() reads: a buffered readline could take the job's line
    # too (it may come right after the id, or before it), where communicate() never looks.
    said = b""
    while not re.search(rb"^\d+\n", said, re.MULTILINE):
        chunk = os.read(queuer.stdout.fileno(), 4096)
        assert chunk, f"ts printed no job id: {said!r}"
        said += chunk
    job = re.findall(rb"^(\d+)\n", said, re.MULTILINE)[0].decode()
    ts("-w", job)
    # EOF comes only once ts, the job, its supervisor and the daemon all closed them.
    out, err = queuer.communicate(timeout=20)
    assert queuer.returncode == 0
    assert sorted((said + out).decode().splitlines()) == sorted([job, "out"])
    assert err == b"err\n"


def test_n_job_queued_across_a_daemon_restart_runs_with_output_to_devnull(
    ts: Runner, tsd_env: Env
) -> None:
    ts("-S", "0")
    marker = tsd_env.tmp / "ran"
    queuer = subprocess.Popen(
        [TS, "-n", "sh", "-c", f"echo out; touch {marker}"], env=dict(tsd_env),
        cwd=str(tsd_env.tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    pid = tsd_env.daemon_pid()
    assert pid is not None
    wait_until(lambda: queuer.poll() is not None)
    os.kill(pid, signal.SIGKILL)  # the terminal was held in its memory only
    wait_until(lambda: tsd_env.daemon_pid() is None)
    out, err = queuer.communicate(timeout=20)  # EOF: no copy survives the daemon
    job = out.strip()
    assert job.isdigit() and err == ""
    ts("-S", "1")  # a new daemon: the job starts now
    assert ts("-w", job, check=False).returncode == 0
    assert marker.exists()
    assert ts("-s", job).stdout.strip() == "finished"
