"""The Slurm engine with a hand-written cluster in place of Slurm's commands, and real SQLite.

The real commands are exercised against a real Slurm in
tests/system/test_slurm_engine.py; here the engine's own bookkeeping is checked:
durable Slurm ids, nothing left of a refused submit, one squeue per poll, the
back-off, sacct for jobs squeue forgot, and following again after a restart.
"""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from tsd.config import ClusterConfig
from tsd.errors import ClusterRefused
from tsd.model import DependMode, JobSpec, JobState
from tsd.slurm import SlurmEngine, SlurmJobTable
from tsd.slurmcmd import Owner
from tsd.slurmjson import SlurmJob, Snapshot, array_tasks
from tsd.store import Store
from tsd.waiters import Waiters

ME = os.getuid()
MY_NAME = pwd.getpwuid(ME).pw_name


class Cluster:
    """Slurm as the engine sees it: sbatch, scancel, squeue and sacct on a dict of jobs."""

    def __init__(self) -> None:
        self.jobs: dict[int, SlurmJob] = {}
        self.forgotten: dict[int, SlurmJob] = {}  # past MinJobAge: only sacct knows them
        self.next_id = 100
        self.refuse = ""
        self.submits: list[tuple[list[str], Owner, dict[str, str]]] = []
        self.squeues = 0
        self.saccts: list[list[int]] = []
        self.cancelled: list[str] = []

    def submit(self, args: Sequence[str], owner: Owner, env: Mapping[str, str]) -> int:
        if self.refuse:
            raise ClusterRefused(f"Slurm refused the job: {self.refuse}")
        self.submits.append((list(args), owner, dict(env)))
        self.next_id += 1
        array = [a.split("=", 1)[1] for a in args if a.startswith("--array=")]
        # An array is first one pending record for all its tasks ("0-2%1"), as in squeue.
        self.jobs[self.next_id] = SlurmJob(
            self.next_id, "PENDING", "Priority", 0, user=owner.name,
            array_job_id=self.next_id if array else None, array_tasks=array[0] if array else "",
        )  # fmt: skip
        return self.next_id

    def cancel(self, ref: str, owner: Owner | None) -> None:
        self.cancelled.append(ref)
        if "_" in ref:
            array, task = map(int, ref.split("_"))
            self.set_task(array, task, "CANCELLED", status=15)
        else:
            self.set(int(ref), "CANCELLED", status=15)

    def squeue(self, slurm_ids: Sequence[int] | None) -> Snapshot:
        self.squeues += 1
        return Snapshot(dict(self.jobs), None, array_tasks(self.jobs.values()))

    def sacct(self, slurm_ids: Sequence[int]) -> dict[int, SlurmJob]:
        self.saccts.append(sorted(slurm_ids))
        return {j.job_id: j for j in self.forgotten.values()
                if (j.array_job_id or j.job_id) in slurm_ids}  # fmt: skip

    def set_task(self, array: int, task: int, state: str, reason: str = "None",
                 status: int = 0) -> int:
        """Task `task` of `array` splits off the pending record (own job id), in `state`."""
        own = array * 1000 + task
        self.jobs[own] = SlurmJob(own, "PENDING", user=self.jobs[array].user,
                                  array_job_id=array, array_task_id=task)
        self.set(own, state, reason, status)
        return own

    def set(self, slurm_id: int, state: str, reason: str = "None", status: int = 0) -> None:
        self.jobs[slurm_id] = replace(
            self.jobs[slurm_id], state=state, reason=reason, exit_status=status,
            start_time=1000.0, end_time=None if state in ("RUNNING", "PENDING") else 1010.0,
        )


CONFIG = ClusterConfig(engine="slurm", partition="debug", poll_seconds=0.01,
                       max_poll_seconds=0.08)


def spec(*command: str, **kw: object) -> JobSpec:
    return JobSpec(command=command or ("true",), cwd="/tmp",  # type: ignore[arg-type]
                   env=(("HOME", "/root"), ("SLURM_JOB_ID", "1")), **kw)


class Rig:
    """A table over a real store, and the engine over both."""

    def __init__(self, path: Path, cluster: Cluster, loop: asyncio.AbstractEventLoop,
                 config: ClusterConfig = CONFIG) -> None:
        self.store = Store(path)
        self.table = SlurmJobTable(self.store, Waiters(loop), lambda: 1000)
        self.table.load()
        self.engine = SlurmEngine(loop, None, lambda: config, self.table, self.store, cluster)

    async def submit(self, s: JobSpec) -> int:
        job = self.table.add(ME, MY_NAME, s)
        return (await self.engine.forward(job)).id


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_forwarded_job_has_its_slurm_id_on_disk_before_forward_returns(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        jid = await rig.submit(spec("echo", "hi", gpus=1, label="x"))
        (stored,) = Store(tmp_path / "state.db").load_all()
        assert (stored.id, stored.slurm_id) == (jid, 101)
        assert stored.output_path is not None
        assert stored.output_path.startswith(f"/tmp/ts-out.{jid}.")
        args, owner, env = cluster.submits[0]
        assert owner.uid == ME and "--gres=gpu:1" in args and "--job-name=x" in args
        assert env["TS_JOBID"] == str(jid) and "SLURM_JOB_ID" not in env
    run(main())


def test_refused_submit_leaves_nothing_and_says_slurms_reason(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        cluster.refuse = "Invalid partition name specified"
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        with pytest.raises(ClusterRefused, match="Invalid partition name specified"):
            await rig.submit(spec())
        assert rig.table.jobs == {} and rig.table.pending == []
        assert Store(tmp_path / "state.db").load_all() == []
    run(main())


def test_one_squeue_per_poll_applies_every_jobs_change(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        ids = [await rig.submit(spec()) for _ in range(5)]
        failing = ids[0]
        waits = await rig.submit(spec(depends=(failing,), depend_mode=DependMode.SUCCESS))
        cluster.set(101, "FAILED", "NonZeroExitCode", status=3 << 8)
        cluster.set(102, "RUNNING")
        cluster.set(103, "COMPLETED")
        cluster.set(104, "CANCELLED", status=15)
        cluster.set(106, "PENDING", "DependencyNeverSatisfied")
        assert await rig.engine.poll_once()
        assert cluster.squeues == 1
        t = rig.table
        assert t.jobs[ids[0]].exit is not None and t.jobs[ids[0]].exit.code == 3
        assert t.jobs[ids[1]].state is JobState.RUNNING and t.jobs[ids[1]].start_time == 1000.0
        assert t.jobs[ids[2]].exit is not None and t.jobs[ids[2]].exit.success
        assert t.jobs[ids[3]].exit is not None and t.jobs[ids[3]].exit.wait_code == 255
        assert t.jobs[ids[4]].wait_reason == "Slurm: pending (Priority)"
        assert t.jobs[waits].state is JobState.SKIPPED
        await asyncio.sleep(0.05)  # the skipped job's scancel runs in a worker
        assert cluster.cancelled == ["106"]
        # Nothing changed since: a poll that records nothing (what the back-off counts).
        assert not await rig.engine.poll_once() and cluster.squeues == 2
    run(main())


def test_jobs_squeue_forgot_are_looked_up_in_sacct_in_one_call(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        a, b = await rig.submit(spec()), await rig.submit(spec())
        for slurm_id, status in ((101, 0), (102, 2 << 8)):
            cluster.set(slurm_id, "COMPLETED" if not status else "FAILED", status=status)
            cluster.forgotten[slurm_id] = cluster.jobs.pop(slurm_id)
        await rig.engine.poll_once()
        assert cluster.saccts == [[101, 102]]
        codes = [rig.table.jobs[j].exit.code for j in (a, b)]  # type: ignore[union-attr]
        assert codes == [0, 2]
    run(main())


def test_after_a_restart_forwarded_jobs_are_followed_again(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        loop = asyncio.get_running_loop()
        first = Rig(tmp_path / "state.db", cluster, loop)
        a, b = await first.submit(spec()), await first.submit(spec())
        cluster.set(101, "RUNNING")
        await first.engine.poll_once()
        first.store.close()
        cluster.set(101, "COMPLETED")
        cluster.set(102, "FAILED", status=7 << 8)
        again = Rig(tmp_path / "state.db", cluster, loop)
        assert sorted(j.id for j in again.engine.tracked()) == [a, b]
        again.engine.recover()
        await again.engine.poll_once()
        assert [again.table.jobs[j].exit.code for j in (a, b)] == [0, 7]  # type: ignore[union-attr]
        assert len(cluster.submits) == 2  # nothing submitted twice
    run(main())


def test_a_record_never_forwarded_is_found_by_its_comment_after_a_crash(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path / "state.db", cluster, loop)
        job = rig.table.add(ME, MY_NAME, spec())  # the daemon died during its sbatch...
        cluster.next_id += 1
        cluster.jobs[cluster.next_id] = SlurmJob(cluster.next_id, "RUNNING", user=MY_NAME,
                                                 comment=f"tsd:{job.id}", output="/tmp/o%%1")
        rig.store.close()
        again = Rig(tmp_path / "state.db", cluster, loop)
        again.engine.recover()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if again.table.jobs[job.id].slurm_id is not None:
                break
        adopted = again.table.jobs[job.id]
        assert (adopted.slurm_id, adopted.output_path) == (101, "/tmp/o%1")
        assert cluster.submits == []  # ...and its sbatch had gone through: not sent twice
        await again.engine.stop()
    run(main())


def test_poll_backs_off_while_nothing_changes(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        await rig.submit(spec())
        rig.engine.start()
        await asyncio.sleep(0.6)
        calls = cluster.squeues
        await rig.engine.stop()
        # 0.01 s each without a back-off would be ~60 polls; doubling to 0.08 s gives ~10.
        assert 2 <= calls <= 16
    run(main())


def test_a_burst_of_submits_does_not_become_a_burst_of_squeues(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        config = replace(CONFIG, poll_seconds=0.1, max_poll_seconds=0.1)
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop(), config)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        rig.engine.start()
        for _ in range(40):  # each submit nudges the poll
            await rig.submit(spec())
            await asyncio.sleep(0.01)
        polls, elapsed = cluster.squeues, loop.time() - t0
        await rig.engine.stop()
        # One squeue per nudge would be 40; at most one per 0.1 s is far fewer.
        assert 1 <= polls <= elapsed / 0.1 + 2 and polls < 40
    run(main())


# ------------------------------------------------------------ --array as a Slurm job array


async def submit_array(rig: Rig, indices: Sequence[int], throttle: int | None = None,
                       **kw: object) -> list[int]:
    specs = [spec(array_task=i, array_throttle=throttle, **kw) for i in indices]
    jobs = rig.table.add_many(ME, MY_NAME, specs, array=True)
    return [j.id for j in await rig.engine.forward_array(jobs)]


def test_an_array_is_one_sbatch_and_every_element_is_on_disk_as_its_task(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        ids = await submit_array(rig, [3, 4, 5], throttle=1)
        assert len(cluster.submits) == 1
        args, _, env = cluster.submits[0]
        assert "--array=3-5%1" in args and f"--comment=tsd:{ids[0]}" in args
        (pattern,) = [a.split("=", 1)[1] for a in args if a.startswith("--output=")]
        assert pattern.startswith(f"/tmp/ts-out.{ids[0]}_%a.")
        assert env["TS_ARRAY_JOB_ID"] == str(ids[0])
        stored = {j.id: j for j in Store(tmp_path / "state.db").load_all()}
        assert [(stored[j].slurm_id, stored[j].slurm_task) for j in ids] == [
            (101, 3), (101, 4), (101, 5)]
        assert [stored[j].output_path for j in ids] == [
            pattern.replace("%a", str(i)) for i in (3, 4, 5)]
    run(main())


def test_a_refused_array_leaves_no_element(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        cluster.refuse = "Invalid job array specification"
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        with pytest.raises(ClusterRefused, match="Invalid job array specification"):
            await submit_array(rig, [0, 5000])
        assert rig.table.jobs == {} and Store(tmp_path / "state.db").load_all() == []
    run(main())


def test_one_squeue_follows_each_array_task_collapsed_or_split_off(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        ids = await submit_array(rig, [0, 1, 2, 3], throttle=2)
        cluster.jobs[101] = replace(cluster.jobs[101], reason="JobArrayTaskLimit",
                                    array_tasks="2-3%2")
        cluster.set_task(101, 0, "RUNNING")
        cluster.set_task(101, 1, "FAILED", "NonZeroExitCode", status=4 << 8)
        assert await rig.engine.poll_once() and cluster.squeues == 1
        t = rig.table
        assert t.jobs[ids[0]].state is JobState.RUNNING
        assert t.jobs[ids[1]].exit is not None and t.jobs[ids[1]].exit.code == 4
        for j in ids[2:]:
            assert t.jobs[j].wait_reason == "Slurm: pending (JobArrayTaskLimit)"
        # ts -k of one element cancels that task alone
        await rig.engine.cancel(t.jobs[ids[0]])
        assert cluster.cancelled == ["101_0"]
        await rig.engine.poll_once()
        assert t.jobs[ids[0]].exit is not None and t.jobs[ids[0]].exit.wait_code == 255
        assert t.jobs[ids[2]].state is JobState.QUEUED
    run(main())


def test_a_dependency_on_an_array_element_waits_for_that_task(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        ids = await submit_array(rig, [0, 1])
        await rig.submit(spec(depends=(ids[1],)))
        assert "--dependency=afterany:101_1" in cluster.submits[1][0]
    run(main())


def test_array_tasks_squeue_forgot_are_found_in_sacct_by_task(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        rig = Rig(tmp_path / "state.db", cluster, asyncio.get_running_loop())
        ids = await submit_array(rig, [7, 8])
        for task, code in ((7, 0), (8, 9)):
            own = cluster.set_task(101, task, "COMPLETED" if not code else "FAILED",
                                   status=code << 8)
            cluster.forgotten[own] = cluster.jobs.pop(own)
        del cluster.jobs[101]
        await rig.engine.poll_once()
        assert cluster.saccts == [[101]]
        assert [rig.table.jobs[j].exit.code for j in ids] == [0, 9]  # type: ignore[union-attr]
    run(main())


def test_after_a_restart_array_elements_are_followed_by_task(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        loop = asyncio.get_running_loop()
        first = Rig(tmp_path / "state.db", cluster, loop)
        ids = await submit_array(first, [0, 1])
        first.store.close()
        cluster.set_task(101, 0, "COMPLETED")
        cluster.set_task(101, 1, "FAILED", status=3 << 8)
        again = Rig(tmp_path / "state.db", cluster, loop)
        assert [(j.slurm_id, j.slurm_task) for j in again.engine.tracked()] == [(101, 0), (101, 1)]
        again.engine.recover()
        await again.engine.poll_once()
        assert [again.table.jobs[j].exit.code for j in ids] == [0, 3]  # type: ignore[union-attr]
        assert len(cluster.submits) == 1
    run(main())


def test_an_array_sbatch_took_before_a_crash_is_adopted_whole(tmp_path: Path) -> None:
    async def main() -> None:
        cluster = Cluster()
        loop = asyncio.get_running_loop()
        rig = Rig(tmp_path / "state.db", cluster, loop)
        jobs = rig.table.add_many(ME, MY_NAME, [spec(array_task=i) for i in (2, 4)], array=True)
        cluster.next_id += 1  # the daemon died during its sbatch, which went through
        cluster.jobs[101] = SlurmJob(101, "PENDING", user=MY_NAME, comment=f"tsd:{jobs[0].id}",
                                     output="/tmp/o%%x_%a.y", array_job_id=101,
                                     array_tasks="2,4")
        rig.store.close()
        again = Rig(tmp_path / "state.db", cluster, loop)
        again.engine.recover()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if all(again.table.jobs[j.id].slurm_id is not None for j in jobs):
                break
        adopted = [again.table.jobs[j.id] for j in jobs]
        assert [(j.slurm_id, j.slurm_task, j.output_path) for j in adopted] == [
            (101, 2, "/tmp/o%x_2.y"), (101, 4, "/tmp/o%x_4.y")]
        assert cluster.submits == []
        await again.engine.stop()
    run(main())
