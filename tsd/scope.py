"""Job scopes through systemd's D-Bus API: the only module that imports pydbus.

Every job on the system service runs in its own transient scope
`tsd-job-<id>.scope`, inside the per-user slice `tsd-u<uid>.slice`. systemd's
dash rule makes that slice a child of `tsd.slice` without any unit file, so the
cgroup path is `/tsd.slice/tsd-u<uid>.slice/tsd-job-<id>.scope`. A scope (not a
service) is used because the daemon forks the job itself: the job keeps the
daemon's fork as its parent, and systemd only takes over its cgroup, its
resource limits and the right to kill everything in it.

The scope of each job is started with one StartTransientUnit, written on the bus
by tsd.dbuswire (a third of pydbus's CPU per call); the rest, none of it per job
(signals, stops, a property, a stale scope's removal), goes through pydbus.
pydbus (and PyGObject under it) is imported on first use so that `import
tsd.scope` stays cheap for the client and the personal daemon, which never
talk to systemd.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from tsd import cgroupcheck, dbuswire, jobtree
from tsd.model import JobLimits

_SYSTEMD = "org.freedesktop.systemd1"
_SYSTEMD_PATH = "/org/freedesktop/systemd1"

# D-Bus error names that mean "this unit or its processes are gone".
_GONE_ERRORS = (
    "org.freedesktop.systemd1.NoSuchUnit",
    "org.freedesktop.systemd1.NoSuchProcess",
    "org.freedesktop.systemd1.LoadFailed",
)


class ScopeError(Exception):
    """systemd refused or failed to create, find or signal a job scope."""


_IMPORT_LOCK = threading.Lock()


def import_gi() -> tuple[Any, Any]:
    """pydbus and GLib, imported by one thread at a time.

    PyGObject's importer is not thread-safe: a thread importing gi.repository.GLib
    while another is inside the same import sees GLib before its overrides are
    applied (GLib.Variant then "takes at most 0 arguments") or fails with
    AttributeError. The daemon's worker threads make their first D-Bus calls
    together after a restart (one job's scope stopped, the next one's started),
    which lost a job that way; every gi import in tsd goes through here.
    """
    with _IMPORT_LOCK:
        import pydbus
        from gi.repository import GLib
    return pydbus, GLib


# Seconds the pids are looked for in /proc alone before systemd is asked whether
# the scope failed: its start job moves them within a few milliseconds.
QUIET_WAIT = 0.05


class SystemdScopes:
    """Creates, signals and stops job scopes on the system bus.

    The connection is made on first use. Calls are synchronous; the daemon runs
    them in its worker threads (tsd.runner). A lock serialises them because one
    pydbus proxy is shared.
    """

    # How long start() waits for the pids to appear in the scope's cgroup.
    start_timeout = 10.0

    def __init__(self, cgroup_root: str | None = None) -> None:
        self._bus: Any = None
        self._manager: Any = None
        self._wire: dbuswire.BusConnection | None = None  # for StartTransientUnit
        self._lock = threading.RLock()
        # Where systemd's cgroup tree is seen from here (the daemon runs beside it).
        self.cgroup_root = cgroup_root or jobtree.cgroup2_mount()

    # ---- names -----------------------------------------------------------------

    @staticmethod
    def unit_name(job_id: int) -> str:
        """The scope unit of job `job_id`."""
        return f"tsd-job-{job_id}.scope"

    @staticmethod
    def slice_name(uid: int) -> str:
        """The slice holding all of user `uid`'s job scopes (a child of tsd.slice)."""
        return f"tsd-u{uid}.slice"

    # ---- connection ------------------------------------------------------------

    def _mgr(self) -> Any:
        if self._manager is None:
            try:
                pydbus, _ = import_gi()
                self._bus = pydbus.SystemBus()
                self._manager = self._bus.get(_SYSTEMD, _SYSTEMD_PATH)[
                    "org.freedesktop.systemd1.Manager"
                ]
            except Exception as e:
                raise ScopeError(f"cannot reach systemd on the system bus: {_message(e)}") from e
        return self._manager

    # ---- operations ------------------------------------------------------------

    def start(
        self,
        job_id: int,
        uid: int,
        pids: Sequence[int],
        limits: JobLimits,
        devices: Sequence[str] | None = None,
        description: str = "",
    ) -> str:
        """Put `pids` into a new scope for job `job_id` of user `uid`; return the unit name.

        Returns once every pid is in the scope's cgroup, so a child waiting on a
        pipe may exec right after. On ScopeError no scope is left behind and the
        caller should kill its child. `devices` None leaves device access alone;
        a list (even empty) closes it down to the standard pseudo devices
        (/dev/null, zero, full, random, urandom, tty, ptmx, pts) plus the listed
        device nodes, read-write. For an NVIDIA job the caller lists the GPUs'
        /dev/nvidiaN and the shared nodes (/dev/nvidiactl, /dev/nvidia-uvm,
        /dev/nvidia-uvm-tools).
        """
        if not pids:
            raise ScopeError(f"job {job_id}: no process to put in a scope")
        unit = self.unit_name(job_id)
        description = description or f"tsd job {job_id}"
        # (name, (D-Bus type, value)): the a(sv) of StartTransientUnit.
        props: list[tuple[str, tuple[str, Any]]] = [
            ("Description", ("s", description)),
            ("Slice", ("s", self.slice_name(uid))),
            ("PIDs", ("au", [int(p) for p in pids])),
            # A failed scope would otherwise stay loaded and block reusing the name
            # and the unit listing; the daemon records the outcome itself.
            ("CollectMode", ("s", "inactive-or-failed")),
            # Accounting makes systemd read cpu.stat and memory figures for usage().
            ("CPUAccounting", ("b", True)),
            ("MemoryAccounting", ("b", True)),
            ("TasksAccounting", ("b", True)),
        ]
        if limits.memory_max is not None:
            props.append(("MemoryMax", ("t", limits.memory_max)))
        if limits.cpu_quota_percent is not None:
            # systemd counts CPU time per second of wall time, in microseconds.
            props.append(("CPUQuotaPerSecUSec", ("t", limits.cpu_quota_percent * 10_000)))
        if limits.tasks_max is not None:
            props.append(("TasksMax", ("t", limits.tasks_max)))
        if devices is not None:
            props.append(("DevicePolicy", ("s", "closed")))
            props.append(("DeviceAllow", ("a(ss)", [(d, "rw") for d in devices])))
        with self._lock:
            try:
                self._start_transient(unit, props)
            except dbuswire.DBusError as e:
                if e.name != "org.freedesktop.systemd1.UnitExists":
                    raise ScopeError(f"cannot start {unit}: {e.message or e.name}") from e
                # A job being started is not recorded as running, so a scope of this
                # name with this job's description (id, user, command) is left from a
                # start that died with its daemon (kill -9 between the scope and the
                # record), or one whose stop is still under way: its processes never
                # ran the job's command. End it, then make the scope anew.
                self._remove_stale(unit, description)
                try:
                    self._start_transient(unit, props)
                except dbuswire.DBusError as e2:
                    raise ScopeError(f"cannot start {unit}: {e2.message or e2.name}") from e2
            try:
                self._wait_for_pids(unit, pids)
            except ScopeError:
                # Leave no half-made scope behind; the caller kills its child.
                self.stop(unit)
                raise
        return unit

    def _start_transient(self, unit: str, props: list[tuple[str, tuple[str, Any]]]) -> None:
        """StartTransientUnit on the wire connection (made on first use, made anew after
        it failed); DBusError for systemd's refusal, ScopeError for no answer at all."""
        try:
            if self._wire is None:
                self._wire = dbuswire.BusConnection()
            # "fail": if a unit of that name is somehow queued, refuse instead of replacing it.
            self._wire.call(
                _SYSTEMD, _SYSTEMD_PATH, "org.freedesktop.systemd1.Manager",
                "StartTransientUnit", "ssa(sv)a(sa(sv))", (unit, "fail", props, []),
            )
        except dbuswire.DBusError:
            raise
        except (OSError, EOFError, dbuswire.WireError) as e:
            self._wire = None  # closed by the failure: the next start connects again
            raise ScopeError(f"cannot start {unit}: no answer on the system bus ({e})") from e

    # How long _remove_stale waits for a stale scope to go after SIGKILL.
    stale_timeout = 10.0

    def _remove_stale(self, unit: str, description: str) -> None:
        """Kill and unload a scope left from a dead start, so its name can be used again.

        Only one made for this very job: ids start again at 1 with a new state.db
        (the old one moved aside) while jobs of the old one may still run, and
        those must not be killed for a name.
        """
        mgr = self._mgr()
        found = self._property(unit, "Unit", "Description")
        if found is not None and found != description:
            raise ScopeError(
                f"cannot start {unit}: it already exists and runs {found!r}"
                " (a job of an earlier state.db?)"
            )
        with suppress(Exception):
            mgr.KillUnit(unit, "all", int(signal.SIGKILL))
        with suppress(Exception):
            mgr.StopUnit(unit, "replace")
        deadline = time.monotonic() + self.stale_timeout
        while time.monotonic() < deadline:
            state = self._property(unit, "Unit", "ActiveState")
            if state is None:
                return  # unloaded (CollectMode): the name is free
            if state in ("inactive", "failed"):
                with suppress(Exception):
                    mgr.ResetFailedUnit(unit)
                if self._property(unit, "Unit", "ActiveState") is None:
                    return
            time.sleep(0.02)
        raise ScopeError(f"cannot start {unit}: a stale scope of that name would not go away")

    def _wait_for_pids(self, unit: str, pids: Sequence[int]) -> str:
        """Poll /proc until every pid is in the scope's cgroup; return that cgroup path.

        The scope's start job runs after StartTransientUnit returns, and it moves
        the pids within a few milliseconds. Their cgroup path names the unit
        (unit names are unique), so /proc alone says when they are in: systemd
        is asked (two D-Bus calls per question) only while they are not, to
        fail at once on a scope that failed. No D-Bus signal subscription (and
        so no GLib main loop in the daemon).
        """
        deadline = time.monotonic() + self.start_timeout
        quiet_until = time.monotonic() + QUIET_WAIT
        while True:
            paths = [_cgroup_of(p) for p in pids]
            if all(p is not None and p.endswith(f"/{unit}") for p in paths):
                return str(paths[0])
            now = time.monotonic()
            if now > quiet_until:
                state = self._property(unit, "Unit", "ActiveState")
                if state is None or state == "failed":
                    # CollectMode unloads a failed scope at once: gone means failed.
                    raise ScopeError(f"systemd could not start {unit}: see its journal")
            if now > deadline:
                raise ScopeError(
                    f"{unit}: pids {list(pids)} not in its cgroup after {self.start_timeout}s"
                )
            time.sleep(0.0005 if now <= quiet_until else 0.002)

    def kill(self, unit: str, sig: int) -> bool:
        """Send `sig` to every process in `unit`; False when the unit (or every process) is gone."""
        with self._lock:
            mgr = self._mgr()
            try:
                mgr.KillUnit(unit, "all", int(sig))
            except Exception as e:
                if _dbus_error_name(e) in _GONE_ERRORS:
                    return False
                raise ScopeError(f"cannot signal {unit}: {_message(e)}") from e
        return True

    def stop(self, unit: str) -> None:
        """Ask systemd to stop `unit` (SIGTERM, then SIGKILL); no error when it is gone.

        Returns once the stop job is queued, not when the processes are gone.
        """
        with self._lock:
            mgr = self._mgr()
            try:
                mgr.StopUnit(unit, "replace")
            except Exception as e:
                if _dbus_error_name(e) in _GONE_ERRORS:
                    return
                raise ScopeError(f"cannot stop {unit}: {_message(e)}") from e

    def occupied(self, unit: str, uid: int, besides: int | None = None) -> bool:
        """Whether a process is left in job scope `unit` of user `uid`, read from its
        cgroup (no D-Bus call); True whenever that cannot be told for sure. `besides`:
        a process that does not count (the job's supervisor, still there when it
        reported the job's end on its pipe and waits for the ACK, or on its way out).

        A scope whose last process is gone stops and unloads itself (CollectMode):
        asking systemd to stop it as well costs it, D-Bus and the daemon a round trip
        per job for nothing.
        """
        user_slice = os.path.join(self.cgroup_root, cgroupcheck.SLICE, self.slice_name(uid))
        scope = os.path.join(user_slice, unit)
        try:
            with open(os.path.join(scope, "cgroup.events")) as f:
                for line in f:
                    if line.startswith("populated "):
                        if line.split()[1] == "0":
                            return False
                        return besides is None or not _only(scope, besides)
        except FileNotFoundError:
            # Gone already, if its slice is where we look; else we cannot tell.
            return os.path.isdir(scope) or not os.path.isdir(user_slice)
        except OSError:
            pass
        return True

    # ---- helpers ---------------------------------------------------------------

    def _property(self, unit: str, interface: str, name: str) -> Any:
        """One property of a loaded unit; None when the unit or the property does not exist."""
        mgr = self._mgr()
        try:
            path = mgr.GetUnit(unit)
        except Exception as e:
            if _dbus_error_name(e) in _GONE_ERRORS:
                return None
            raise ScopeError(f"cannot look up {unit}: {_message(e)}") from e
        try:
            _, GLib = import_gi()
            # A raw call: a pydbus proxy would introspect the unit object first.
            reply = self._bus.con.call_sync(
                _SYSTEMD,
                path,
                "org.freedesktop.DBus.Properties",
                "Get",
                GLib.Variant("(ss)", (f"org.freedesktop.systemd1.{interface}", name)),
                GLib.VariantType.new("(v)"),
                0,
                5000,
                None,
            )
            return reply.unpack()[0]
        except Exception as e:
            name_ = _dbus_error_name(e)
            if name_ in _GONE_ERRORS or name_ in (
                "org.freedesktop.DBus.Error.UnknownProperty",
                "org.freedesktop.DBus.Error.InvalidArgs",
                "org.freedesktop.DBus.Error.UnknownObject",
                "org.freedesktop.DBus.Error.UnknownInterface",
            ):
                return None
            raise ScopeError(f"cannot read {name} of {unit}: {_message(e)}") from e


def _only(scope: str, pid: int) -> bool:
    """Whether `pid` is all the scope's cgroup holds: no other process, no cgroup
    below it (a root job may make some; their processes are not in cgroup.procs)."""
    try:
        with open(os.path.join(scope, "cgroup.procs")) as f:
            if set(f.read().split()) - {str(pid)}:
                return False
        with os.scandir(scope) as entries:
            return not any(e.is_dir() for e in entries)
    except OSError:
        return False


def _cgroup_of(pid: int) -> str | None:
    """`pid`'s cgroup2 path (outside systemd's cgroup namespace with a prefix), None
    where it has none (cgroup v1 only)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except (FileNotFoundError, ProcessLookupError):
        raise ScopeError(f"process {pid} exited before it reached its scope") from None
    return None


def _dbus_error_name(e: BaseException) -> str | None:
    """The D-Bus error name of a GLib error from a remote call, if it is one."""
    try:
        with _IMPORT_LOCK:  # see import_gi
            from gi.repository import Gio
    except ImportError:
        return None
    name = Gio.DBusError.get_remote_error(e) if hasattr(e, "domain") else None
    return str(name) if name else None


def _message(e: BaseException) -> str:
    """One line: the remote error's own message, without GLib's and GDBus's prefixes."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = re.sub(r"^\S+-quark: ", "", msg)
    msg = re.sub(r"^GDBus\.Error:[\w.]+: ", "", msg)
    return re.sub(r"\s+\(\d+\)$", "", msg)
