"""Every ts flag end to end: the real `ts` against a real personal daemon.

Each test gets its own daemon (the `ts` fixture starts it on the first call)
with one slot unless it sets more. Jobs are short shell commands; tests wait
for states by polling `ts -s`, never by sleeping a fixed time and hoping.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from integration.harness import Env, Runner, alive, queue, state, wait_state, wait_until

TS = str(Path(sys.executable).parent / "ts")

HEADER_RE = re.compile(
    r"^ID   State      Output {8,}E-Level  Time   GPUs  Command \[run=(\d+)/(\d+)\]$"
)


# ----------------------------------------------------------------- helpers




def finish(ts: Runner, job: int) -> int:
    """Wait for the job with -w; its exit status."""
    return int(ts("-w", str(job), check=False, timeout=60).returncode)


def output_path(ts: Runner, job: int) -> Path:
    return Path(ts("-o", str(job)).stdout.strip())


def list_rows(ts: Runner, *args: str) -> dict[int, str]:
    lines = ts("-l", *args).stdout.splitlines()
    return {int(line.split()[0]): line for line in lines[1:]}


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ts: "), proc.stderr
    return lines[0]


# ------------------------------------------------------------ submitting


def test_queueing_prints_the_new_id_and_ids_increase(ts: Runner) -> None:
    first = queue(ts, "true")
    second = queue(ts, "true")
    assert second > first


def test_no_arguments_lists_jobs_under_task_spoolers_header(ts: Runner) -> None:
    job = queue(ts, "echo", "hi")
    assert finish(ts, job) == 0
    proc = ts()
    lines = proc.stdout.splitlines()
    assert HEADER_RE.match(lines[0]), lines[0]
    assert HEADER_RE.match(lines[0]).group(2) == "1"  # type: ignore[union-attr]
    row = lines[1].split()
    assert row[0] == str(job) and row[1] == "finished" and row[3] == "0"
    assert re.fullmatch(r"[0-9.]+s", row[4])
    assert lines[1].endswith("echo hi")
    assert ts("-l").stdout == proc.stdout


def test_a_listing_to_a_closed_stdout_is_one_line_error_not_a_traceback(
    tsd_env: Env, ts: Runner
) -> None:
    queue(ts, "true")
    proc = subprocess.run(
        ["sh", "-c", f"exec {TS} -l >&-"], env=dict(tsd_env), capture_output=True,
        text=True, timeout=30,
    )
    assert proc.returncode == 1
    assert proc.stderr == "ts: write error: standard output is closed\n"


def test_list_shows_label_before_command_and_the_error_level(ts: Runner) -> None:
    job = queue(ts, "-L", "exp1", "sh", "-c", "exit 3")
    assert finish(ts, job) == 3
    row = list_rows(ts)[job]
    assert row.split()[3] == "3"
    assert row.endswith("[exp1]sh -c exit 3")
    assert ts("-a", str(job)).stdout == "exp1\n"
    assert ts("--get_label", str(job)).stdout == "exp1\n"


def test_option_parsing_stops_at_the_command(ts: Runner, tsd_env: dict[str, str]) -> None:
    job = queue(ts, "-L", "x", "sh", "-c", 'echo "$@"', "sh", "--lr", "3", "-n")
    assert finish(ts, job) == 0
    assert output_path(ts, job).read_text() == "--lr 3 -n\n"
    assert ts("-F", str(job)).stdout == 'sh -c echo "$@" sh --lr 3 -n\n'


def test_A_lists_every_user_with_a_user_column(ts: Runner) -> None:
    job = queue(ts, "true")
    finish(ts, job)
    lines = ts("-A").stdout.splitlines()
    assert lines[0].startswith("ID   User     State")
    user = lines[1].split()[1]
    import pwd

    assert user == pwd.getpwuid(os.getuid()).pw_name


def test_n_stores_no_output(ts: Runner) -> None:
    # The output went to this ts's stdout (as task-spooler's -n), beside the id.
    lines = ts("-n", "echo", "lost").stdout.splitlines()
    job = int(next(line for line in lines if line.isdigit()))
    assert "lost" in lines
    assert finish(ts, job) == 0
    assert list_rows(ts)[job].split()[2] == "stdout"
    proc = ts("-o", str(job), check=False)
    assert proc.returncode == 1
    assert "does not store its output" in one_line_error(proc)


def test_E_keeps_stderr_apart_in_output_dot_e(ts: Runner) -> None:
    job = queue(ts, "-E", "sh", "-c", "echo out; echo err >&2")
    assert finish(ts, job) == 0
    out = output_path(ts, job)
    assert out.read_text() == "out\n"
    assert Path(f"{out}.e").read_text() == "err\n"


def test_without_E_stderr_goes_to_the_output_file(ts: Runner) -> None:
    job = queue(ts, "sh", "-c", "echo out; echo err >&2")
    assert finish(ts, job) == 0
    assert sorted(output_path(ts, job).read_text().split()) == ["err", "out"]


def test_z_output_is_gzip_readable_by_zcat_and_by_c(ts: Runner) -> None:
    job = queue(ts, "-z", "sh", "-c", "seq 1 20")
    assert finish(ts, job) == 0
    path = output_path(ts, job)
    expected = "".join(f"{i}\n" for i in range(1, 21))
    assert subprocess.run(["zcat", str(path)], capture_output=True, text=True).stdout == expected
    assert gzip.decompress(path.read_bytes()).decode() == expected
    assert ts("-c", str(job)).stdout == expected
    assert ts("-t", str(job)).stdout == "".join(f"{i}\n" for i in range(11, 21))


def test_O_names_the_output_file_in_the_log_dir(ts: Runner, tsd_env: dict[str, str]) -> None:
    job = queue(ts, "-O", "my.log", "echo", "named")
    assert finish(ts, job) == 0
    path = output_path(ts, job)
    assert path.name == "my.log"
    assert path.read_text() == "named\n"
    proc = ts("-O", "a/b", "true", check=False)
    assert proc.returncode == 1 and "without any path" in one_line_error(proc)


def test_f_waits_and_exits_with_the_job_code(ts: Runner) -> None:
    proc = ts("-f", "sh", "-c", "sleep 0.2; exit 4", check=False)
    assert proc.returncode == 4
    job = int(proc.stdout)
    assert state(ts, job) == "finished"


def test_nf_is_transparent_prints_nothing_and_exits_with_the_job_code(ts: Runner) -> None:
    proc = ts("-nf", "sh", "-c", "exit 5", check=False)
    assert proc.returncode == 5
    assert proc.stdout == "" and proc.stderr == ""


def test_m_needs_stored_plain_output(ts: Runner) -> None:
    for flags in (["-m", "-n"], ["-m", "-z"]):
        proc = ts(*flags, "true", check=False)
        assert proc.returncode == 1
        assert "e-mail" in one_line_error(proc)


def test_m_job_is_queued_and_runs(ts: Runner, tsd_env: dict[str, str]) -> None:
    job = queue(ts, "-m", "echo", "mailed", extra_env={"TS_MAILTO": "nobody@localhost"})
    assert finish(ts, job) == 0
    assert output_path(ts, job).read_text() == "mailed\n"


@pytest.mark.skipif(os.path.exists("/usr/sbin/sendmail"), reason="a mail program is installed")
def test_m_without_a_mail_program_says_so_at_submit_and_in_ts_i(ts: Runner) -> None:
    proc = ts("-m", "echo", "hi", extra_env={"TS_MAILTO": "nobody@localhost"})
    assert proc.stderr == (
        "ts: warning: -m: /usr/sbin/sendmail does not exist, so no mail will be sent\n"
    )
    job = int(proc.stdout)
    assert finish(ts, job) == 0
    assert "mail not sent: /usr/sbin/sendmail could not be run" in ts("-i", str(job)).stdout


def _has_nvml() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_has_nvml(), reason="this machine has NVML (a GPU driver)")
def test_G_on_a_machine_without_nvml_is_refused_at_submit_in_one_line(ts: Runner) -> None:
    proc = ts("-G", "1", "true", check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no GPUs" in one_line_error(proc)
    assert ts("-M", "json").stdout.strip() == "[]"


# ----------------------------------------------------------- dependencies


def gated(env: Env, name: str, then: str, before: str = "") -> tuple[str, ...]:
    """A command that runs `before`, waits until the test creates the file `name`,
    then runs `then`: the test, not the machine's speed, decides when it ends."""
    gate = Path(env.tmp) / name
    return ("sh", "-c", f"{before}while [ ! -e {gate} ]; do sleep 0.02; done; {then}")


def test_d_runs_after_the_last_job_ends(ts: Runner, tsd_env: Env) -> None:
    ts("-S", "2")
    first = queue(ts, *gated(tsd_env, "first", "exit 1"))
    second = queue(ts, "-d", "sh", "-c", "exit 0")
    assert state(ts, second) == "queued"
    (Path(tsd_env.tmp) / "first").touch()
    assert finish(ts, second) == 0  # -d runs whatever the first's exit
    data = {j["ID"]: j for j in json.loads(ts("-M", "json").stdout)}
    assert data[second]["Start"] >= data[first]["End"]
    assert data[second]["Depends"] == [first]


def test_D_waits_for_the_given_ids_whatever_their_exit(ts: Runner, tsd_env: Env) -> None:
    ts("-S", "3")
    a = queue(ts, *gated(tsd_env, "a", "exit 2"))
    b = queue(ts, *gated(tsd_env, "b", "true"))
    c = queue(ts, "-D", f"{a},{b}", "true")
    assert state(ts, c) == "queued"
    (Path(tsd_env.tmp) / "a").touch()
    wait_state(ts, a, "finished")
    assert state(ts, c) == "queued"  # b still runs
    (Path(tsd_env.tmp) / "b").touch()
    assert finish(ts, c) == 0
    data = {j["ID"]: j for j in json.loads(ts("-M", "json").stdout)}
    assert data[c]["Start"] >= max(data[a]["End"], data[b]["End"])
    assert list_rows(ts)[c].endswith(f"[{a},{b}]&& true")


def test_W_skips_the_whole_chain_when_a_dependency_fails(ts: Runner) -> None:
    bad = queue(ts, "sh", "-c", "exit 1")
    skipped = queue(ts, "-W", str(bad), "echo", "never")
    chained = queue(ts, "-W", str(skipped), "echo", "never")
    assert finish(ts, chained) == 255
    assert state(ts, skipped) == "skipped"
    assert state(ts, chained) == "skipped"
    assert finish(ts, skipped) == 255
    assert "(no output)" in list_rows(ts)[skipped]


def test_W_runs_when_every_dependency_succeeds(ts: Runner) -> None:
    good = queue(ts, "true")
    job = queue(ts, "-W", str(good), "echo", "ran")
    assert finish(ts, job) == 0
    assert output_path(ts, job).read_text() == "ran\n"


def test_unknown_dependency_id_is_an_error(ts: Runner) -> None:
    for flag in ("-D", "-W"):
        proc = ts(flag, "999", "true", check=False)
        assert proc.returncode == 1
        assert "999" in one_line_error(proc)


# --------------------------------------------------------- slots and queue


def test_N_more_than_the_slots_is_refused_at_submit(ts: Runner) -> None:
    proc = ts("-N", "5", "true", check=False)
    assert proc.returncode == 1
    assert "slots" in one_line_error(proc)


def test_N_job_takes_several_slots(ts: Runner) -> None:
    ts("-S", "2")
    big = queue(ts, "-N", "2", "sleep", "30")
    wait_state(ts, big, "running")
    small = queue(ts, "true")
    time.sleep(0.3)
    assert state(ts, small) == "queued"
    assert HEADER_RE.match(ts("-l").stdout.splitlines()[0]).groups() == ("2", "2")  # type: ignore[union-attr]
    ts("-k", str(big))
    assert finish(ts, small) == 0


def test_S_gets_and_sets_the_slots_and_0_drains(ts: Runner) -> None:
    assert ts("-S").stdout == "1\n"
    assert ts("-S", "3").stdout == ""
    assert ts("-S").stdout == "3\n"
    ts("-S", "0")
    job = queue(ts, "true")
    time.sleep(0.3)
    assert state(ts, job) == "queued"
    ts("-S", "1")
    assert finish(ts, job) == 0


def test_B_exits_2_when_the_queue_is_full(ts: Runner, tsd_env: dict[str, str]) -> None:
    tsd_env["TS_MAXCONN"] = "2"  # read by the personal daemon at its start
    ts("-S", "0")
    queue(ts, "true")
    queue(ts, "true")
    proc = ts("-B", "true", check=False)
    assert proc.returncode == 2
    assert "full" in one_line_error(proc)
    assert proc.stdout == ""


def test_full_queue_without_B_says_once_why_it_waits_and_ctrl_c_queues_nothing(
    ts: Runner, tsd_env: Env
) -> None:
    tsd_env["TS_MAXCONN"] = "2"  # read by the personal daemon at its start
    ts("-S", "0")
    queue(ts, "true")
    last = queue(ts, "true")
    proc = subprocess.Popen(
        [TS, "true"], env=dict(tsd_env), cwd=str(tsd_env.tmp),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # blocks until ts says it waits
        assert line == (
            "ts: your queue is full (2 jobs waiting); waiting for room (Ctrl-C to give up)\n"
        )
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (130, "", "")
    ts("-S", "1")  # room now: a job the daemon still held would be queued now
    time.sleep(0.3)
    assert ts("-q").stdout == f"{last}\n"
    assert len(json.loads(ts("-M", "json").stdout)) == 2


def test_R_counts_running_jobs(ts: Runner) -> None:
    assert ts("-R").stdout == "0\n"
    job = queue(ts, "sleep", "30")
    wait_state(ts, job, "running")
    assert ts("--count_running").stdout == "1\n"
    ts("-k", str(job))


def test_q_shows_the_last_added_id(ts: Runner) -> None:
    queue(ts, "true")
    last = queue(ts, "true")
    assert ts("-q").stdout == f"{last}\n"
    assert ts("--last_queue_id").stdout == f"{last}\n"


# ------------------------------------------------------------ inspecting


def test_s_shows_each_state(ts: Runner) -> None:
    running = queue(ts, "sleep", "30")
    wait_state(ts, running, "running")
    queued = queue(ts, "true")
    assert ts("-s").stdout == "queued\n"  # default: the last added
    assert state(ts, queued) == "queued"
    ts("-k", str(running))
    assert finish(ts, queued) == 0
    assert state(ts, queued) == "finished"


def test_p_shows_the_pid_of_the_running_job(ts: Runner, tsd_env: dict[str, str]) -> None:
    job = queue(ts, "sh", "-c", "echo $$ > pid.txt; sleep 30")
    pid_file = Path(tsd_env["TMPDIR"]) / "pid.txt"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", what="pid file")
    shown = int(ts("-p").stdout)
    assert shown == int(ts("-p", str(job)).stdout)
    assert shown == int(pid_file.read_text())
    ts("-k", str(job))


def test_o_shows_the_output_file_of_the_last_run_job(ts: Runner) -> None:
    job = queue(ts, "echo", "x")
    assert finish(ts, job) == 0
    path = Path(ts("-o").stdout.strip())
    assert path.is_absolute() and path.read_text() == "x\n"
    assert re.fullmatch(rf"ts-out\.{job}\..+", path.name)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_i_shows_task_spoolers_fields_and_tsds(ts: Runner) -> None:
    job = queue(
        ts, "-L", "lab", "sh", "-c", "exit 3", extra_env={"TS_ENV": "echo host-info"}
    )
    assert finish(ts, job) == 3
    text = ts("-i", str(job)).stdout
    lines = text.splitlines()
    assert lines[0] == "host-info"
    for expected in ("Exit status: died with exit code 3", "Command: sh -c exit 3",
                     "Slots required: 1", "Label: lab"):
        assert expected in lines, text
    for prefix in ("Enqueue time: ", "Start time: ", "End time: ", "Time run: ",
                   "User: ", "Output: "):
        assert any(line.startswith(prefix) for line in lines), (prefix, text)
    assert ts("-i").stdout == text  # default: the last run


def test_i_of_a_queued_job_says_why_it_waits(ts: Runner) -> None:
    ts("-S", "2")
    first = queue(ts, "sleep", "30")
    wait_state(ts, first, "running")
    dependent = queue(ts, "-D", str(first), "true")
    big = queue(ts, "-N", "2", "true")
    for job, needle in ((dependent, str(first)), (big, "slot")):
        text = ts("-i", str(job)).stdout
        assert "Exit status" not in text
        assert "State: queued" in text
        reason = [ln for ln in text.splitlines() if ln.startswith("Wait reason: ")]
        assert reason and needle in reason[0], text
    ts("-k", str(first))


def test_i_of_a_job_in_a_drained_queue_says_why_it_waits(ts: Runner) -> None:
    ts("-S", "0")
    job = queue(ts, "true")
    text = ts("-i", str(job)).stdout
    assert any(ln.startswith("Wait reason: ") for ln in text.splitlines()), text


# ------------------------------------------------------------- -t and -c


def test_c_shows_all_the_output_and_exits_with_the_job_code(ts: Runner) -> None:
    job = queue(ts, "sh", "-c", "seq 1 30; sleep 0.5; echo done; exit 6")
    proc = ts("-c", str(job), check=False)
    assert proc.returncode == 6
    assert proc.stdout == "".join(f"{i}\n" for i in range(1, 31)) + "done\n"


def test_t_follows_from_the_last_ten_lines(ts: Runner, tsd_env: Env) -> None:
    seen = Path(tsd_env.tmp) / "seq-done"
    queue(ts, *gated(tsd_env, "later", "echo later", before=f"seq 1 30; touch {seen}; "))
    wait_until(seen.exists, what="the first 30 lines")
    follower = subprocess.Popen(
        [TS, "-t"], env=dict(tsd_env), cwd=str(tsd_env.tmp),  # default: the last run job
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert follower.stdout is not None
        lines = [follower.stdout.readline() for _ in range(10)]
        (Path(tsd_env.tmp) / "later").touch()
        rest, _ = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0
    assert "".join(lines) + rest == "".join(f"{i}\n" for i in range(21, 31)) + "later\n"


def test_t_waits_for_a_queued_job_to_start(ts: Runner, tsd_env: dict[str, str]) -> None:
    ts("-S", "0")
    job = queue(ts, "sh", "-c", "echo started; sleep 0.3; echo eventually; exit 3")
    follower = subprocess.Popen(
        [TS, "-t", str(job)], env=tsd_env, cwd=tsd_env["TMPDIR"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.3)
        assert follower.poll() is None  # still waiting for the job to start
        ts("-S", "1")
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 3, err
    assert out == "started\neventually\n"


def test_t_on_a_job_without_output_says_so(ts: Runner) -> None:
    job = queue(ts, "-n", "sh", "-c", "exit 2")
    proc = ts("-t", str(job), check=False)
    assert proc.returncode == 2
    assert "does not store its output" in one_line_error(proc)


# ------------------------------------------------------------ waiting


def test_w_exits_with_the_job_code_or_255(ts: Runner) -> None:
    ok = queue(ts, "true")
    assert finish(ts, ok) == 0
    bad = queue(ts, "sh", "-c", "exit 7")
    assert finish(ts, bad) == 7
    killed = queue(ts, "sleep", "30")
    wait_state(ts, killed, "running")
    ts("-k", str(killed))
    assert finish(ts, killed) == 255
    last = queue(ts, "sh", "-c", "exit 9")
    assert ts("-w", check=False).returncode == 9  # default: the last added
    assert last


def test_w_of_an_unknown_job_is_an_error(ts: Runner) -> None:
    proc = ts("-w", "999", check=False)
    assert proc.returncode == 1
    assert "999" in one_line_error(proc)


# ------------------------------------------------------- changing the queue


def test_r_removes_the_first_queued_job(ts: Runner) -> None:
    ts("-S", "0")
    first = queue(ts, "true")
    second = queue(ts, "true")
    assert ts("-r", str(first)).stdout == ""
    rows = list_rows(ts)
    assert first not in rows and second in rows
    proc = ts("-s", str(first), check=False)
    assert proc.returncode == 1


def test_r_without_id_removes_the_last_added(ts: Runner) -> None:
    ts("-S", "0")
    first = queue(ts, "true")
    second = queue(ts, "true")
    ts("-r")
    assert set(list_rows(ts)) == {first}
    assert second


def test_r_refuses_a_running_job(ts: Runner) -> None:
    job = queue(ts, "sleep", "30")
    wait_state(ts, job, "running")
    proc = ts("-r", str(job), check=False)
    assert proc.returncode == 1
    one_line_error(proc)
    assert state(ts, job) == "running"
    ts("-k", str(job))


def test_u_moves_a_job_to_the_front(ts: Runner) -> None:
    ts("-S", "0")
    a, b, c = (queue(ts, "true") for _ in range(3))
    ts("-u", str(c))
    assert list(list_rows(ts)) == [c, a, b]
    ts("-u")  # default: the last added (c) again; stays first
    assert list(list_rows(ts)) == [c, a, b]


def test_U_swaps_two_queued_jobs(ts: Runner) -> None:
    ts("-S", "0")
    a, b, c = (queue(ts, "true") for _ in range(3))
    ts("-U", f"{a}-{c}")
    assert list(list_rows(ts)) == [c, b, a]
    proc = ts("-U", f"{a}-{a}", check=False)
    assert proc.returncode == 1 and "different" in one_line_error(proc)


def test_C_clears_finished_jobs_only(ts: Runner) -> None:
    done = queue(ts, "true")
    assert finish(ts, done) == 0
    ts("-S", "0")
    waiting = queue(ts, "true")
    assert ts("-C").stdout == ""
    assert list(list_rows(ts)) == [waiting]


# --------------------------------------------------------------- killing


@pytest.mark.parametrize("child", ["sleep 300 &", "setsid sleep 300 &"])
def test_k_leaves_nothing_running(ts: Runner, tsd_env: dict[str, str], child: str) -> None:
    script = f"{child} echo $! > child.pid; wait"
    job = queue(ts, "sh", "-c", script)
    pid_file = Path(tsd_env["TMPDIR"]) / "child.pid"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", what="child")
    child_pid = int(pid_file.read_text())
    assert alive(child_pid)
    assert ts("-k", str(job)).stdout == ""
    assert finish(ts, job) == 255
    wait_until(lambda: not alive(child_pid), timeout=10, what="the background child to die")
    assert list_rows(ts)[job].split()[3] == "-1"


def test_k_without_id_kills_the_last_run_job(ts: Runner) -> None:
    job = queue(ts, "sleep", "30")
    wait_state(ts, job, "running")
    ts("-k")
    wait_state(ts, job, "finished")


def test_T_kills_every_running_job(ts: Runner) -> None:
    ts("-S", "2")
    jobs = [queue(ts, "sleep", "30") for _ in range(2)]
    for job in jobs:
        wait_state(ts, job, "running")
    ts("-T")
    for job in jobs:
        assert finish(ts, job) == 255
    assert ts("-R").stdout == "0\n"


def test_timeout_kills_a_job_that_runs_too_long(ts: Runner) -> None:
    job = queue(ts, "--timeout", "0.5", "sleep", "30")
    start = time.monotonic()
    assert finish(ts, job) == 255
    assert time.monotonic() - start < 10
    assert "time limit" in ts("-i", str(job)).stdout


# --------------------------------------------------------------- formats


def test_M_json_has_the_keys_and_time_in_milliseconds(ts: Runner) -> None:
    job = queue(ts, "-L", "j", "sleep", "0.3")
    assert finish(ts, job) == 0
    (rec,) = json.loads(ts("-M", "json").stdout)
    for key in ("ID", "State", "Output", "E-Level", "Time_ms", "Command", "GPUs", "User",
                "Label", "Cwd", "Depends", "GPU_IDs", "Enqueue", "Start", "End", "Unit"):
        assert key in rec
    assert rec["ID"] == job and rec["State"] == "finished" and rec["E-Level"] == 0
    assert rec["Label"] == "j" and rec["Command"] == "sleep 0.3" and rec["GPUs"] == 0
    assert 250 <= rec["Time_ms"] < 5000
    assert abs(rec["Time_ms"] - (rec["End"] - rec["Start"]) * 1000) <= 1
    assert json.loads(ts("--serialize", "json").stdout) == json.loads(ts("-M", "json").stdout)


def test_M_tab_rows_have_the_same_columns(ts: Runner) -> None:
    ts("-S", "1")
    done = queue(ts, "-L", "l", "true")
    assert finish(ts, done) == 0
    running = queue(ts, "sleep", "30")
    wait_state(ts, running, "running")
    queued = queue(ts, "-D", str(done), "true")
    rows = [r.split("\t") for r in ts("-M", "tab").stdout.splitlines()]
    assert [int(r[0]) for r in rows] == [running, queued, done]  # GPU ts's order, as -l
    assert len({len(r) for r in rows}) == 1
    assert rows[2][1:4] == ["finished", rows[2][2], "0"] and rows[2][8] == "[l]"
    ts("-k", str(running))


def test_M_default_is_the_plain_list(ts: Runner) -> None:
    queue(ts, "true")
    assert HEADER_RE.match(ts("-M").stdout.splitlines()[0])
    assert HEADER_RE.match(ts("-M", "default").stdout.splitlines()[0])


# --------------------------------------------------------- server settings


def test_setenv_reaches_the_next_job_and_unsetenv_removes_it(ts: Runner) -> None:
    assert ts("--setenv", "TSD_IT_VAR=hello").stdout == ""
    assert ts("--getenv", "TSD_IT_VAR").stdout == "hello\n"
    job = queue(ts, "sh", "-c", 'echo "[$TSD_IT_VAR]"')
    assert finish(ts, job) == 0
    assert output_path(ts, job).read_text() == "[hello]\n"
    ts("--unsetenv", "TSD_IT_VAR")
    assert ts("--getenv", "TSD_IT_VAR").stdout == ""
    job = queue(ts, "sh", "-c", 'echo "[$TSD_IT_VAR]"')
    assert finish(ts, job) == 0
    assert output_path(ts, job).read_text() == "[]\n"


def test_set_logdir_moves_new_output_files(ts: Runner, tsd_env: dict[str, str]) -> None:
    assert ts("--get_logdir").stdout == f"{tsd_env['TMPDIR']}\n"
    logs = Path(tsd_env["TMPDIR"]) / "logs"
    logs.mkdir()
    ts("--set_logdir", str(logs))
    assert ts("--get_logdir").stdout == f"{logs}\n"
    job = queue(ts, "echo", "here")
    assert finish(ts, job) == 0
    assert output_path(ts, job).parent == logs


def test_gpu_free_percentage_get_and_set(ts: Runner) -> None:
    assert ts("--get_gpu_free_perc").stdout == "90\n"
    ts("--set_gpu_free_perc", "75")
    assert ts("--get_gpu_free_perc").stdout == "75\n"
    proc = ts("--set_gpu_free_perc", "150", check=False)
    assert proc.returncode == 1
    one_line_error(proc)


def test_job_gets_cwd_and_umask_of_the_submitter(ts: Runner, tsd_env: dict[str, str]) -> None:
    work = Path(tsd_env["TMPDIR"]) / "work"
    work.mkdir()
    job = queue(ts, "sh", "-c", "pwd; umask", cwd=str(work))
    assert finish(ts, job) == 0
    cwd, mask = output_path(ts, job).read_text().split()
    assert cwd == str(work)
    assert int(mask, 8) == _own_umask()


def _own_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------- GPUs


@pytest.fixture
def gpu_ts(ts: Runner, tsd_env: dict[str, str], nvml_picture: object) -> Runner:
    """A daemon that sees two idle fake GPUs through the NVML stand-in."""
    from fixtures.nvml.picture import simple_gpus

    nvml_picture.write(simple_gpus(2))  # type: ignore[attr-defined]
    tsd_env.update(nvml_picture.env())  # type: ignore[attr-defined]
    ts("-S", "2")
    return ts


def test_G_gives_the_job_a_free_gpu(gpu_ts: Runner) -> None:
    job = queue(gpu_ts, "-G", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    assert finish(gpu_ts, job) == 0
    shown = output_path(gpu_ts, job).read_text().strip()
    assert shown in ("0", "1")
    rec = json.loads(gpu_ts("-M", "json").stdout)[0]
    assert rec["GPUs"] == 1 and rec["GPU_IDs"] == [int(shown)]


def test_g_pins_the_given_gpus(gpu_ts: Runner) -> None:
    job = queue(gpu_ts, "-g", "1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    assert finish(gpu_ts, job) == 0
    assert output_path(gpu_ts, job).read_text() == "1\n"
    job = queue(gpu_ts, "--gpu_indices=0,1", "sh", "-c", "echo $CUDA_VISIBLE_DEVICES")
    assert finish(gpu_ts, job) == 0
    assert output_path(gpu_ts, job).read_text() == "0,1\n"


def test_non_gpu_jobs_see_no_gpus(gpu_ts: Runner) -> None:
    job = queue(gpu_ts, "sh", "-c", 'echo "[$CUDA_VISIBLE_DEVICES]"')
    assert finish(gpu_ts, job) == 0
    assert output_path(gpu_ts, job).read_text() == "[]\n"


def test_g_alone_lists_running_gpu_jobs_and_the_gpus(gpu_ts: Runner) -> None:
    job = queue(gpu_ts, "-g", "1", "sleep", "30")
    wait_state(gpu_ts, job, "running")
    lines = gpu_ts("-g").stdout.splitlines()
    assert lines[0] == "ID   GPU-IDs"
    assert lines[1] == f"{job:<4} 1"
    assert any("A100" in line for line in lines)
    header, *_ = gpu_ts("-l").stdout.splitlines()
    row = list_rows(gpu_ts)[job]
    assert row[header.index("GPUs") :].split() == ["1", "sleep", "30"]
    gpu_ts("-k", str(job))


def test_G_more_gpus_than_the_server_has_is_refused(gpu_ts: Runner) -> None:
    proc = gpu_ts("-G", "3", "true", check=False)
    assert proc.returncode == 1
    one_line_error(proc)


# -------------------------------------------------------- help and errors


def test_h_and_V(ts: Runner, tsd_env: dict[str, str]) -> None:
    from tsd import __version__

    help_text = ts("-h").stdout
    assert "usage: ts" in help_text and "Options adding jobs:" in help_text
    assert __version__ in ts("-V").stdout
    assert __version__ in ts("--version").stdout
    assert tsd_env.daemon_pid() is None  # type: ignore[attr-defined]  (no daemon needed)


def test_bad_flags_are_one_line_errors_with_exit_1(ts: Runner) -> None:
    for argv in (["-x"], ["--nope"], ["-N", "zero", "true"], ["-t", "abc"], ["-i", "-l"]):
        proc = ts(*argv, check=False)
        assert proc.returncode == 1, argv
        one_line_error(proc)
        assert proc.stdout == ""


def test_K_shuts_the_daemon_down_and_the_next_call_starts_one(
    ts: Runner, tsd_env: dict[str, str]
) -> None:
    queue(ts, "true")
    pid = tsd_env.daemon_pid()  # type: ignore[attr-defined]
    assert pid is not None
    assert ts("-K").stdout == ""
    wait_until(lambda: not alive(pid), what="the daemon to exit")
    assert ts("-K").returncode == 0  # nothing to shut down is fine
    assert HEADER_RE.match(ts("-l").stdout.splitlines()[0])
    assert tsd_env.daemon_pid() not in (None, pid)  # type: ignore[attr-defined]
