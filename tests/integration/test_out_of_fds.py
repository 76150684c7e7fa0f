"""A daemon out of file descriptors neither spins nor floods its log, and recovers.

A personal daemon under a low `ulimit -n` whose running jobs hold part of its
descriptors is flooded with idle connections until accept() fails with EMFILE.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

from integration.harness import Env, Runner, queue, wait_until

NOFILE = 64
# Each running job holds two of the daemon's descriptors (its report pipe, its reused
# supervisor's link): these jobs leave room under the limit for some connections.
JOBS = 16


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_fds_on_accept_pauses_quietly_and_resumes_when_some_close(
    ts: Runner, tsd_env: Env
) -> None:
    tsd_env["TS_SLOTS"] = str(JOBS)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "tsd.daemon", "--user", "--socket", str(tsd_env.socket)],
        env=dict(tsd_env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=_limit_fds, cwd="/",
    )
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: tsd_env.socket.exists(), what="the daemon's socket")
        jobs = [queue(ts, "sleep", "120") for _ in range(JOBS)]
        wait_until(lambda: ts("-R").stdout.strip() == str(JOBS), timeout=60,
                   what="every job running")
        log_path = tsd_env.state / "tsd" / "tsd.log"
        for _ in range(NOFILE):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(str(tsd_env.socket))
            except BlockingIOError:  # the backlog is full: enough
                c.close()
                break
            clients.append(c)
        wait_until(lambda: "Too many open files" in log_path.read_text(), timeout=15,
                   what="the daemon to run out of descriptors")
        cpu0 = _cpu_seconds(daemon.pid)
        time.sleep(4)
        spent = _cpu_seconds(daemon.pid) - cpu0
        assert spent < 0.5, f"the daemon spun: {spent:.2f}s of CPU in 4s"
        text = log_path.read_text()
        noisy = [line for line in text.splitlines()
                 if "descriptor" in line or "accept" in line or "Traceback" in line
                 or "Too many open files" in line]
        assert len(noisy) == 1, noisy
        # Descriptors come back when connections close: the daemon accepts again.
        for c in clients:
            c.close()
        clients.clear()
        t0 = time.monotonic()
        assert ts("-l", timeout=30).stdout.startswith("ID")
        assert time.monotonic() - t0 < 5
        assert "accepting connections again" in log_path.read_text()
        assert daemon.poll() is None
        ts("-k", str(jobs[0]))
    finally:
        for c in clients:
            c.close()
        if daemon.poll() is None:
            ts("-T", check=False)
