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
from tsd.slurmjson import SlurmJob, Snapshot
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
        self.cancelled: list[int] = []

    def submit(self, args: Sequence[str], owner: Owner, env: Mapping[str, str]) -> int:
        if self.refuse:
            raise ClusterRefused(f"Slurm refused the job: {self.refuse}")
        self.submits.append((list(args), owner, dict(env)))
        self.next_id += 1
        self.jobs[self.next_id] = SlurmJob(self.next_id, "PENDING", "Priority", 0,
                                           user=owner.name)
        return self.next_id

    def cancel(self, slurm_id: int, owner: Owner | None) -> None:
        self.cancelled.append(slurm_id)
        self.set(slurm_id, "CANCELLED", status=15)

    def squeue(self, slurm_ids: Sequence[int] | None) -> Snapshot:
        self.squeues += 1
        return Snapshot(dict(self.jobs))

    def sacct(self, slurm_ids: Sequence[int]) -> dict[int, SlurmJob]:
        self.saccts.append(sorted(slurm_ids))
        return {i: self.forgotten[i] for i in slurm_ids if i in self.forgotten}

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
        assert cluster.cancelled == [106]
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
