"""Slurm's client commands (sbatch, scancel, squeue, sacct) as blocking calls.

The adapter between tsd.slurm and a Slurm cluster; the daemon calls it from
its worker threads, never on the event loop. sbatch and scancel run as the
job's owner: the child drops privileges (supplementary groups, then gid, then
uid) before it execs, so munge vouches for the user and Slurm's own limits and
accounting apply to the right account. squeue and sacct run as the daemon
(root sees every job). Every failure is a `ClusterRefused` with one line.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tsd.errors import ClusterRefused
from tsd.slurmjson import (
    SACCT_FIELDS,
    SlurmJob,
    SlurmParseError,
    Snapshot,
    config_value,
    one_line_error,
    parse_jobcomp,
    parse_sacct,
    parse_squeue,
)

JOBCOMP_TAIL = 16 << 20  # bytes of the jobcomp file read for ended array tasks
TIMEOUT = 30.0  # seconds for one Slurm command; a hung controller must not hang a worker
_CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


@dataclass(frozen=True)
class Owner:
    """Whom a command runs as: the job's owner, resolved by the daemon (never the client)."""

    uid: int
    gid: int
    name: str
    groups: tuple[int, ...]

    @classmethod
    def of(cls, uid: int) -> Owner:
        """The passwd entry and group list of `uid` (KeyError when the user is gone)."""
        pw = pwd.getpwuid(uid)
        return cls(uid, pw.pw_gid, pw.pw_name, tuple(os.getgrouplist(pw.pw_name, pw.pw_gid)))


def _checked(ref: str) -> str:
    """A job name for a Slurm command: digits, or digits_digits; never an option."""
    job, sep, task = ref.partition("_")
    if not (job.isdigit() and job.isascii() and (not sep or (task.isdigit() and task.isascii()))):
        raise ValueError(f"not a Slurm job id: {ref!r}")
    return ref


def _tool(name: str) -> str:
    return shutil.which(name, path=_CLEAN_ENV["PATH"]) or f"/usr/bin/{name}"


class SlurmCommands:
    """The real cluster, through its CLI."""

    def __init__(self) -> None:
        self.sbatch_bin = _tool("sbatch")
        self.scancel_bin = _tool("scancel")
        self.scontrol_bin = _tool("scontrol")
        self.squeue_bin = _tool("squeue")
        self.sacct_bin = _tool("sacct")
        self.sacct_jobcomp: bool | None = None  # sacct -c (jobcomp file), once known
        self.jobcomp_loc: str | None = None  # the jobcomp file ("" when none), once known

    def _run(
        self, argv: Sequence[str], owner: Owner | None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        drop = owner is not None and os.getuid() == 0 and owner.uid != 0
        try:
            return subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                errors="replace",
                stdin=subprocess.DEVNULL,
                timeout=TIMEOUT,
                env=dict(env if env is not None else _CLEAN_ENV),
                # The child switches: setgroups, setregid, setreuid, in this order,
                # before exec; it starts in / so no client path is touched as root.
                cwd="/",
                user=owner.uid if drop and owner else None,
                group=owner.gid if drop and owner else None,
                extra_groups=list(owner.groups) if drop and owner else None,
                close_fds=True,
            )
        except subprocess.TimeoutExpired:
            raise ClusterRefused(
                f"Slurm did not answer: {os.path.basename(argv[0])} ran over {TIMEOUT:.0f}s"
            ) from None
        except OSError as exc:
            raise ClusterRefused(f"cannot run {argv[0]}: {exc.strerror or exc}") from None

    def submit(self, args: Sequence[str], owner: Owner, env: Mapping[str, str]) -> int:
        """sbatch as the owner; the new Slurm job id."""
        env = dict(env)
        env.setdefault("PATH", _CLEAN_ENV["PATH"])
        r = self._run([self.sbatch_bin, *args], owner, env)
        out = r.stdout.strip().split(";", 1)[0]  # --parsable: "id" or "id;cluster"
        if r.returncode != 0 or not out.isdigit():
            reason = one_line_error(r.stderr, f"sbatch exited {r.returncode}")
            raise ClusterRefused(f"Slurm refused the job: {reason}")
        return int(out)

    def cancel(self, ref: str, owner: Owner | None) -> None:
        """scancel as the owner (or as the daemon with None); `ref` is "123" or an
        array's task "123_4" (that task alone)."""
        r = self._run([self.scancel_bin, _checked(ref)], owner)
        if r.returncode != 0:
            reason = one_line_error(r.stderr, f"scancel exited {r.returncode}")
            raise ClusterRefused(f"Slurm did not cancel job {ref}: {reason}")

    def hold(self, ref: str, held: bool, owner: Owner | None) -> None:
        """scontrol hold (or release) as the owner: a user's hold, which the user may lift."""
        verb = "hold" if held else "release"
        r = self._run([self.scontrol_bin, verb, _checked(ref)], owner)
        if r.returncode != 0:
            reason = one_line_error(r.stderr, f"scontrol {verb} exited {r.returncode}")
            raise ClusterRefused(f"Slurm did not {verb} job {ref}: {reason}")

    def squeue(self, slurm_ids: Sequence[int] | None) -> Snapshot:
        """One squeue --json for these jobs (every state; all jobs with None)."""
        argv = [self.squeue_bin, "--json", "--states=all"]
        if slurm_ids is not None:
            argv.append("--jobs=" + ",".join(str(i) for i in sorted(slurm_ids)))
        r = self._run(argv, None)
        try:
            snapshot = parse_squeue(r.stdout)
        except SlurmParseError as exc:
            reason = one_line_error(r.stderr, str(exc))
            raise ClusterRefused(f"squeue failed: {reason}") from None
        if snapshot.error and slurm_ids is not None and "Invalid job id" in snapshot.error:
            # Some of the jobs are gone from the controller (past MinJobAge): ask for all.
            return self.squeue(None)
        if snapshot.error:
            raise ClusterRefused(snapshot.error)
        return snapshot

    def sacct(self, slurm_ids: Sequence[int]) -> dict[int, SlurmJob]:
        """Ended jobs from accounting (slurmdbd), else from the jobcomp file (sacct -c)."""
        base = [self.sacct_bin, "-X", "-n", "-P", "-a", "-o", SACCT_FIELDS,
                "-j", ",".join(str(i) for i in sorted(slurm_ids))]
        modes = [self.sacct_jobcomp] if self.sacct_jobcomp is not None else [False, True]
        last = ""
        for jobcomp in modes:
            r = self._run([*base, "-c"] if jobcomp else base, None)
            if r.returncode == 0:
                self.sacct_jobcomp = jobcomp
                found = parse_sacct(r.stdout)
                if jobcomp:
                    found.update(self._jobcomp_tasks(set(slurm_ids)))
                return found
            last = one_line_error(r.stderr, f"sacct exited {r.returncode}")
        raise ClusterRefused(f"sacct failed: {last}")

    def _jobcomp_tasks(self, arrays: set[int]) -> dict[int, SlurmJob]:
        """The ended tasks of these job arrays from the jobcomp file itself (its newest
        JOBCOMP_TAIL bytes): `sacct -c` does not say which array a task was of."""
        if self.jobcomp_loc is None:
            r = self._run([self.scontrol_bin, "show", "config"], None)
            self.jobcomp_loc = (config_value(r.stdout, "JobCompLoc") or "") \
                if r.returncode == 0 else None
        if not self.jobcomp_loc or not self.jobcomp_loc.startswith("/"):
            return {}
        try:
            with open(self.jobcomp_loc, "rb") as f:
                start = max(0, os.fstat(f.fileno()).st_size - JOBCOMP_TAIL)
                f.seek(start)
                text = f.read(JOBCOMP_TAIL).decode(errors="replace")
        except OSError:
            return {}
        if start:
            text = text.partition("\n")[2]  # the first line read is cut
        return {j.job_id: j for j in parse_jobcomp(text) if j.array_job_id in arrays}
