"""The engine seam: what runs the jobs a daemon accepts, chosen by `cluster.engine`.

* local (the default): tsd.dispatch.Dispatcher decides with tsd.scheduler which
  queued jobs start here, and tsd.runner.Runner runs them in scopes;
* slurm: tsd.slurm.SlurmEngine forwards every accepted job to Slurm with sbatch,
  as its owner, and follows it with one squeue per poll.

Handlers talk to `Scheduling` for every job and to `Cluster` where a request
means something else on a cluster (submit, ts -k, ts -r). Protocols only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tsd.model import Job, JobSpec


class Scheduling(Protocol):
    """Starts what may start after a change, and says why a job waits."""

    def schedule(self) -> None:
        """React to a change in the queue (a submit, an end, an edit)."""

    def explain(self, job: Job) -> Job:
        """The job with the wait reason ts -i and ts -l show."""

    def wait_reason(self, job: Job) -> str:
        """explain()'s wait reason alone, without a copy of the job."""


class Cluster(Protocol):
    """A cluster engine as request handlers use it (tsd.slurm.SlurmEngine)."""

    def check(self, spec: JobSpec, terminal: bool) -> None:
        """Refuse, in one line (BadRequest), a job the cluster cannot run as asked."""

    async def forward(self, job: Job) -> Job:
        """Hand a just-recorded job to the cluster; the record as the client hears it.

        On refusal the job is removed again (nothing half-recorded) and the
        cluster's reason is raised as ClusterRefused.
        """

    async def forward_array(self, jobs: Sequence[Job]) -> list[Job]:
        """Hand the just-recorded elements of one --array to the cluster as one job
        array; all or none, as `forward`."""

    async def cancel(self, job: Job) -> None:
        """End a forwarded job in the cluster (ts -k, or ts -r of a queued one)."""

    async def hold(self, job: Job, held: bool) -> None:
        """Hold (or release) a forwarded job in the cluster (ts --hold/--release)."""
