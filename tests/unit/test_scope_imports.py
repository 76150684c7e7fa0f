"""PyGObject imported from the daemon's worker threads at once must come out whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("gi")
pytest.importorskip("pydbus")

# Two worker threads make the first D-Bus calls of a fresh daemon together, as after
# a restart: one stops a finished job's scope (opens the bus through pydbus), the
# other starts the next job's scope (builds GLib.Variant properties first). With
# no system bus at the address given, both must fail because they could not
# connect, not with PyGObject's half-imported module ("'gi.repository.GLib' object
# has no attribute 'Idle'", or GLib.Variant "takes at most 0 arguments").
_RACE = textwrap.dedent(
    """
    import threading
    from tsd.model import JobLimits
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
    start = lambda: SystemdScopes().start(2, 1000, [1], JobLimits(), description="tsd job 2")
    threads = [threading.Thread(target=attempt, args=(c,)) for c in (stop, start)]
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
