"""System tests: each test module gets its own freshly booted systemd box.

Every test under tests/system is marked `system`. When a box cannot boot here
(not root, no unshare, no overlayfs or cgroup2), the tests are skipped with the
reason, never passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from box import Box

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test in this directory `system`, so `-m "not system"` leaves them out."""
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.system)


@pytest.fixture(scope="module")
def box(request: pytest.FixtureRequest) -> Iterator[Box]:
    """A booted box with this checkout read-only at /src; stopped after the module."""
    ok, why = Box.can_boot()
    if not ok:
        pytest.skip(f"cannot boot a systemd box here: {why}")
    b = Box.start(REPO)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        # Output capture holds fd 1 during setup; step around it to show the timing.
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\n[box] {request.module.__name__}: systemd booted in {b.boot_seconds:.2f}s "
                f"(pid {b.pid})"
            )
    try:
        yield b
    finally:
        b.stop()
