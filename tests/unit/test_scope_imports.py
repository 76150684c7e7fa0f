"""PyGObject imported from the daemon's worker threads at once must come out whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("gi")
pytest.importorskip("pydbus")

# Two worker threads make the first D-Bus calls of a fresh daemon together, as after
# a restart: one stops a finished job's scope, the other signals another's (both
# open the bus through pydbus; a scope's start goes through tsd.dbuswire). With
# no system bus at the address given, both must fail because they could not
# connect, not with PyGObject's half-imported module ("'gi.repository.GLib' object
# has no attribute 'Idle'", or GLib.Variant "takes at most 0 arguments").
_RACE = textwrap.dedent(
    """
    import threading
    from tsd.scope import ScopeError, SystemdScopes
    outcomes = []
    barrier = threading.Barrier(2)
    def attempt(call):
        barrier.wait()
        try:
            call()
            outcomes.append("ok")
        except ScopeError as e:
            outcomes.append("ok" if "Could not connect" in str(e) else str(e))
        except Exception as e:
            outcomes.append(repr(e))
    stop = lambda: SystemdScopes().stop("tsd-job-1.scope")
    kill = lambda: SystemdScopes().kill("tsd-job-2.scope", 15)
    threads = [threading.Thread(target=attempt, args=(c,)) for c in (stop, kill)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(outcomes)
    """
)


def test_first_scope_stop_and_start_in_two_threads_import_pygobject_whole() -> None:
    for _ in range(8):
        run = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True,
                             timeout=60, env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent",
                                              "PATH": "/usr/bin:/bin"})
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "['ok', 'ok']", run.stdout + run.stderr


def test_a_scope_start_without_a_system_bus_is_one_clear_scope_error() -> None:
    code = textwrap.dedent(
        """
        from tsd.model import JobLimits
        from tsd.scope import ScopeError, SystemdScopes
        try:
            SystemdScopes().start(2, 1000, [1], JobLimits(), description="tsd job 2")
        except ScopeError as e:
            print(e)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent",
                              "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout == (
        "cannot start tsd-job-2.scope: no answer on the system bus"
        " ([Errno 2] No such file or directory)\n"
    ), run.stdout + run.stderr
