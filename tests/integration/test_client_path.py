"""What `ts` loads to do its everyday work, and the listing's two shapes (issue 10).

Every `ts` call pays for what it imports: the quick paths (queue a job, list,
-i, -s, -w, -c, -S) run on the standard library's light modules and tsd's own
light ones, never dataclasses, typing, enum, re, json's package, socket.py,
contextlib, collections, functools, zlib, os or the typed protocol and job model.
A behaviour test (timing stays in bench/): it runs the real client code
against a real daemon and looks at sys.modules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from integration.harness import Env, Runner, queue, wait_state

from tsd import protocol
from tsd.cli_output import listing_text, listing_views
from tsd.client import Client

REPO = Path(__file__).resolve().parents[2]
# Run as `ts` runs its main(), without site (whose .pth files, an editable install's
# finder among them, import what they like): only what the client itself loads counts.
CLIENT = (
    "import sys, atexit\n"
    "before = set(sys.modules)\n"
    "atexit.register(lambda: sys.stderr.write("
    "'MODULES ' + ' '.join(sorted(set(sys.modules) - before)) + '\\n'))\n"
    "from tsd.cli import main\n"
    "main(sys.argv[1:])\n"
)
HEAVY = {
    "dataclasses", "typing", "enum", "re", "inspect", "ast", "json", "socket", "subprocess",
    "tsd.protocol", "tsd.model", "tsd.codec", "tsd.wirefields", "tsd.jobcontrols",
    # Lighter, but still a few ms of a `ts` call that needs none of them.
    "contextlib", "collections", "functools", "zlib",
    # os builds _collections_abc's classes: 0.9 ms of each call (tsd.leanos instead).
    "os", "_collections_abc", "struct",
    # stat only wraps the built-in _stat, which is all ts needs (25-75 us).
    "stat",
}  # fmt: skip


def loaded_by(env: Env, *args: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-S", "-c", CLIENT, *args],
        env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
        cwd=str(env.tmp),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return set(line.split()[1:])


def test_everyday_ts_calls_load_no_dataclasses_typing_or_typed_protocol(
    tsd_env: Env, ts: Runner
) -> None:
    job = queue(ts, "echo", "hi")
    wait_state(ts, job, "finished")
    calls = [
        ["true"], ["-n", "true"], ["-l"], [], ["-A"], ["-M", "tab"], ["-i", str(job)],
        ["-s", str(job)], ["-w", str(job)], ["-c", str(job)], ["-t", str(job)], ["-S"],
        ["-o", str(job)], ["-R"], ["-q"],
    ]  # fmt: skip
    for args in calls:
        heavy = loaded_by(tsd_env, *args) & HEAVY
        assert not heavy, f"ts {' '.join(args)} loaded {sorted(heavy)}"


def test_the_rows_ts_asks_for_list_exactly_as_an_older_clients_records(
    tsd_env: Env, ts: Runner
) -> None:
    ts("-S", "0")  # nothing starts: the list stays put between the two calls
    # Long commands: the listing comes in several frames of either shape.
    ids = [queue(ts, "echo", f"{i}", '"' * 60000) for i in range(12)]
    ids.append(queue(ts, "-L", "lab é", "-D", str(ids[0]), "true"))
    client = Client(path=str(tsd_env.socket))
    rows = client.call({"v": protocol.PROTOCOL_VERSION, "op": "list", "rows": True})
    records = client.call(protocol.ListJobs())
    assert "jobs" not in rows and "rows" not in records and len(rows["pieces"]) > 1
    assert [v.id for v in listing_views(rows)] == [j["id"] for j in records["jobs"]] == ids
    for fmt in ("default", "tab"):
        assert listing_text(rows, fmt, False, width=None) == listing_text(
            records, fmt, False, width=None
        )
    assert ts("-l").stdout == listing_text(records, "default", False, width=None)
