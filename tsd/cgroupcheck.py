"""Whether the kernel can enforce the job limits of tsd.yaml (`job:`) and slice drop-ins.

systemd accepts MemoryMax=, CPUQuota= and TasksMax= on a scope whatever the
kernel offers, and silently enforces nothing when the cgroup v2 controllers
behind them (memory, cpu, pids) are missing: on a hybrid host the v1
hierarchies hold them, and `cgroup_disable=` on the kernel command line can
remove them. Admins must hear about that at daemon start, not from a job that
ate the machine's memory.

`controller_status` is pure (texts in, verdict out) for unit tests;
`read_controller_status` reads the files of this machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Controller -> the tsd.yaml `job:` key (and systemd property) it enforces.
WANTED: dict[str, str] = {
    "memory": "memory_max (MemoryMax=)",
    "cpu": "cpu_quota (CPUQuota=)",
    "pids": "tasks_max (TasksMax=)",
}
CGROUP_ROOTS = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
SLICE = "tsd.slice"


@dataclass(frozen=True)
class ControllerStatus:
    """Which wanted controllers a job scope under tsd.slice can have.

    `missing`: not offered to cgroup v2 at all, so limits using them are not
    enforced. `pending`: offered, not yet enabled for tsd.slice's children;
    systemd enables those when a unit first asks for a limit, so they are fine.
    """

    cgroup2: bool
    enabled: frozenset[str]
    pending: frozenset[str]
    missing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when every wanted controller can be enforced."""
        return self.cgroup2 and not self.missing

    def warning(self) -> str | None:
        """One line for the log and `tsd --check-config`, or None when all is well."""
        if not self.cgroup2:
            return (
                "no cgroup v2 hierarchy is mounted: job limits (memory_max, cpu_quota, "
                "tasks_max) are NOT enforced"
            )
        if not self.missing:
            return None
        limits = ", ".join(WANTED[c] for c in self.missing)
        return (
            f"cgroup v2 controllers {', '.join(self.missing)} are not available to {SLICE}: "
            f"{limits} NOT enforced (they are held by cgroup v1 or disabled; boot with "
            "systemd.unified_cgroup_hierarchy=1 and without cgroup_disable=)"
        )


def controller_status(
    root_controllers: str | None,
    subtree_control: str | None,
    wanted: tuple[str, ...] = tuple(WANTED),
) -> ControllerStatus:
    """The verdict from two file texts.

    `root_controllers`: the cgroup2 root's `cgroup.controllers` (None when no
    cgroup2 is mounted). `subtree_control`: tsd.slice's `cgroup.subtree_control`
    when the slice exists, else the root's (None if unreadable).
    """
    if root_controllers is None:
        return ControllerStatus(False, frozenset(), frozenset(), tuple(wanted))
    available = set(root_controllers.split())
    enabled = set((subtree_control or "").split())
    return ControllerStatus(
        cgroup2=True,
        enabled=frozenset(c for c in wanted if c in enabled and c in available),
        pending=frozenset(c for c in wanted if c in available and c not in enabled),
        missing=tuple(c for c in wanted if c not in available),
    )


def read_controller_status(roots: tuple[str, ...] = CGROUP_ROOTS) -> ControllerStatus:
    """controller_status of this machine: the first cgroup2 root of `roots` and its tsd.slice."""
    for root in roots:
        controllers = _read(os.path.join(root, "cgroup.controllers"))
        if controllers is None:
            continue
        subtree = _read(os.path.join(root, SLICE, "cgroup.subtree_control"))
        if subtree is None:
            subtree = _read(os.path.join(root, "cgroup.subtree_control"))
        return controller_status(controllers, subtree)
    return controller_status(None, None)


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def main() -> int:
    """`python -m tsd.cgroupcheck`: one line; exit 1 when some limits are not enforced."""
    status = read_controller_status()
    warning = status.warning()
    if warning is None:
        print(f"tsd: job limits are enforced (cgroup v2: {', '.join(WANTED)})")
        return 0
    print(f"tsd: warning: {warning}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["ControllerStatus", "controller_status", "main", "read_controller_status"]
