"""What the Slurm benches share: a one-node Slurm in a booted box with tsd forwarding to it,
and a plain-Python script run there as alice that prints its timings as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "system"))

from box import Box  # noqa: E402
from deploy import deploy  # noqa: E402
from slurmbox import slurm_installed, start_cluster  # noqa: E402

CONFIG = """\
admins: [root]
cluster:
  engine: slurm
  partition: debug
  poll_seconds: 0.1
  max_poll_seconds: 1
"""


def run_as_alice(name: str, inner: str, args: list[str], timeout: float) -> dict[str, list[float]]:
    """Boot the box, start Slurm, install tsd, run `inner` as alice; its JSON output.

    Exits with one line naming `name` when Slurm or the box is not available here."""
    can_boot, why_not = Box.can_boot()
    why = slurm_installed() or (None if can_boot else why_not)
    if why:
        raise SystemExit(f"{name}: {why}")
    with Box.start(REPO) as box:
        start_cluster(box)
        deploy(box, CONFIG)
        path = f"/tmp/{name}_inner.py"
        box.write_file(path, inner)
        r = box.run(["python3", path, *args], user="alice", timeout=timeout)
        data: dict[str, list[float]] = json.loads(r.stdout)
        return data
