"""Put this checkout's tsd into a booted box as a system service, quickly.

The install script has its own tests (test_install.py); the multi-user tests
need a service in seconds, so this lays the same units, sysusers and tmpfiles
files down by hand, with ExecStart pointing at the checkout's venv.
"""

from __future__ import annotations

import json
import time
from typing import Any

from box import Box

CONFIG = """\
slots: 4
admins: [root, dave]
defaults:
  max_running_slots: 4
  max_queued: 5000
users:
  bob: {max_running_slots: 1}
job:
  tasks_max: 512
  memory_max: 2G
  cpu_quota: 200%
kill_grace_seconds: 3
"""


def deploy(box: Box, config: str = CONFIG) -> None:
    """Install units and config, create users, start tsd.socket."""
    tsd_bin = f"{box.repo}/.venv/bin/tsd"
    ts_bin = f"{box.repo}/.venv/bin/ts"
    service = box.read_file("/src/systemd/tsd.service").replace("/usr/bin/tsd", tsd_bin)
    box.write_file("/etc/systemd/system/tsd.service", service)
    for unit in ("tsd.socket", "tsd.slice"):
        box.write_file(f"/etc/systemd/system/{unit}", box.read_file(f"/src/systemd/{unit}"))
    box.run("systemd-sysusers /src/systemd/tsd.sysusers && "
            "systemd-tmpfiles --create /src/systemd/tsd.tmpfiles")
    box.write_file("/etc/tsd/tsd.yaml", config)
    box.run(["ln", "-sf", ts_bin, "/usr/local/bin/ts"])
    box.run(["ln", "-sf", tsd_bin, "/usr/local/bin/tsd"])
    box.add_user("alice", ["tsd", "lab"])
    box.add_user("bob", ["tsd"])
    box.add_user("carol")
    box.add_user("dave", ["tsd"])
    box.systemctl("daemon-reload")
    box.systemctl("start", "tsd.socket")


def ts(box: Box, user: str, *args: str, check: bool = True, **kw: Any) -> Any:
    """Run `ts ARGS` in the box as `user`."""
    return box.run(["ts", *args], user=None if user == "root" else user, check=check, **kw)


def jobs(box: Box, user: str = "root") -> dict[int, dict[str, Any]]:
    """Every job (ts -A -M json) by id."""
    out = ts(box, user, "-A", "-M", "json").stdout
    return {j["ID"]: j for j in json.loads(out)}


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; fail the test on timeout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")
