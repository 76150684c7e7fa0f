"""tsd.metrics: the textfile parses with Prometheus' own parser and says what the state is."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsd.metrics import MetricsState, escape_label, render
from tsd.model import Gpu, Job, JobSpec, JobState

parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client not installed")


def job(job_id: int, user: str, state: JobState, *, slots: int = 1, gpus: tuple[int, ...] = (),
        start: float | None = None) -> Job:
    return Job(
        id=job_id, uid=1000 + job_id, user=user,
        spec=JobSpec(command=("true",), cwd="/", env=(), slots=slots, gpus=len(gpus)),
        state=state, order=job_id, enqueue_time=0.0, start_time=start, gpu_ids=gpus,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def state(**kw: Any) -> MetricsState:
    base: dict[str, Any] = dict(
        jobs=[], slots_total=4, slots_used=0, gpus=None, gpu_pool=None, gpus_allocated=0,
        totals={}, now=1000.0,
    )
    base.update(kw)
    return MetricsState(**base)


def test_jobs_slots_gpus_and_usage_counters_match_the_state() -> None:
    jobs = [
        job(1, "alice", JobState.RUNNING, slots=2, gpus=(0, 1), start=900.0),
        job(2, "alice", JobState.QUEUED),
        job(3, "alice", JobState.QUEUED),
        job(4, "bob", JobState.FINISHED),
    ]
    text = render(state(jobs=jobs, slots_used=2, gpu_pool=4, gpus_allocated=2,
                        totals={"bob": (30.0, 10.0), "alice": (5.0, 0.0)}))
    got = samples(text)
    assert got[("tsd_jobs", (("state", "queued"), ("user", "alice")))] == 2
    assert got[("tsd_jobs", (("state", "running"), ("user", "alice")))] == 1
    assert got[("tsd_jobs", (("state", "finished"), ("user", "bob")))] == 1
    assert got[("tsd_slots", (("kind", "total"),))] == 4
    assert got[("tsd_slots", (("kind", "used"),))] == 2
    assert got[("tsd_gpus", (("kind", "total"),))] == 4
    assert got[("tsd_gpus", (("kind", "allocated"),))] == 2
    # Ended runs from the store plus the running job's 100 s so far, times slots/GPUs.
    assert got[("tsd_user_slot_seconds_total", (("user", "alice"),))] == 5 + 100 * 2
    assert got[("tsd_user_gpu_seconds_total", (("user", "alice"),))] == 100 * 2
    assert got[("tsd_user_slot_seconds_total", (("user", "bob"),))] == 30
    kinds = families(text)
    assert kinds["tsd_user_slot_seconds"].type == "counter"
    assert kinds["tsd_jobs"].type == "gauge"
    assert all(f.documentation for f in kinds.values())


def test_jobs_flagged_for_idle_gpus_are_counted_per_user() -> None:
    from dataclasses import replace

    flagged = replace(job(1, "alice", JobState.RUNNING, gpus=(0,), start=900.0),
                      gpu_idle_since=950.0)
    busy = job(2, "alice", JobState.RUNNING, gpus=(1,), start=900.0)
    got = samples(render(state(jobs=[flagged, busy], gpu_pool=2, gpus_allocated=2)))
    assert got[("tsd_gpu_idle_jobs", (("user", "alice"),))] == 1
    assert ("tsd_gpu_idle_jobs", (("user", "bob"),)) not in got


def test_per_gpu_gauges_omit_what_the_board_does_not_report() -> None:
    gpus = [
        Gpu(0, "GPU-a", "A100", 80 << 30, 1 << 30, utilization=97, memory_utilization=40,
            temperature=61, power_mw=250_500, power_limit_mw=400_000),
        Gpu(1, "GPU-b", "A100", 80 << 30, 0),  # no sensors at all
    ]
    got = samples(render(state(gpus=gpus, gpu_pool=2)))
    g0 = (("gpu", "0"), ("uuid", "GPU-a"))
    assert got[("tsd_gpu_utilization_percent", g0)] == 97
    assert got[("tsd_gpu_memory_utilization_percent", g0)] == 40
    assert got[("tsd_gpu_temperature_celsius", g0)] == 61
    assert got[("tsd_gpu_power_watts", g0)] == 250.5
    assert got[("tsd_gpu_power_limit_watts", g0)] == 400
    assert got[("tsd_gpu_memory_used_bytes", g0)] == 1 << 30
    g1 = (("gpu", "1"), ("uuid", "GPU-b"))
    assert got[("tsd_gpu_memory_total_bytes", g1)] == 80 << 30
    assert ("tsd_gpu_utilization_percent", g1) not in got
    assert ("tsd_gpu_temperature_celsius", g1) not in got


def test_without_a_gpu_picture_there_are_no_gpu_gauges_and_no_gpu_total() -> None:
    text = render(state())
    assert "tsd_gpu_utilization_percent" not in text
    got = samples(text)
    assert ("tsd_gpus", (("kind", "total"),)) not in got
    assert got[("tsd_gpus", (("kind", "allocated"),))] == 0


def test_a_counter_never_shows_less_than_it_showed_before() -> None:
    # The run's recorded end came 0.5 s before the `now` it was last shown with.
    got = samples(render(state(totals={"alice": (99.5, 49.75)},
                               floors={"alice": (100.0, 50.0), "gone": (7.0, 1.0)})))
    assert got[("tsd_user_slot_seconds_total", (("user", "alice"),))] == 100
    assert got[("tsd_user_gpu_seconds_total", (("user", "alice"),))] == 50
    assert got[("tsd_user_slot_seconds_total", (("user", "gone"),))] == 7


def test_label_values_are_escaped_as_the_text_format_wants() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


@given(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20))
def test_any_user_name_round_trips_through_the_real_parser(name: str) -> None:
    text = render(state(jobs=[job(1, name, JobState.QUEUED)], totals={name: (1.5, 0.25)}))
    got = samples(text)
    assert got[("tsd_jobs", (("state", "queued"), ("user", name)))] == 1
    assert got[("tsd_user_slot_seconds_total", (("user", name),))] == 1.5
    assert got[("tsd_user_gpu_seconds_total", (("user", name),))] == 0.25
