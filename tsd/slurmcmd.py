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
    one_line_error,
    parse_sacct,
    parse_squeue,
)

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

    def cancel(self, slurm_id: int, owner: Owner | None) -> None:
        """scancel as the owner (or as the daemon with None)."""
        r = self._run([self.scancel_bin, str(slurm_id)], owner)
        if r.returncode != 0:
            reason = one_line_error(r.stderr, f"scancel exited {r.returncode}")
            raise ClusterRefused(f"Slurm did not cancel job {slurm_id}: {reason}")

    def hold(self, slurm_id: int, held: bool, owner: Owner | None) -> None:
        """scontrol hold (or release) as the owner: a user's hold, which the user may lift."""
        verb = "hold" if held else "release"
        r = self._run([self.scontrol_bin, verb, str(slurm_id)], owner)
        if r.returncode != 0:
            reason = one_line_error(r.stderr, f"scontrol {verb} exited {r.returncode}")
            raise ClusterRefused(f"Slurm did not {verb} job {slurm_id}: {reason}")

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
                return parse_sacct(r.stdout)
            last = one_line_error(r.stderr, f"sacct exited {r.returncode}")
        raise ClusterRefused(f"sacct failed: {last}")
