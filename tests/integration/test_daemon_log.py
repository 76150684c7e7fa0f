"""The daemon's log (the journal on the system service) tells each job's story in order."""

from __future__ import annotations

import re

from integration.harness import Env, Runner, queue, wait_until


def test_a_job_is_logged_as_queued_before_it_is_logged_as_finished(
    ts: Runner, tsd_env: Env
) -> None:
    # Quick jobs on free slots: each may be over before its submit is answered, and
    # the "queued" line once came after the "finished" one then.
    ts("-S", "4")
    ids = [queue(ts, "true") for _ in range(30)]
    for _ in range(10):  # -nf prints no id: the test is the only client, ids go one by one
        assert ts("-nf", "true").returncode == 0
        ids.append(ids[-1] + 1)
    for job in ids[:30]:
        assert ts("-w", str(job), check=False).returncode == 0
    log = (tsd_env.state / "tsd" / "tsd.log").read_text()
    lines = log.splitlines()
    for job in ids:
        queued = [i for i, line in enumerate(lines) if re.search(rf"\bjob {job} queued by ", line)]
        finished = [i for i, line in enumerate(lines) if re.search(rf"\bjob {job} finished", line)]
        assert len(queued) == 1 and len(finished) == 1, (job, log)
        assert queued[0] < finished[0], (job, lines[queued[0]], lines[finished[0]])


def test_the_log_says_how_the_state_is_made_durable(ts: Runner, tsd_env: Env) -> None:
    ts("-l")
    log = (tsd_env.state / "tsd" / "tsd.log").read_text()
    assert "the state's WAL is fdatasynced by the kernel (AIO)" in log or (
        "the state's WAL is fdatasynced by a thread" in log
    ), log


def test_the_log_moves_aside_past_its_cap_and_keeps_the_newest_lines(
    ts: Runner, tsd_env: Env
) -> None:
    ts("-S", "4", extra_env={"TSD_LOG_MAX_BYTES": "2048"})
    last = 0
    for _ in range(40):
        last = queue(ts, "true")
    assert ts("-w", str(last), check=False).returncode == 0
    wait_until(lambda: f"job {last} finished" in (tsd_env.state / "tsd" / "tsd.log").read_text(),
               what="the last job's line")  # fmt: skip
    files = sorted((tsd_env.state / "tsd").glob("tsd.log*"))
    assert [f.name for f in files] == ["tsd.log", "tsd.log.1", "tsd.log.2"]  # 40 jobs: ~6 KB
    for f in files:
        assert f.stat().st_size <= 2048
    assert ts("-l").returncode == 0  # it goes on serving
