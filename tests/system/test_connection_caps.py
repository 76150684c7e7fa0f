"""One user cannot stop the service for others (issue 9), in a booted systemd.

bob floods the system socket with a thousand raw connections, idle ones and
waiting ones (`wait` requests on his own running job); alice's `ts -l` and a
submit must still answer promptly, and every connection of bob's beyond his
cap must get one clear error frame and be closed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from box import Box
from deploy import deploy, ts, wait_for

# Run as bob: open COUNT connections (the first WAITS send a wait request on
# JOB, the rest say nothing), then sort them by what the daemon did: answered
# one frame and closed, or kept the connection open. Results go to OUT as JSON;
# the connections stay open until STOP exists.
FLOOD = r"""
import json, os, resource, select, socket, sys, time
from tsd import protocol
job, count, waits = (int(a) for a in sys.argv[1:4])
out, stop = sys.argv[4:6]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
wait = protocol.encode(protocol.request_to_wire(protocol.Wait(id=job)))
socks = []
for i in range(count):
    if i == waits:
        time.sleep(2)  # the waits settle first: then the cap is filled with idle ones
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/tsd/tsd.sock")
    if i < waits:
        try:
            s.sendall(wait)
        except OSError:
            pass  # refused before we spoke: the answer is waiting to be read
    socks.append(s)
data = {s.fileno(): b"" for s in socks}
by_fd = {s.fileno(): s for s in socks}
closed = set()
poller = select.poll()  # select() stops at fd 1024
for s in socks:
    poller.register(s, select.POLLIN)
deadline = time.time() + 8
while time.time() < deadline:
    ready = [by_fd[fd] for fd, _ in poller.poll(500)]
    if not ready and len(closed) + 64 >= count:
        break
    for s in ready:
        try:
            chunk = s.recv(65536)
        except ConnectionError:
            chunk = b""
        if chunk:
            data[s.fileno()] += chunk
        else:
            closed.add(s.fileno())
            poller.unregister(s)
result = {"open": 0, "refused": [], "other": []}
for s in socks:
    raw = data[s.fileno()]
    if s.fileno() not in closed and not raw:
        result["open"] += 1
        continue
    n = int.from_bytes(raw[:4], "big")
    frames = [raw[4:4 + n]] if len(raw) == 4 + n else []
    if s.fileno() in closed and frames:
        result["refused"].append(json.loads(frames[0]))
    else:
        result["other"].append(raw.decode(errors="replace"))
open(out, "w").write(json.dumps(result))
while not os.path.exists(stop):
    time.sleep(0.1)
"""


@pytest.fixture(scope="module")
def sbox(box: Box) -> Iterator[Box]:
    deploy(box)
    box.write_file("/opt/flood.py", FLOOD)
    yield box


def nofile(box: Box, pid: str) -> tuple[int, int]:
    """Soft and hard RLIMIT_NOFILE of a process in the box."""
    limits = box.read_file(f"/proc/{pid}/limits")
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_service_raises_its_file_limit_and_jobs_get_the_default_one_back(sbox: Box) -> None:
    ts(sbox, "root", "-l")  # starts the daemon
    pid = sbox.show("tsd.service", "MainPID")["MainPID"]
    soft, hard = nofile(sbox, pid)
    # 65536:524288, or what this machine's own hard limit (PID 1's) lets systemd set.
    ceiling = nofile(sbox, "1")[1]
    assert (soft, hard) == (min(65536, ceiling), min(524288, ceiling))
    jid = int(ts(sbox, "alice", "sh", "-c", "ulimit -Sn; ulimit -Hn").stdout)
    assert ts(sbox, "alice", "-w", str(jid), check=False).returncode == 0
    out = sbox.read_file(ts(sbox, "alice", "-o", str(jid)).stdout.strip()).split()
    assert out == ["1024", str(hard)]


def test_a_thousand_connections_of_one_user_leave_others_served_promptly(sbox: Box) -> None:
    flag = "/tmp/flood-job-go"
    sbox.run(["rm", "-f", flag, "/tmp/flood.out", "/tmp/flood.stop"])
    job = int(ts(sbox, "bob", "sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.1; done").stdout)
    sbox.run(
        f"{sbox.python} /opt/flood.py {job} 1000 100 /tmp/flood.out /tmp/flood.stop "
        ">/tmp/flood.err 2>&1 &",
        user="bob",
    )
    try:
        wait_for(lambda: sbox.exists("/tmp/flood.out"), timeout=60)
        result = json.loads(sbox.read_file("/tmp/flood.out"))
        # While bob holds all he may, alice is served at once.
        t0 = time.monotonic()
        listing = ts(sbox, "alice", "-l", timeout=30)
        took_list = time.monotonic() - t0
        t0 = time.monotonic()
        mine = int(ts(sbox, "alice", "-n", "true", timeout=30).stdout)
        took_submit = time.monotonic() - t0
        assert ts(sbox, "alice", "-w", str(mine), check=False, timeout=30).returncode == 0
        # bob himself is at his cap: his next call gets one line.
        r = ts(sbox, "bob", "-l", check=False, timeout=30)
    finally:
        sbox.run(["touch", "/tmp/flood.stop", flag])
    assert listing.stdout.startswith("ID")
    assert took_list < 10 and took_submit < 10, (took_list, took_submit)
    summary = {**result, "refused": sorted({f["error"] for f in result["refused"]})}
    assert result["other"] == [], summary
    assert result["open"] == 64, summary  # connections.per_user: 64 by default
    assert len(result["refused"]) == 1000 - 64
    codes = {(f["ok"], f["code"]) for f in result["refused"]}
    assert codes == {(False, "too_many_connections")}
    messages = {f["error"] for f in result["refused"]}
    assert any("at most 64" in m for m in messages)
    assert any("waiting calls" in m and "at most 32" in m for m in messages)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ts: too many connections"), r.stderr
    # Once bob lets go, he is served again.
    wait_for(lambda: ts(sbox, "bob", "-l", check=False).returncode == 0, timeout=30)
    assert ts(sbox, "bob", "-w", str(job), check=False, timeout=30).returncode == 0
