"""The Slurm engine against a real one-node Slurm (munge, slurmctld, slurmd) in a booted box.

One box and one cluster for the whole module; the tests run in file order and
the one that stops Slurm comes last.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from box import Box
from deploy import deploy, jobs, ts, wait_for
from slurmbox import slurm_installed, start_cluster

CONFIG = """\
slots: 4
admins: [root, dave]
cluster:
  engine: slurm
  partition: debug
  poll_seconds: 0.2
  max_poll_seconds: 1
"""


@pytest.fixture(scope="module")
def sbox(box: Box) -> Iterator[Box]:
    why = slurm_installed()
    if why:
        pytest.skip(why)
    start_cluster(box)
    deploy(box, CONFIG)
    yield box


def job_id(proc: Any) -> int:
    return int(proc.stdout.strip())


def slurm_job(b: Box, slurm_id: int) -> dict[str, Any]:
    """Slurm's own record of a job (squeue --json keeps ended jobs for MinJobAge)."""
    out = b.run(["squeue", "--json", "--states=all", f"--jobs={slurm_id}"]).stdout
    (found,) = [j for j in json.loads(out)["jobs"] if j["job_id"] == slurm_id]
    return dict(found)


def submit(b: Box, user: str, *args: str) -> int:
    return job_id(b.run(["ts", *args], user=user, cwd="/tmp"))


def test_job_runs_in_slurm_as_its_owner_with_its_environment(sbox: Box) -> None:
    jid = job_id(sbox.run("cd /tmp && FOO=bar ts sh -c 'id -un; id -Gn; echo FOO=$FOO "
                          "ID=$TS_JOBID S=$SLURM_JOB_ID; pwd'", user="alice"))
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 0
    record = jobs(sbox, "alice")[jid]
    slurm_id = record["Slurm_ID"]
    assert isinstance(slurm_id, int)
    info = ts(sbox, "alice", "-i", str(jid)).stdout
    assert f"Slurm job: {slurm_id}" in info
    sj = slurm_job(sbox, slurm_id)
    assert (sj["user_name"], sj["job_state"], sj["comment"]) == ("alice", "COMPLETED", f"tsd:{jid}")
    lines = sbox.read_file(record["Output"]).splitlines()
    assert lines[0] == "alice"
    assert set(lines[1].split()) == {"alice", "tsd", "lab"}
    assert lines[2] == f"FOO=bar ID={jid} S={slurm_id}"
    assert lines[3] == "/tmp"
    assert sbox.run(["stat", "-c", "%U", record["Output"]]).stdout.strip() == "alice"
    assert ts(sbox, "alice", "-s", str(jid)).stdout.strip() == "finished"
    assert ts(sbox, "alice", "-c", str(jid)).stdout.splitlines()[0] == "alice"


def test_tail_follows_a_running_slurm_jobs_output_until_it_ends(sbox: Box) -> None:
    jid = submit(sbox, "alice", "sh", "-c", "echo one; sleep 2; echo two; exit 4")
    r = ts(sbox, "alice", "-t", str(jid), check=False, timeout=60)
    assert r.returncode == 4
    assert r.stdout.splitlines()[-2:] == ["one", "two"]


def test_exit_codes_are_slurms(sbox: Box) -> None:
    three = submit(sbox, "alice", "sh", "-c", "exit 3")
    killed = submit(sbox, "alice", "sh", "-c", "kill -9 $$")
    assert ts(sbox, "alice", "-w", str(three), check=False).returncode == 3
    assert ts(sbox, "alice", "-w", str(killed), check=False).returncode == 255
    listed = jobs(sbox, "alice")
    assert listed[three]["E-Level"] == 3
    assert slurm_job(sbox, listed[three]["Slurm_ID"])["job_state"] == "FAILED"
    assert listed[killed]["E-Level"] == -1
    # What the engine reads once squeue has forgotten a job: sacct (here the jobcomp file).
    ids = f"[{listed[three]['Slurm_ID']}, {listed[killed]['Slurm_ID']}]"
    code = ("from tsd.slurmcmd import SlurmCommands; "
            f"print(sorted((j.state, j.exit_status) "
            f"for j in SlurmCommands().sacct({ids}).values()))")
    assert sbox.run([sbox.python, "-c", code]).stdout.strip() == "[('FAILED', 9), ('FAILED', 768)]"


def test_gpu_job_gets_a_gpu_through_gres(sbox: Box) -> None:
    jid = submit(sbox, "alice", "-G", "1", "sh", "-c", 'echo "gpu=[$CUDA_VISIBLE_DEVICES]"')
    cpu = submit(sbox, "alice", "sh", "-c", 'echo "gpu=[$CUDA_VISIBLE_DEVICES]"')
    for j in (jid, cpu):
        assert ts(sbox, "alice", "-w", str(j), check=False).returncode == 0
    listed = jobs(sbox, "alice")
    assert sbox.read_file(listed[jid]["Output"]).strip() in ("gpu=[0]", "gpu=[1]")
    assert sbox.read_file(listed[cpu]["Output"]).strip() == "gpu=[]"
    assert slurm_job(sbox, listed[jid]["Slurm_ID"])["tres_per_node"] == "gres:gpu:1"


def test_request_slurm_refuses_fails_in_one_line_and_records_nothing(sbox: Box) -> None:
    before = set(jobs(sbox))
    r = sbox.run(["ts", "-G", "3", "true"], user="alice", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("ts: ") and len(r.stderr.strip().splitlines()) == 1
    assert "Requested node configuration is not available" in r.stderr
    assert set(jobs(sbox)) == before


def test_begin_waits_in_slurm_until_its_time(sbox: Box) -> None:
    asked = time.time()
    jid = submit(sbox, "alice", "--begin", "+4s", "true")
    sid = jobs(sbox, "alice")[jid]["Slurm_ID"]
    pending = slurm_job(sbox, sid)
    assert pending["job_state"] == "PENDING" and pending["state_reason"] == "BeginTime"
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 0
    # Slurm's clock and ours are the box's: it started no sooner than asked.
    assert slurm_job(sbox, sid)["start_time"] >= int(asked) + 3


def test_hold_keeps_the_job_held_in_slurm_until_its_owner_releases_it(sbox: Box) -> None:
    jid = submit(sbox, "alice", "--hold", "true")
    listed = jobs(sbox, "alice")[jid]
    assert listed["State"] == "held"
    sid = listed["Slurm_ID"]
    held = slurm_job(sbox, sid)
    assert held["job_state"] == "PENDING" and held["state_reason"] == "JobHeldUser"
    r = ts(sbox, "bob", "--release", str(jid), check=False)
    assert r.returncode == 1 and "belongs to alice" in r.stderr
    assert slurm_job(sbox, sid)["state_reason"] == "JobHeldUser"
    ts(sbox, "alice", "--release", str(jid))
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 0
    assert slurm_job(sbox, sid)["job_state"] == "COMPLETED"


def test_dependencies_wait_in_slurm_and_w_skips_after_a_failure(sbox: Box) -> None:
    first = submit(sbox, "alice", "sh", "-c", "sleep 1; exit 1")
    after = submit(sbox, "alice", "-D", str(first), "date", "+%s.%N")
    only_ok = submit(sbox, "alice", "-W", str(first), "touch", "/tmp/must-not-exist")
    assert ts(sbox, "alice", "-w", str(after), check=False).returncode == 0
    assert ts(sbox, "alice", "-w", str(only_ok), check=False).returncode == 255
    listed = jobs(sbox, "alice")
    assert listed[first]["E-Level"] == 1
    deps = slurm_job(sbox, listed[after]["Slurm_ID"])
    assert deps["start_time"] >= slurm_job(sbox, listed[first]["Slurm_ID"])["end_time"]
    assert listed[only_ok]["State"] == "skipped"
    assert not sbox.exists("/tmp/must-not-exist")


def test_w_job_slurm_would_keep_pending_is_cancelled_by_tsd_and_skipped(sbox: Box) -> None:
    conf = sbox.read_file("/etc/slurm/slurm.conf")
    without = conf.replace("DependencyParameters=kill_invalid_depend\n", "")
    assert without != conf
    sbox.write_file("/etc/slurm/slurm.conf", without)
    sbox.run(["scontrol", "reconfigure"])
    # Slurm itself now keeps such a job pending for ever: tsd must cancel it.
    assert "kill_invalid_depend" not in sbox.run(["scontrol", "show", "config"]).stdout
    try:
        first = submit(sbox, "alice", "false")
        only_ok = submit(sbox, "alice", "-W", str(first), "true")
        assert ts(sbox, "alice", "-w", str(only_ok), check=False).returncode == 255
        listed = jobs(sbox, "alice")
        assert listed[only_ok]["State"] == "skipped"
        wait_for(lambda: slurm_job(sbox, listed[only_ok]["Slurm_ID"])["job_state"] == "CANCELLED",
                 timeout=10)
    finally:
        sbox.write_file("/etc/slurm/slurm.conf", conf)
        sbox.run(["scontrol", "reconfigure"])


def test_kill_cancels_in_slurm_and_nothing_keeps_running(sbox: Box) -> None:
    jid = submit(sbox, "alice", "sleep", "313")
    wait_for(lambda: jobs(sbox)[jid]["State"] == "running", timeout=20)
    assert sbox.run(["pgrep", "-u", "alice", "-f", "sleep 313"], check=False).returncode == 0
    ts(sbox, "alice", "-k", str(jid))
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 255
    slurm_id = jobs(sbox)[jid]["Slurm_ID"]
    assert slurm_job(sbox, slurm_id)["job_state"] == "CANCELLED"
    wait_for(lambda: sbox.run(["pgrep", "-f", "sleep 313"], check=False).returncode == 1,
             timeout=10)


def test_another_user_cannot_touch_the_job(sbox: Box) -> None:
    jid = submit(sbox, "alice", "sleep", "314")
    wait_for(lambda: jobs(sbox)[jid]["State"] == "running", timeout=20)
    for args in (["-k", str(jid)], ["-r", str(jid)]):
        r = ts(sbox, "bob", *args, check=False)
        assert r.returncode == 1 and "ts: " in r.stderr
    seen = json.loads(ts(sbox, "bob", "-A", "-M", "json").stdout)
    (mine,) = [j for j in seen if j["ID"] == jid]
    assert mine["State"] == "running" and mine["Cwd"] is None and mine["Output"] == "(hidden)"
    # the admin may end it
    ts(sbox, "dave", "-k", str(jid))
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 255


def test_list_shows_own_jobs_and_all_users_with_a(sbox: Box) -> None:
    bobs = submit(sbox, "bob", "true")
    assert ts(sbox, "bob", "-w", str(bobs), check=False).returncode == 0
    own = ts(sbox, "alice", "-l").stdout.splitlines()
    assert own[0].split()[:3] == ["ID", "State", "Output"]
    assert not any(line.split()[0] == str(bobs) for line in own[1:])
    everyone = ts(sbox, "alice", "-A", "-l").stdout.splitlines()
    assert "User" in everyone[0].split()
    row = [line for line in everyone[1:] if line.split()[0] == str(bobs)]
    assert row and "bob" in row[0].split()


def array_ids(b: Box, user: str, *args: str) -> list[int]:
    """Submit an --array as `user` in /tmp; every element's tsd id, in index order."""
    return [int(w) for w in b.run(["ts", "--array", *args], user=user, cwd="/tmp").stdout.split()]


def slurm_tasks(b: Box, array_id: int) -> dict[int, dict[str, Any]]:
    """Slurm's own records of an array's split-off tasks, by index."""
    out = b.run(["squeue", "--json", "--states=all", f"--jobs={array_id}"]).stdout
    return {j["array_task_id"]: j for j in json.loads(out)["jobs"]
            if j["array_job_id"] == array_id and j["array_task_id"] is not None}


def test_an_array_runs_as_one_slurm_job_array_with_each_elements_ids_and_exit_code(
    sbox: Box,
) -> None:
    ids = array_ids(sbox, "alice", "0-2", "sh", "-c",
                    'echo "$TS_ARRAY_TASK_ID $TS_JOBID $TS_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID"; '
                    "exit $TS_ARRAY_TASK_ID")
    assert len(ids) == 3
    assert [ts(sbox, "alice", "-w", str(j), check=False).returncode for j in ids] == [0, 1, 2]
    listed = jobs(sbox, "alice")
    array_id = listed[ids[0]]["Slurm_ID"]
    assert [(listed[j]["Slurm_ID"], listed[j]["Slurm_Array_Task"]) for j in ids] == [
        (array_id, 0), (array_id, 1), (array_id, 2)]
    assert f"Slurm job: {array_id}_1" in ts(sbox, "alice", "-i", str(ids[1])).stdout
    for index, jid in enumerate(ids):
        assert f"_{index}." in listed[jid]["Output"]
        assert sbox.read_file(listed[jid]["Output"]).split() == [
            str(index), str(jid), str(ids[0]), str(index)]
        assert listed[jid]["E-Level"] == index
    tasks = slurm_tasks(sbox, array_id)
    assert sorted(tasks) == [0, 1, 2]  # three tasks of ONE sbatch, as alice
    assert {(t["user_name"], t["comment"]) for t in tasks.values()} == {("alice", f"tsd:{ids[0]}")}
    assert [tasks[i]["job_state"] for i in range(3)] == ["COMPLETED", "FAILED", "FAILED"]
    # What the engine reads once squeue forgets them: sacct (here the jobcomp file).
    code = ("from tsd.slurmcmd import SlurmCommands; from tsd.slurmjson import by_ref; "
            f"r = by_ref(SlurmCommands().sacct([{array_id}]).values()); "
            f"print(sorted((k[1], j.exit_status) for k, j in r.items() if k[0] == {array_id}))")
    assert sbox.run([sbox.python, "-c", code]).stdout.strip() == "[(0, 0), (1, 256), (2, 512)]"


def test_an_array_throttled_to_one_runs_its_tasks_one_at_a_time(sbox: Box) -> None:
    ids = array_ids(sbox, "alice", "1-3%1", "sh", "-c", "date +%s.%N; sleep 1; date +%s.%N")
    sid = jobs(sbox, "alice")[ids[0]]["Slurm_ID"]
    assert slurm_job(sbox, sid)["array_max_tasks"] == 1
    for j in ids:
        assert ts(sbox, "alice", "-w", str(j), check=False).returncode == 0
    listed = jobs(sbox, "alice")
    spans = sorted(tuple(map(float, sbox.read_file(listed[j]["Output"]).split())) for j in ids)
    assert len(spans) == 3
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end  # the next task started only after the previous one ended


def test_killing_one_array_element_cancels_only_its_slurm_task(sbox: Box) -> None:
    ids = array_ids(sbox, "alice", "0-1", "sh", "-c", "sleep 5; exit 6")
    wait_for(lambda: all(jobs(sbox)[j]["State"] == "running" for j in ids), timeout=20)
    ts(sbox, "alice", "-k", str(ids[0]))
    assert ts(sbox, "alice", "-w", str(ids[0]), check=False).returncode == 255
    assert ts(sbox, "alice", "-w", str(ids[1]), check=False).returncode == 6
    tasks = slurm_tasks(sbox, jobs(sbox)[ids[0]]["Slurm_ID"])
    assert (tasks[0]["job_state"], tasks[1]["job_state"]) == ("CANCELLED", "FAILED")


def test_array_elements_are_held_released_and_depended_on_one_by_one(sbox: Box) -> None:
    ids = array_ids(sbox, "alice", "0-1", "--hold", "true")
    after = submit(sbox, "alice", "-D", str(ids[1]), "true")
    listed = jobs(sbox, "alice")
    sid = listed[ids[0]]["Slurm_ID"]
    assert [listed[j]["State"] for j in ids] == ["held", "held"]
    assert f"afterany:{sid}_1" in slurm_job(sbox, listed[after]["Slurm_ID"])["dependency"]
    ts(sbox, "alice", "--release", str(ids[0]))
    assert ts(sbox, "alice", "-w", str(ids[0]), check=False).returncode == 0
    assert slurm_tasks(sbox, sid)[1]["state_reason"] == "JobHeldUser"
    assert jobs(sbox, "alice")[after]["State"] == "queued"
    ts(sbox, "alice", "--release", str(ids[1]))
    assert ts(sbox, "alice", "-w", str(after), check=False).returncode == 0
    assert jobs(sbox, "alice")[ids[1]]["E-Level"] == 0


def test_an_array_slurm_refuses_fails_in_one_line_and_records_no_element(sbox: Box) -> None:
    before = set(jobs(sbox))
    r = sbox.run(["ts", "--array", "0,5000", "true"], user="alice", check=False)  # MaxArraySize
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "Invalid job array specification" in r.stderr
    assert set(jobs(sbox)) == before


def test_restart_keeps_following_array_elements(sbox: Box) -> None:
    ids = array_ids(sbox, "alice", "0-2%1", "sh", "-c", "sleep 1; exit $TS_ARRAY_TASK_ID")
    wait_for(lambda: jobs(sbox)[ids[0]]["State"] == "running", timeout=20)
    sbox.systemctl("restart", "tsd")
    assert [ts(sbox, "alice", "-w", str(j), check=False).returncode for j in ids] == [0, 1, 2]
    listed = jobs(sbox, "alice")
    assert [listed[j]["Slurm_Array_Task"] for j in ids] == [0, 1, 2]


def test_restart_while_slurm_jobs_run_keeps_following_them(sbox: Box) -> None:
    ok = submit(sbox, "alice", "sleep", "3")
    seven = submit(sbox, "alice", "sh", "-c", "sleep 3; exit 7")
    waiting = submit(sbox, "alice", "-D", str(seven), "sh", "-c", "exit 5")
    wait_for(lambda: jobs(sbox)[ok]["State"] == "running", timeout=20)
    sbox.systemctl("restart", "tsd")
    assert ts(sbox, "alice", "-w", str(ok), check=False).returncode == 0
    assert ts(sbox, "alice", "-w", str(seven), check=False).returncode == 7
    assert ts(sbox, "alice", "-w", str(waiting), check=False).returncode == 5
    listed = jobs(sbox, "alice")
    assert [listed[j]["E-Level"] for j in (ok, seven, waiting)] == [0, 7, 5]


def test_bad_partition_is_refused_with_slurms_reason(sbox: Box) -> None:
    sbox.write_file("/etc/tsd/tsd.yaml", CONFIG.replace("partition: debug", "partition: nosuch"))
    sbox.systemctl("reload", "tsd")
    try:
        before = set(jobs(sbox))
        r = sbox.run(["ts", "true"], user="alice", check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
        assert "Invalid partition name specified" in r.stderr
        assert set(jobs(sbox)) == before
    finally:
        sbox.write_file("/etc/tsd/tsd.yaml", CONFIG)
        sbox.systemctl("reload", "tsd")


def test_slurm_down_submit_fails_in_one_line_and_nothing_is_recorded(sbox: Box) -> None:
    sbox.systemctl("stop", "slurmctld")
    try:
        before = set(jobs(sbox))
        t0 = time.monotonic()
        r = sbox.run(["ts", "true"], user="alice", check=False, timeout=90)
        assert r.returncode == 1 and r.stderr.startswith("ts: ")
        assert len(r.stderr.strip().splitlines()) == 1
        assert "Unable to contact slurm controller" in r.stderr
        assert time.monotonic() - t0 < 60
        assert set(jobs(sbox)) == before
    finally:
        sbox.systemctl("start", "slurmctld")
    sbox.systemctl("stop", "munge")
    try:
        r = sbox.run(["ts", "true"], user="alice", check=False)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
        assert "munge" in r.stderr.lower()
    finally:
        sbox.systemctl("start", "munge")
