"""The daemon's start (tsd.jobrows, JobTable.load): the same records and indexes, faster.

The store's `load_all`, which decodes with tsd.twin's builders
(tests/unit/test_twin.py) and shares repeated spec texts, must give back every
job as it was saved, whatever its spec and state; the table's queue indexes,
built for all loaded jobs at once, must be what their definitions say.
"""

from __future__ import annotations

import gc
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unit.daemon_fakes import Events, FakeStore

from tsd.jobrows import gc_paused_then_frozen
from tsd.jobtable import JobTable
from tsd.model import DependMode, ExitInfo, Job, JobSpec, JobState
from tsd.store import Store

words = st.text(max_size=8)
maybe_int = st.none() | st.integers(-(2**40), 2**40)
maybe_float = st.none() | st.floats(allow_nan=False, allow_infinity=False)

specs = st.builds(
    JobSpec,
    command=st.lists(words, max_size=4).map(tuple),
    cwd=st.sampled_from(["/tmp", "/home/alice", "/srv/ü"]) | words,
    env=st.just(()),  # the store keeps it apart: load_all leaves it out
    umask=st.integers(0, 0o777),
    label=st.none() | words,
    slots=st.integers(1, 64),
    gpus=st.integers(0, 8),
    gpu_indices=st.none() | st.lists(st.integers(0, 7), max_size=3).map(tuple),
    depends=st.lists(st.integers(1, 10**6), max_size=3).map(tuple),
    depend_mode=st.sampled_from(list(DependMode)),
    store_output=st.booleans(),
    gzip=st.booleans(),
    stderr_apart=st.booleans(),
    output_name=st.none() | words,
    mail=st.booleans(),
    timeout=maybe_float,
    env_info=st.none() | words,
    forget=st.booleans(),
    begin=maybe_float,
    priority=st.integers(-100, 100),
    retry=st.integers(0, 5),
    array_job=maybe_int,
    array_task=maybe_int,
    array_throttle=maybe_int,
    gpu_mem=maybe_int,
)
exits = st.none() | st.builds(
    ExitInfo, code=maybe_int, signal=maybe_int, timed_out=st.booleans(), lost=st.booleans(),
    cpu_seconds=maybe_float, max_rss=maybe_int, note=words,
)  # fmt: skip


@st.composite
def saved_jobs(draw: st.DrawFn) -> tuple[JobSpec, Job]:
    """A spec to add, and the record it is then saved as (id filled in by the test)."""
    spec = draw(specs)
    job = Job(
        id=0, uid=draw(st.sampled_from([0, 1000, 1001])),
        user=draw(st.sampled_from(["root", "alice", "bob"])), spec=spec,
        state=draw(st.sampled_from(list(JobState))), order=draw(st.integers(0, 10**9)),
        enqueue_time=draw(st.sampled_from([1.0, 1.5]) | st.floats(0, 2e9)),
        start_time=draw(maybe_float), end_time=draw(maybe_float), exit=draw(exits),
        pid=draw(maybe_int), supervisor_pid=draw(maybe_int),
        supervisor_start=draw(maybe_int),
        gpu_ids=tuple(draw(st.lists(st.integers(0, 7), max_size=3))),
        gpu_uuids=tuple(draw(st.lists(words, max_size=3))),
        output_path=draw(st.none() | words), unit=draw(st.none() | words),
        attempts=draw(st.integers(0, 9)),
    )  # fmt: skip
    return spec, job


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(saved_jobs(), min_size=1, max_size=6), st.integers(0, 3))
def test_load_all_gives_back_every_saved_job(
    pairs: list[tuple[JobSpec, Job]], repeats: int
) -> None:
    # Repeats of the first spec with other commands share its text after the command:
    # the loader decodes that text once and builds each spec from the cached fields.
    first_spec, first_job = pairs[0]
    pairs += [
        (replace(first_spec, command=("echo", str(i))),
         replace(first_job, spec=replace(first_spec, command=("echo", str(i)))))
        for i in range(repeats)
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state.db", durable=False)
        try:
            saved = []
            for spec, job in pairs:
                added = store.add_jobs(job.uid, job.user, [(spec, job.order)], job.enqueue_time)
                saved.append(replace(job, id=added[0].id))
            store.save(*saved)
            loaded = store.load_all()
        finally:
            store.close()
    assert loaded == saved
    assert [type(j.spec) for j in loaded] == [JobSpec] * len(saved)


def test_collection_is_paused_in_the_block_then_what_lives_is_frozen_out_of_it() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        with gc_paused_then_frozen():
            assert not gc.isenabled()
            made = [[i] for i in range(100)]
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(made)  # left out of later collections
        with pytest.raises(RuntimeError), gc_paused_then_frozen():
            raise RuntimeError("the load failed")
        assert gc.isenabled()
        gc.disable()
        with gc_paused_then_frozen():
            pass
        assert not gc.isenabled()  # a caller's own pause is not ended by the load's
    finally:
        gc.enable()
        gc.unfreeze()  # the rest of the test session collects as usual


@given(specs, st.lists(st.tuples(words, words), max_size=4), st.text(st.characters(codec=None)))
def test_stored_bytes_are_the_utf8_bytes_of_every_text_the_user_gave(
    spec: JobSpec, env: list[tuple[str, str]], odd: str
) -> None:
    # `odd` may hold lone surrogates (undecodable bytes of a command line, escaped).
    spec = replace(spec, env=tuple(env), command=(*spec.command, odd))
    texts = [*spec.command, spec.cwd, *(t for kv in spec.env for t in kv)]
    texts += [t for t in (spec.label, spec.env_info, spec.output_name) if t is not None]
    assert spec.stored_bytes == sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


@st.composite
def stored_tables(draw: st.DrawFn) -> list[Job]:
    """Jobs 1..n as a store may hold them: any states, orders (-u/-U, priorities move
    them), dependencies on jobs before, after, or no longer there."""
    n = draw(st.integers(1, 25))
    orders = draw(st.lists(st.integers(-50, 50), min_size=n, max_size=n, unique=True))
    return [
        Job(
            id=i, uid=draw(st.sampled_from([1000, 1001])), user="u",
            spec=JobSpec(
                command=("true",), cwd="/", env=(),
                depends=tuple(draw(st.lists(st.integers(1, n + 2), max_size=2, unique=True))),
                priority=draw(st.integers(-1, 1)), gpus=draw(st.integers(0, 1)),
            ),
            state=draw(st.sampled_from(list(JobState))), order=orders[i - 1], enqueue_time=1.0,
        )
        for i in range(1, n + 1)
    ]  # fmt: skip


@given(stored_tables())
def test_a_loaded_queue_is_indexed_as_its_definitions_say(stored: list[Job]) -> None:
    table = JobTable(FakeStore(stored), Events(), lambda: 1000)  # type: ignore[arg-type]
    table.load()
    jobs = {j.id: j for j in stored}
    pending = sorted((j for j in stored if j.state.pending), key=lambda j: (j.order, j.id))
    blocked = {
        j.id for j in pending
        if any(d in jobs and not jobs[d].state.done for d in j.spec.depends)
    }  # fmt: skip
    assert table.pending == [j.id for j in pending]
    assert table.dep_blocked == blocked
    assert table.offered == [j.id for j in pending if j.id not in blocked]
    assert table.pending_count == Counter(j.uid for j in pending)
    assert table.pending_prios == {
        uid: Counter(j.spec.priority for j in pending if j.uid == uid)
        for uid in {j.uid for j in pending}
    }
    assert table.pending_gpu_jobs == sum(1 for j in pending if j.spec.gpus)
    dependents: dict[int, set[int]] = {}
    for j in pending:
        for d in j.spec.depends:
            dependents.setdefault(d, set()).add(j.id)
    assert table.dependents == dependents
