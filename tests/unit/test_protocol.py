"""Protocol framing and validation: hostile bytes only ever become a TsdError."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsd import framing, protocol
from tsd.errors import BadRequest, ProtocolError, TsdError, VersionMismatch
from tsd.model import DependMode, ExitInfo, Job, JobSpec, JobState

REPO = Path(__file__).resolve().parents[2]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=20,
)

texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1, max_size=20,
)
# Labels and -O names may not hold control characters (Cc): they are refused at submit.
line_texts = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20,
)

specs = st.builds(
    JobSpec,
    command=st.lists(texts, min_size=1, max_size=4).map(tuple).filter(
        lambda c: "".join(c).strip() != ""
    ),
    cwd=texts.map(lambda t: "/" + t),
    env=st.lists(
        st.tuples(texts.filter(lambda k: "=" not in k), st.text(max_size=10).filter(
            lambda v: "\x00" not in v and not any(0xD800 <= ord(c) <= 0xDFFF for c in v)
        )),
        max_size=3,
    ).map(tuple),
    umask=st.integers(0, 0o777),
    label=st.none() | line_texts,
    slots=st.integers(1, 64),
    gpus=st.integers(0, 8),
    gpu_indices=st.none(),
    depends=st.lists(st.integers(1, 10**6), max_size=3).map(tuple),
    depend_mode=st.sampled_from(list(DependMode)),
    store_output=st.booleans(),
    gzip=st.booleans(),
    stderr_apart=st.booleans(),
    output_name=st.none() | line_texts.filter(lambda t: "/" not in t and t not in (".", "..")),
    mail=st.booleans(),
    timeout=st.none() | st.floats(min_value=0.5, max_value=1e6),
    env_info=st.none() | texts,
)


def test_a_frame_is_a_big_endian_length_and_compact_json() -> None:
    data = protocol.encode({"ok": True, "n": 1})
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    assert json.loads(data[4:]) == {"ok": True, "n": 1}


def test_frames_over_one_mib_are_refused_both_ways() -> None:
    with pytest.raises(ProtocolError, match="over the"):
        protocol.encode({"x": "a" * protocol.MAX_FRAME})
    with pytest.raises(ProtocolError, match="over the"):
        protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME + 1))
    assert protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME)) == protocol.MAX_FRAME


# Any text, lone surrogates and control characters included (os.environ holds the
# former), every float JSON can carry and some it only writes (NaN, infinities).
wide_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters()),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(st.characters(), max_size=8), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=500)
@given(wide_json_values)
def test_the_clients_plain_encoder_writes_what_json_dumps_writes(obj: Any) -> None:
    expected = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    assert framing.plain_dumps(obj) == expected == framing.dumps(obj)


def test_the_plain_encoder_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        framing.plain_dumps({"a": [b"bytes"]})
    with pytest.raises(TypeError, match="keys must be str"):
        framing.plain_dumps({1: "x"})


def test_a_client_frame_is_the_frame_the_daemon_would_write() -> None:
    request = {"v": 1, "op": "submit", "spec": {"command": ["echo", "é\n\x01\"q\\"],
                                                "env": [["A", "ü\t"]]}}
    assert framing.encode(request, plain=True) == framing.encode(request)


def test_framing_loads_no_json_accelerator_until_something_is_decoded() -> None:
    # The `ts` client sends its request first, then loads _json (a shared library).
    code = (
        "import sys; from tsd import framing\n"
        "framing.encode({'v': 1, 'op': 'list'}, plain=True)\n"
        "print('_json' in sys.modules, end=' ')\n"
        "framing.ready_to_decode()\n"
        "print('_json' in sys.modules, framing.loads('{\"ok\": true}'))\n"
    )
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True", "{'ok':", "True}"]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_to_an_object_or_a_protocol_error(body: bytes) -> None:
    try:
        obj = protocol.decode(body)
    except ProtocolError:
        return
    assert isinstance(obj, dict)


def test_deeply_nested_json_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(b"[" * 100_000 + b"]" * 100_000)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "op", "id", "spec", "a", "b", "value", "default",
                                        "name", "action", "path", "all_users", "block"]),
                       json_values, max_size=6))
def test_arbitrary_objects_parse_to_a_request_or_one_line_tsd_error(obj: dict[str, Any]) -> None:
    try:
        req = protocol.parse_request(obj)
    except TsdError as exc:
        assert "\n" not in str(exc)
        return
    assert type(req) in protocol.OPS.values()


@given(st.sampled_from(sorted(protocol.OPS)), json_values)
def test_every_op_with_garbage_fields_fails_cleanly(op: str, junk: Any) -> None:
    obj = {"v": protocol.PROTOCOL_VERSION, "op": op, "id": junk, "spec": junk, "a": junk,
           "b": junk, "value": junk, "name": junk, "path": junk}
    try:
        protocol.parse_request(obj)
    except TsdError as exc:
        assert "\n" not in str(exc)


def test_version_mismatch_names_both_versions() -> None:
    with pytest.raises(VersionMismatch, match=r"client speaks 7, daemon speaks 1"):
        protocol.parse_request({"v": 7, "op": "list"})


@pytest.mark.parametrize(
    "value", [True, "3", 3.0, -1, 2**60, [1]],
)
def test_ids_must_be_plain_non_negative_integers(value: Any) -> None:
    with pytest.raises(BadRequest):
        protocol.parse_request({"v": 1, "op": "remove", "id": value})


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"command": [], "cwd": "/"}, "no command"),
        ({"command": ["  "], "cwd": "/"}, "empty"),
        ({"command": ["a"], "cwd": "relative"}, "absolute"),
        ({"command": ["a"], "cwd": "/", "env": [["A=B", "x"]]}, "env"),
        ({"command": ["a"], "cwd": "/", "output_name": "a/b"}, "-O"),
        ({"command": ["a"], "cwd": "/", "gpu_indices": [1, 1]}, "repeated"),
        ({"command": ["a"], "cwd": "/", "gpu_indices": []}, "empty"),
        ({"command": ["a"], "cwd": "/", "timeout": 0}, "positive"),
        ({"command": ["a"], "cwd": "/", "slots": 0}, "out of range"),
        ({"command": ["a\x00b"], "cwd": "/"}, "NUL"),
        ({"command": ["a"] * 2 + ["x" * 140_000], "cwd": "/"}, "longer than"),
    ],
)
def test_bad_specs_name_what_is_wrong(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        protocol.parse_spec(spec)


@pytest.mark.parametrize(
    "env, message",
    [
        ("A=1", "pairs"),
        (["AB"], "pairs"),  # a string of two characters is no pair
        ([["A", "1", "2"]], "pairs"),
        ([["A", 1]], "pairs"),
        ([[None, "1"]], "pairs"),
        ([["", "1"]], "pairs"),
        ([["GOOD", "1"], ["A=B", "1"]], "pairs"),
        ([["GOOD", "1"], ["BAD", "a\x00b"]], "NUL"),
        ([["BAD\x00", "1"]], "NUL"),
        ([["GOOD", "1"], ["BAD", "\ud800"]], "UTF-8"),
        ([["A", "\ud83d"], ["B", "\ude00"]], "UTF-8"),  # halves of a pair, apart
    ],
)
def test_a_bad_environment_anywhere_in_it_is_refused(env: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=f"spec.env: .*{message}"):
        protocol.parse_spec({"command": ["a"], "cwd": "/", "env": env})


def test_the_environment_keeps_its_order_and_repeats() -> None:
    env = [["B", "2"], ["A", "1"], ["B", "3"], ["C", ""]]
    spec = protocol.parse_spec({"command": ["a"], "cwd": "/", "env": env})
    assert spec.env == (("B", "2"), ("A", "1"), ("B", "3"), ("C", ""))


@given(specs)
def test_specs_round_trip_through_the_wire(spec: JobSpec) -> None:
    wire = json.loads(json.dumps(protocol.spec_to_wire(spec)))
    assert protocol.parse_spec(wire) == spec


@given(specs, st.booleans(), st.booleans())
def test_submit_requests_round_trip(spec: JobSpec, depend_last: bool, block: bool) -> None:
    req = protocol.Submit(spec=spec, depend_last=depend_last, block=block)
    wire = json.loads(protocol.encode(protocol.request_to_wire(req))[4:])
    assert protocol.parse_request(wire) == req


def test_pinned_gpus_set_the_gpu_count() -> None:
    spec = protocol.parse_spec({"command": ["a"], "cwd": "/", "gpus": 1, "gpu_indices": [0, 2]})
    assert spec.gpus == 2 and spec.gpus_wanted == 2


@given(specs, st.sampled_from(list(JobState)))
def test_job_records_round_trip_without_their_environment(spec: JobSpec, state: JobState) -> None:
    job = Job(
        id=7, uid=1000, user="alice", spec=spec, state=state, order=3, enqueue_time=1.5,
        start_time=2.0, end_time=3.0, exit=ExitInfo(code=1, cpu_seconds=0.5), pid=42,
        gpu_ids=(0, 1), gpu_uuids=("GPU-a", "GPU-b"), output_path="/tmp/x", unit="u.scope",
        wait_reason="because",
    )
    back = protocol.job_from_wire(json.loads(json.dumps(protocol.job_to_wire(job))))
    assert back.spec.env == ()
    assert back == replace(job, spec=replace(spec, env=()))
