"""A job's processes, as its supervisor sees them: reaping, finding, ending them.

The supervisor is the child subreaper of its job, so every process the job
starts stays below it: once the job's main process is reaped, no child left
means no process left: the reaping's own wait4 says so (ECHILD), and the common
end of a job (nothing left behind) costs no walk over the machine's processes
(outside a job scope, nothing at all beyond the reaping, `reap`). Only when something is
left are the processes found: in a job scope, its cgroup.procs; and below the
supervisor, through the kernel's lists of each task's children (all of /proc
where a kernel has none).

Runs in the supervisor after fork: system calls only, nothing shared.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time


def reap(main: int) -> tuple[int | None, object | None, bool]:
    """Reap every exited descendant (we are their subreaper): the main one's wait status
    and rusage (None, None while it runs), and whether no child at all is left. With
    none left, nothing of the job is left below us (see the module docstring)."""
    status: int | None = None
    usage: object | None = None
    while True:
        try:
            pid, code, used = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return status, usage, True
        if pid == 0:
            return status, usage, False
        if pid == main:
            status, usage = code, used


def _has_children() -> bool:
    """Whether any process is left below us: as their subreaper, every descendant whose
    parent is gone is our child, so no child means no descendant at all."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _descendants() -> list[int]:
    """Every process below us, through the kernel's lists of each task's children."""
    me = os.getpid()
    if not os.path.exists(f"/proc/{me}/task/{me}/children"):  # a kernel without them
        return _descendants_by_scan(me)
    out: list[int] = []
    todo = [me]
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except (OSError, ValueError):
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _descendants_by_scan(me: int) -> list[int]:
    """Every process below us, by walking all of /proc (our tree stays ours: subreaper)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2 :].split()
        try:
            children.setdefault(int(rest[1]), []).append(int(name))
        except (IndexError, ValueError):
            continue
    out: list[int] = []
    todo = [me]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def own_cgroup_dir() -> str | None:
    """Our cgroup2 directory when we live in a tsd job scope, else None."""
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                if line.startswith("0::"):
                    path = line[3:].strip()
                    if path.endswith(".scope") and "/tsd-job-" in path:
                        return cgroup2_mount() + path
    except OSError:
        pass
    return None


def cgroup2_mount() -> str:
    """Where the unified hierarchy is mounted: /sys/fs/cgroup, or .../unified on hybrid hosts."""
    if os.path.exists("/sys/fs/cgroup/cgroup.procs"):
        return "/sys/fs/cgroup"
    return "/sys/fs/cgroup/unified"


def _scope_procs(cg: str | None) -> set[int]:
    """The processes of our job scope (`cg`), us excluded; none outside a scope."""
    if not cg:
        return set()
    try:
        with open(os.path.join(cg, "cgroup.procs")) as fh:
            pids = {int(x) for x in fh.read().split()}
    except (OSError, ValueError):
        return set()
    pids.discard(os.getpid())
    return pids


def _anything_left(cg: str | None) -> bool:
    """Reap what has exited; then whether any process of the job is left."""
    return not reap(-1)[2] or bool(_scope_procs(cg))


def _tree(cg: str | None) -> set[int]:
    pids = _scope_procs(cg)
    if _has_children():
        pids.update(_descendants())
    pids.discard(os.getpid())
    return pids


def signal_tree(sig: int, cg: str | None) -> None:
    """Send `sig` to every process of the job (`cg`: its scope's cgroup, or None)."""
    for pid in _tree(cg):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def end_leftovers(grace: float, cg: str | None) -> None:
    """After the main process: end what the job left (SIGTERM, `grace` s, SIGKILL)."""
    if not _anything_left(cg):
        return
    signal_tree(signal.SIGTERM, cg)
    deadline = time.time() + grace
    while time.time() < deadline:
        if not _anything_left(cg):
            return
        time.sleep(0.02)
    signal_tree(signal.SIGKILL, cg)
    for _ in range(100):
        if not _anything_left(cg):
            return
        time.sleep(0.01)


def cgroup_usage(cg: str | None) -> tuple[float | None, int | None]:
    """CPU time and peak memory from our scope's cgroup, where the kernel keeps them."""
    if not cg:
        return None, None
    cpu: float | None = None
    peak: int | None = None
    try:
        with open(os.path.join(cg, "cpu.stat")) as fh:
            for line in fh:
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    cpu = int(value) / 1e6
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(cg, "memory.peak")) as fh:
            peak = int(fh.read().strip())
    except (OSError, ValueError):
        pass
    return cpu, peak
