"""The daemon's configuration: the frozen `Config` and its parts, with their defaults.

tsd.configfile turns YAML text into a `Config`; it lives apart so that a daemon
without a config file (the personal one) never loads the YAML package.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from tsd.config_admin import (
    DEFAULT_METRICS_TEXTFILE,
    IdleConfig,
    MetricsConfig,
)
from tsd.model import JobLimits, UserLimits
from tsd.usage import FairShareSettings

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_METRICS_TEXTFILE",
    "LIMIT_KEYS",
    "UNSET",
    "ClusterConfig",
    "Config",
    "ConnectionConfig",
    "GpuConfig",
    "GpuUseConfig",
    "IdleConfig",
    "LimitOverride",
    "MetricsConfig",
    "Unset",
]


class Unset(enum.Enum):
    """Marks a quota key that a group or user entry does not set (None means unlimited)."""

    UNSET = "unset"


UNSET: Final = Unset.UNSET

# The quota keys, shared by `defaults`, every `groups` entry and every `users` entry.
LIMIT_KEYS: Final = (
    "max_running_slots", "max_gpus", "max_queued", "max_job_bytes", "max_stored_bytes",
)


@dataclass(frozen=True)
class LimitOverride:
    """A `groups:` or `users:` entry: the quota keys it sets. UNSET keys fall through."""

    max_running_slots: int | Unset | None = UNSET
    max_gpus: int | Unset | None = UNSET
    max_queued: int | Unset | None = UNSET
    max_job_bytes: int | Unset | None = UNSET
    max_stored_bytes: int | Unset | None = UNSET

    def items(self) -> Iterator[tuple[str, int | None]]:
        """The (key, value) pairs this entry sets; a None value means unlimited."""
        for key in LIMIT_KEYS:
            value: int | Unset | None = getattr(self, key)
            if value is not UNSET:
                assert not isinstance(value, Unset)
                yield key, value


@dataclass(frozen=True)
class GpuConfig:
    """The `gpus:` section: which GPUs tsd hands out and when one counts as busy."""

    visible: tuple[int, ...] | None = None  # None: every GPU NVML reports; sorted otherwise
    free_memory_percent: float = 90.0  # a GPU with less free memory than this is busy
    poll_seconds: float = 5.0  # how often NVML is polled while jobs wait for GPUs


UNMANAGED_MODES: Final = ("show", "hold")


@dataclass(frozen=True)
class GpuUseConfig:
    """The `gpu:` section: how tsd treats GPU use (here: use that bypasses the queue)."""

    # A process outside tsd on a GPU always counts against its user's max_gpus and
    # shows in `ts -A -l`; "hold" also holds that user's queued GPU jobs while it runs.
    unmanaged: str = "show"


@dataclass(frozen=True)
class ConnectionConfig:
    """The `connections:` section: how many connections the daemon holds open at once."""

    max: int = 4096  # all users together; the daemon also keeps it below its file limit
    per_user: int | None = 64  # one user's open connections; the excess gets an error
    waiting_per_user: int | None = 32  # one user's parked ts -w/-t/-c/-f calls


@dataclass(frozen=True)
class ClusterConfig:
    """The `cluster:` section: where jobs run. `local` is this machine; `slurm` forwards
    every accepted job to Slurm with sbatch, as its owner (tsd.slurm)."""

    engine: str = "local"  # "local" or "slurm"
    partition: str | None = None  # sbatch --partition
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    extra_args: tuple[str, ...] = ()  # more sbatch options, each one word such as --mem=4G
    gpu_type: str | None = None  # --gres=gpu:TYPE:N instead of gpu:N
    output_dir: str | None = None  # absolute; default: the user's --set_logdir, else the job's cwd
    poll_seconds: float = 1.0  # squeue --json at most this often while jobs change
    max_poll_seconds: float = 10.0  # the poll backs off to this while nothing changes

    @property
    def slurm(self) -> bool:
        """True when jobs go to Slurm."""
        return self.engine == "slurm"


def _empty_overrides() -> Mapping[str, LimitOverride]:
    return MappingProxyType({})


def _empty_shares() -> Mapping[str, float]:
    return MappingProxyType({})


# Unlimited slots and GPUs per user by default: the server's own slots and the fair
# share between users already keep one user from starving the others.
# Stored bytes are capped so that one user cannot fill /var/lib/tsd for everyone.
DEFAULT_LIMITS: Final = UserLimits(
    max_running_slots=None, max_gpus=None, max_queued=1000,
    max_job_bytes=256 * 1024, max_stored_bytes=64 * 1024 * 1024,
)
_NO_JOB_LIMITS: Final = JobLimits()
_DEFAULT_GPUS: Final = GpuConfig()
_DEFAULT_GPU_USE: Final = GpuUseConfig()
_DEFAULT_CONNECTIONS: Final = ConnectionConfig()
_DEFAULT_FAIR_SHARE: Final = FairShareSettings()
_DEFAULT_CLUSTER: Final = ClusterConfig()


@dataclass(frozen=True)
class Config:
    """The whole parsed configuration. Every field has the default documented in etc/tsd.yaml."""

    slots: int = 4  # job slots running at once on the whole server; 0 drains it
    gpus: GpuConfig = _DEFAULT_GPUS
    admins: tuple[str, ...] = ("root",)  # user names, and "@group" for groups
    defaults: UserLimits = DEFAULT_LIMITS
    # Read-only mappings; left out of the hash so that a Config stays hashable.
    groups: Mapping[str, LimitOverride] = field(default_factory=_empty_overrides, hash=False)
    users: Mapping[str, LimitOverride] = field(default_factory=_empty_overrides, hash=False)
    job: JobLimits = _NO_JOB_LIMITS  # None everywhere: systemd's own defaults
    max_finished: int = 1000  # finished jobs kept per user; the oldest are dropped
    kill_grace_seconds: float = 10.0  # SIGTERM -> SIGKILL grace when killing a job
    connections: ConnectionConfig = _DEFAULT_CONNECTIONS
    idle: IdleConfig = field(default_factory=IdleConfig)  # the `gpu:` section's idle_* keys
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig = _DEFAULT_CLUSTER
    gpu: GpuUseConfig = _DEFAULT_GPU_USE
    fair_share: FairShareSettings = _DEFAULT_FAIR_SHARE  # `scheduler.fair_share`
    keep_days: int = 365  # `accounting.keep_days`: days of history behind ts --stats
    share: float = 1.0  # `share:` of defaults (groups, users below): fair-share weight
    group_shares: Mapping[str, float] = field(default_factory=_empty_shares, hash=False)
    user_shares: Mapping[str, float] = field(default_factory=_empty_shares, hash=False)

    def share_for(self, user: str, groups: Iterable[str]) -> float:
        """A user's fair-share weight: their own `share`, else the largest of their
        groups', else `defaults.share`."""
        own = self.user_shares.get(user)
        if own is not None:
            return own
        listed = [self.group_shares[g] for g in dict.fromkeys(groups) if g in self.group_shares]
        return max(listed) if listed else self.share

    def limits_for(self, user: str, groups: Iterable[str]) -> UserLimits:
        """The quota of `user`, a member of `groups` (group names, without '@').

        Start from `defaults`; every group entry that matches overrides key by key,
        and when several matching groups set the same key the most generous value
        wins (None, unlimited, beats any number); the user's own entry then wins
        outright for the keys it sets.
        """
        merged: dict[str, int | None] = {key: getattr(self.defaults, key) for key in LIMIT_KEYS}
        from_groups: dict[str, list[int | None]] = {}
        for group in dict.fromkeys(groups):
            entry = self.groups.get(group)
            if entry is not None:
                for key, value in entry.items():
                    from_groups.setdefault(key, []).append(value)
        for key, values in from_groups.items():
            numbers = [v for v in values if v is not None]
            merged[key] = None if len(numbers) < len(values) else max(numbers)
        own = self.users.get(user)
        if own is not None:
            merged.update(own.items())
        return UserLimits(**merged)

    def is_admin(self, user: str, groups: Iterable[str]) -> bool:
        """True for root, users listed under `admins`, and members of a listed `@group`."""
        if user == "root" or (user in self.admins and not user.startswith("@")):
            return True
        return any(f"@{group}" in self.admins for group in groups)


# --- parsing -------------------------------------------------------------------


def unknown_names(
    config: Config, user_exists: Callable[[str], bool], group_exists: Callable[[str], bool]
) -> list[str]:
    """Warnings for users and groups the config names that this machine does not know.

    Not errors: an account may be created after the config is written (LDAP, a
    new student), and the daemon must start anyway. But a typo in `admins:` or
    `users:` silently grants nothing, so the admin is told. The lookups are
    passed in: the core does no I/O.
    """
    out: list[str] = []
    for name in config.admins:
        if name.startswith("@"):
            if not group_exists(name[1:]):
                out.append(f"admins: no group {name[1:]!r} on this machine")
        elif not user_exists(name):
            out.append(f"admins: no user {name!r} on this machine")
    out += [f"users: no user {n!r} on this machine" for n in config.users if not user_exists(n)]
    out += [
        f"groups: no group {n!r} on this machine" for n in config.groups if not group_exists(n)
    ]
    return out
