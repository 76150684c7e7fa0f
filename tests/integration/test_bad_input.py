"""Bad input never crashes the daemon or changes state; each gets one clear line."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time

import pytest
from integration.harness import Env, Runner

from tsd import protocol


def listing(ts: Runner) -> list[dict[str, object]]:
    return [
        {k: v for k, v in j.items() if k not in ("Time_ms",)}
        for j in json.loads(ts("-M", "json").stdout)
    ]


def raw(env: Env, payload: bytes, read: bool = True) -> dict[str, object] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(env.socket))
        s.sendall(payload)
        if not read:
            return None
        header = s.recv(4)
        if len(header) < 4:
            return None
        (n,) = struct.unpack(">I", header)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                break
            body += chunk
        return json.loads(body)


def frame(obj: object) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


@pytest.fixture
def started(ts: Runner, tsd_env: Env) -> list[dict[str, object]]:
    ts("echo", "one")
    ts("-w")
    return listing(ts)


@pytest.mark.parametrize(
    "payload, code",
    [
        (struct.pack(">I", 2 << 20) + b"{}", "protocol"),
        (struct.pack(">I", 5) + b"{bad}", "protocol"),
        (struct.pack(">I", 2) + b"[]", "protocol"),
        (struct.pack(">I", 4) + b"\xff\xfe\xfd\xfc", "protocol"),
        (frame({"v": 99, "op": "list"}), "version"),
        (frame({"op": "list"}), "version"),
        (frame({"v": 1, "op": "explode"}), "bad_request"),
        (frame({"v": 1, "op": "remove", "id": "7"}), "bad_request"),
        (frame({"v": 1, "op": "remove", "id": True}), "bad_request"),
        (frame({"v": 1, "op": "remove", "id": -1}), "bad_request"),
        (frame({"v": 1, "op": "slots", "value": 1e300}), "bad_request"),
        (frame({"v": 1, "op": "submit", "spec": {"command": [], "cwd": "/"}}), "bad_request"),
        (frame({"v": 1, "op": "submit", "spec": {"command": ["x"], "cwd": "rel"}}), "bad_request"),
        (frame({"v": 1, "op": "submit", "spec": {"command": ["x"], "cwd": "/",
                                                  "env": [["A=B", "c"]]}}), "bad_request"),
        (frame({"v": 1, "op": "submit", "spec": {"command": ["x\u0000"], "cwd": "/"}}),
         "bad_request"),
        (frame({"v": 1, "op": "submit", "spec": {"command": ["x"], "cwd": "/",
                                                  "slots": 0}}), "bad_request"),
        (frame({"v": 1, "op": "submit", "spec": {"command": ["x"], "cwd": "/",
                                                  "output_name": "../etc/passwd"}}),
         "bad_request"),
        (frame({"v": 1, "op": "submit", "spec": "rm -rf /"}), "bad_request"),
        (struct.pack(">I", 20001) + b"[" * 10000 + b"]" * 10001, "protocol"),
    ],
)
def test_malformed_requests_get_one_error_and_change_nothing(
    tsd_env: Env, ts: Runner, started: list[dict[str, object]], payload: bytes, code: str
) -> None:
    reply = raw(tsd_env, payload)
    assert reply is not None
    assert reply["ok"] is False and reply["code"] == code
    assert isinstance(reply["error"], str) and "\n" not in reply["error"]
    assert listing(ts) == started


def test_version_mismatch_names_both_versions(tsd_env: Env, started: object) -> None:
    reply = raw(tsd_env, frame({"v": 99, "op": "list"}))
    assert reply is not None
    assert "99" in str(reply["error"]) and str(protocol.PROTOCOL_VERSION) in str(reply["error"])


def test_silent_and_half_frame_clients_do_not_block_others(
    tsd_env: Env, ts: Runner, started: list[dict[str, object]]
) -> None:
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(tsd_env.socket))
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(str(tsd_env.socket))
    half.sendall(struct.pack(">I", 100) + b'{"v": 1,')
    try:
        t0 = time.time()
        assert ts("echo", "two").stdout.strip() == "2"
        assert time.time() - t0 < 5
    finally:
        half.close()  # hangs up mid-frame
        silent.close()
    ts("-w")
    assert [j["ID"] for j in listing(ts)] == [1, 2]


def test_client_that_disconnects_mid_stream_leaves_the_daemon_well(
    tsd_env: Env, ts: Runner, started: object
) -> None:
    jid = ts("sleep", "1").stdout.strip()
    waiter = subprocess.Popen(["ts", "-w", jid], env=dict(tsd_env))
    time.sleep(0.3)
    waiter.kill()
    waiter.wait()
    assert ts("-w", jid).returncode == 0
    assert ts("-l").returncode == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["-i", "999"], "ts: job 999 does not exist"),
        (["-k", "999"], "ts: job 999 does not exist"),
        (["-r", "999"], "ts: job 999 does not exist"),
        (["-w", "999"], "ts: job 999 does not exist"),
        (["-D", "999", "true"], "ts: job 999 does not exist"),
        (["-W", "999", "true"], "ts: job 999 does not exist"),
        (["-N", "9", "true"], "ts: job needs 9 slots"),
    ],
)
def test_bad_ids_and_impossible_jobs_get_one_line_and_exit_1(
    ts: Runner, started: list[dict[str, object]], args: list[str], message: str
) -> None:
    r = ts(*args, check=False)
    assert r.returncode == 1
    assert r.stderr.startswith(message), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert listing(ts) == started


def test_removing_a_running_job_is_refused(ts: Runner, started: object) -> None:
    # Long enough to be still running after three `ts` calls on a loaded machine.
    jid = ts("sleep", "60").stdout.strip()
    time.sleep(0.3)
    r = ts("-r", jid, check=False)
    assert r.returncode == 1 and "running" in r.stderr
    ts("-k", jid)


def test_a_list_longer_than_one_frame_arrives_whole(ts: Runner, tsd_env: Env) -> None:
    ts("-S", "0")  # nothing runs: the queue only grows
    word = "x" * 100_000
    ids = [int(ts("echo", word, str(i)).stdout) for i in range(15)]  # ~1.5 MB of records
    listed = json.loads(ts("-M", "json").stdout)
    assert [j["ID"] for j in listed] == ids
    assert all(j["Command"].startswith("echo x") for j in listed)
    assert len(ts("-l").stdout.splitlines()) == 16


def test_a_command_over_the_length_limit_is_refused(ts: Runner, started: object) -> None:
    r = ts("echo", "y" * 100_000, "z" * 100_000, check=False)
    assert r.returncode == 1 and "longer than" in r.stderr
