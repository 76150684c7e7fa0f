"""ts reads the daemon's records through light views (tsd.jobview), not the job model.

What it prints from a view must be exactly what it printed from the Job the
view stands for: the listing's rows, a job's full record and an older daemon's
records all render byte for byte as the Job does. A reply that is not shaped
like a record is one line, never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tsd import cli_output, codec, framing, protocol, render
from tsd.errors import ProtocolError
from tsd.jobview import JobView, view_of, views_of_pieces, views_of_records, views_of_rows
from tsd.model import HIDDEN, DependMode, ExitInfo, Job, JobSpec, JobState, UnmanagedUse

T0 = 1_700_000_000.0
words = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)
maybe_int = st.none() | st.integers(0, 5000)


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    """Any job the daemon may list: every state, exit, GPU use and odd text."""
    state = draw(st.sampled_from(list(JobState)))
    started = state in (JobState.RUNNING, JobState.FINISHED) or draw(st.booleans())
    ended = state.done
    gpu_indices = draw(st.none() | st.lists(st.integers(0, 7), min_size=1, max_size=3))
    spec = JobSpec(
        command=tuple(draw(st.lists(words, min_size=1, max_size=4))),
        cwd=draw(st.sampled_from(["/home/alice", HIDDEN])),
        env=(),
        label=draw(st.none() | words),
        slots=draw(st.integers(1, 4)),
        gpus=len(gpu_indices) if gpu_indices else draw(st.integers(0, 3)),
        gpu_indices=None if gpu_indices is None else tuple(gpu_indices),
        depends=tuple(draw(st.lists(st.integers(1, 99), max_size=3))),
        depend_mode=draw(st.sampled_from(list(DependMode))),
        store_output=draw(st.booleans()),
        stderr_apart=draw(st.booleans()),
        timeout=draw(st.none() | st.floats(1, 1e5)),
        env_info=draw(st.none() | words),
        begin=draw(st.none() | st.floats(T0, T0 + 1e6)),
        priority=draw(st.integers(-100, 100)),
        retry=draw(st.integers(0, 3)),
        array_job=draw(maybe_int),
        array_task=draw(maybe_int),
        array_throttle=draw(maybe_int),
        gpu_mem=draw(st.none() | st.integers(1, 80000)),
    )
    exit_info = None
    if state is JobState.FINISHED:
        signal = draw(st.none() | st.integers(1, 15))
        exit_info = ExitInfo(
            code=None if signal else draw(st.integers(0, 255)),
            signal=signal,
            timed_out=draw(st.booleans()),
            lost=draw(st.booleans()),
            cpu_seconds=draw(st.none() | st.floats(0, 1e4)),
            max_rss=draw(maybe_int),
            note=draw(words),
        )
    return Job(
        id=draw(st.integers(1, 10**7)),
        uid=1000,
        user=draw(st.sampled_from(["alice", "bob\x1b[2J"])),
        spec=spec,
        state=state,
        order=draw(st.integers(0, 100)),
        enqueue_time=T0,
        start_time=T0 + 1 if started else None,
        end_time=T0 + 5 if ended and started else None,
        exit=exit_info,
        pid=draw(maybe_int),
        gpu_ids=tuple(draw(st.lists(st.integers(0, 7), max_size=3))),
        output_path=draw(st.none() | st.just("/tmp/ts-out.1.aB3dEf")),
        unit=draw(st.none() | st.just("tsd-job-1.scope")),
        wait_reason=draw(words),
        gpu_idle_since=draw(st.none() | st.just(T0 + 2)),
        notice=draw(words),
        attempts=draw(st.integers(0, 3)),
        slurm_id=draw(maybe_int),
        slurm_task=draw(maybe_int),
        gpu_mem_peak=draw(maybe_int),
        gpu_mem_now=draw(maybe_int),
        gpu_util_now=draw(st.none() | st.integers(0, 100)),
    )


def wire_trip(obj: object) -> object:
    """What the client gets: the daemon's encoding, decoded."""
    return framing.loads(framing.dumps(obj))


def as_rows(listed: list[Job], size: int) -> list[JobView]:
    """The jobs as a listing in pieces of `size` rows (tsd.codec.piece), as ts reads them."""
    reasons = [j.wait_reason for j in listed]
    pieces = [
        codec.piece(listed[i : i + size], reasons[i : i + size])
        for i in range(0, len(listed), size)
    ]
    return views_of_pieces(wire_trip(pieces or [codec.piece([], [])]))


def as_records(listed: list[Job]) -> list[JobView]:
    return views_of_records(wire_trip([protocol.job_to_wire(j) for j in listed]))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(jobs(), max_size=6), st.booleans(), st.none() | st.integers(40, 200),
    st.integers(1, 4),
)  # fmt: skip
def test_rows_and_records_list_exactly_as_the_jobs_do(
    listed: list[Job], show_user: bool, width: int | None, size: int
) -> None:
    now = T0 + 10
    outside = [UnmanagedUse(pid=77, uid=None, user=None, gpus=(1,), memory_mib=2048)]
    want_text = render.list_text(listed, 4, 1, show_user, now, width, outside)
    want_tab = render.list_tab(listed, show_user, now)
    want_json = render.list_json(listed, now, outside)
    for views in (as_rows(listed, size), as_records(listed)):
        assert render.list_text(views, 4, 1, show_user, now, width, outside) == want_text
        assert render.list_tab(views, show_user, now) == want_tab
        assert render.list_json(views, now, outside) == want_json


@settings(max_examples=150, deadline=None)
@given(jobs())
def test_a_full_record_reads_back_as_the_job_for_info_and_exit_codes(job: Job) -> None:
    view = view_of(wire_trip(protocol.job_to_wire(job)))
    assert render.info_text(view, T0 + 10) == render.info_text(job, T0 + 10)
    assert cli_output.wait_code(view) == (
        job.exit.wait_code if job.state is JobState.FINISHED and job.exit else 255
    )
    assert (view.exit is None) == (job.exit is None)
    if job.exit is not None and view.exit is not None:
        assert (view.exit.success, view.exit.elevel) == (job.exit.success, job.exit.elevel)
    assert (view.spec.command_line, view.spec.gpus_wanted, view.redacted) == (
        job.spec.command_line, job.spec.gpus_wanted, job.redacted
    )
    assert view.state == job.state and str(view.state) == job.state.value


def test_columns_a_client_does_not_know_are_skipped_and_missing_ones_default() -> None:
    (view,) = views_of_rows(["id", "state", "future_column"], [[7, "queued", {"x": 1}]])
    assert (view.id, view.state, view.label, view.store_output, view.exit) == (
        7, "queued", None, True, None
    )


def test_a_piece_sends_what_every_row_shares_once() -> None:
    alike = [Job(
        id=i, uid=1000, user="alice", spec=JobSpec(command=("echo", "x"), cwd="/w", env=()),
        state=JobState.QUEUED, order=i, enqueue_time=T0,
    ) for i in range(1, 4)]  # fmt: skip
    part = codec.piece(alike, ["why"] * 3)
    assert part["columns"] == ["id", "order"]
    assert part["same"]["wait_reason"] == "why" and part["same"]["user"] == "alice"
    assert [v.id for v in views_of_pieces([wire_trip(part)])] == [1, 2, 3]
    # 1, 1.0 and True are equal but print differently: never one value for them.
    mixed = [replace(alike[0], gpu_mem_now=1), replace(alike[1], gpu_mem_now=True)]
    assert "gpu_mem_now" in codec.piece(mixed, ["", ""])["columns"]


@pytest.mark.parametrize(
    "resp",
    [
        {"ok": True, "columns": "id", "rows": []},
        {"ok": True, "columns": ["id"], "rows": [[1]]},  # no state column
        {"ok": True, "columns": ["id", "state"], "rows": [[1]]},
        {"ok": True, "columns": ["id", "state"], "rows": [{"id": 1}]},
        {"ok": True, "columns": ["id", "state", "command"], "rows": [[1, "queued", 5]]},
        {"ok": True, "columns": ["id", "state", "start_time", "end_time"],
         "rows": [[1, "finished", 1.0, "x"]]},
        {"ok": True, "jobs": [1, 2]},
        {"ok": True, "jobs": [{"id": 1, "state": "queued"}]},
        {"ok": True, "jobs": {"id": 1}},
        {"ok": True, "jobs": [], "unmanaged": [{"gpus": [0]}]},
        {"ok": True, "rows": [], "pieces": [{"columns": ["id"], "same": [], "rows": []}]},
        {"ok": True, "rows": [], "pieces": [["id"]]},
        {"ok": True, "rows": [], "pieces": {"columns": ["id", "state"]}},
    ],
)
def test_a_malformed_listing_is_one_protocol_error(resp: dict[str, object]) -> None:
    for fmt in ("default", "json", "tab"):
        with pytest.raises(ProtocolError) as info:
            cli_output.listing_text(resp, fmt, all_users=True, width=None)
        assert "\n" not in info.value.message
        assert info.value.message.startswith("malformed ")


def test_the_light_json_is_the_json_packages_byte_for_byte() -> None:
    obj = {"a": [1, 2.5, float("inf"), None, True, "é\x01\"\\"], "b": {"c": -(2**70)}}
    assert framing.dumps(obj) == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    text = ' \n{"a": [1, 2.5, NaN, "\\u00e9"]} \t'
    assert repr(framing.loads(text)) == repr(json.loads(text))
    for bad in ("", " ", "[1] x", "\ufeff{}", "{", "[1,]", '"\x01"', "{} {}"):
        with pytest.raises(ValueError):
            framing.loads(bad)
        with pytest.raises(ValueError):
            json.loads(bad)
