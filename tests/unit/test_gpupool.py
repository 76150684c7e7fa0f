"""The pure rules that decide which GPUs a job may get (tsd.gpupool)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsd.gpupool import busy_reasons, free_gpus, parse_indices
from tsd.model import Gpu, GpuProcess

GIB = 1 << 30
PIDS = st.integers(min_value=1, max_value=40)


@st.composite
def gpu_lists(draw: st.DrawFn) -> list[Gpu]:
    """0-8 GPUs, indices 0..n-1, any memory use, a few processes from a small pid pool."""
    count = draw(st.integers(min_value=0, max_value=8))
    gpus = []
    for index in range(count):
        total = draw(st.integers(min_value=1, max_value=100 * GIB))
        used = draw(st.integers(min_value=0, max_value=total))
        procs = draw(
            st.lists(
                st.builds(
                    GpuProcess,
                    pid=PIDS,
                    used_memory=st.none() | st.integers(min_value=0, max_value=total),
                    user=st.none() | st.sampled_from(["alice", "bob"]),
                ),
                max_size=3,
                unique_by=lambda p: p.pid,
            )
        )
        gpus.append(Gpu(index, f"GPU-{index}", "NVIDIA A100", total, used, tuple(procs)))
    return gpus


INDEX_SETS = st.sets(st.integers(min_value=0, max_value=9))
THRESHOLDS = st.floats(min_value=0, max_value=100)


def gpu(index: int, used_percent: float = 0, *procs: GpuProcess) -> Gpu:
    total = 100 * GIB
    return Gpu(index, f"GPU-{index}", "NVIDIA A100", total, int(total * used_percent / 100), procs)


# -- parse_indices -------------------------------------------------------------


@given(
    st.lists(st.integers(min_value=0, max_value=10**6), unique=True),
    st.sampled_from([",", ", ", " , "]),
)
def test_parse_indices_round_trips_a_written_list_in_order(
    indices: list[int], separator: str
) -> None:
    assert parse_indices(separator.join(map(str, indices))) == tuple(indices)


@pytest.mark.parametrize("text", ["", "   "])
def test_parse_indices_of_nothing_is_empty(text: str) -> None:
    assert parse_indices(text) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1", "bad GPU list '-1': '-1' is not a GPU index (want e.g. 0,2)"),
        ("0,a", "bad GPU list '0,a': 'a' is not a GPU index (want e.g. 0,2)"),
        ("0,,2", "bad GPU list '0,,2': an empty item is not a GPU index (want e.g. 0,2)"),
        ("0,", "bad GPU list '0,': an empty item is not a GPU index (want e.g. 0,2)"),
        ("1.5", "bad GPU list '1.5': '1.5' is not a GPU index (want e.g. 0,2)"),
        ("0 1", "bad GPU list '0 1': '0 1' is not a GPU index (want e.g. 0,2)"),
        ("+1", "bad GPU list '+1': '+1' is not a GPU index (want e.g. 0,2)"),
        ("1,0,1", "bad GPU list '1,0,1': GPU 1 is listed twice"),
    ],
)
def test_parse_indices_rejects_garbage_with_a_message_naming_the_item(
    text: str, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        parse_indices(text)
    assert str(raised.value) == message


# -- free_gpus: properties -----------------------------------------------------


@given(gpu_lists(), INDEX_SETS, THRESHOLDS, st.none() | INDEX_SETS, st.sets(PIDS))
def test_free_gpus_are_visible_unheld_ascending_and_exist(
    gpus: list[Gpu], held: set[int], threshold: float, visible: set[int] | None, tsd: set[int]
) -> None:
    free = free_gpus(gpus, held, threshold, visible, tsd)
    assert list(free) == sorted(set(free))
    assert set(free) <= {g.index for g in gpus}
    assert not set(free) & held
    if visible is not None:
        assert set(free) <= visible


@given(gpu_lists(), INDEX_SETS, THRESHOLDS, THRESHOLDS, st.sets(PIDS))
def test_a_higher_memory_threshold_never_frees_more_gpus(
    gpus: list[Gpu], held: set[int], a: float, b: float, tsd: set[int]
) -> None:
    low, high = min(a, b), max(a, b)
    assert set(free_gpus(gpus, held, high, None, tsd)) <= set(free_gpus(gpus, held, low, None, tsd))


@given(gpu_lists(), INDEX_SETS, THRESHOLDS, st.sets(PIDS))
def test_free_gpus_never_include_one_with_a_process_outside_tsd(
    gpus: list[Gpu], held: set[int], threshold: float, tsd: set[int]
) -> None:
    free = set(free_gpus(gpus, held, threshold, None, tsd))
    for g in gpus:
        if any(p.pid not in tsd for p in g.processes):
            assert g.index not in free


@given(gpu_lists(), THRESHOLDS)
def test_with_no_holds_or_processes_only_memory_decides(gpus: list[Gpu], threshold: float) -> None:
    bare = [Gpu(g.index, g.uuid, g.name, g.memory_total, g.memory_used) for g in gpus]
    assert free_gpus(bare, (), threshold, None) == tuple(
        g.index for g in bare if g.free_percent >= threshold
    )


@given(
    gpu_lists(),
    st.dictionaries(st.integers(0, 9), st.integers(1, 10**6)),
    THRESHOLDS,
    st.none() | INDEX_SETS,
    st.sets(PIDS),
)
def test_busy_reasons_cover_exactly_the_gpus_that_are_not_free(
    gpus: list[Gpu],
    held: dict[int, int],
    threshold: float,
    visible: set[int] | None,
    tsd: set[int],
) -> None:
    free = free_gpus(gpus, held.keys(), threshold, visible, tsd)
    reasons = busy_reasons(gpus, held, threshold, tsd, visible=visible)
    assert set(reasons) | set(free) == {g.index for g in gpus}
    assert not set(reasons) & set(free)
    assert all(line and "\n" not in line for line in reasons.values())


# -- free_gpus and busy_reasons: cases ------------------------------------------


def test_gpu_with_only_tsd_processes_is_judged_by_memory_alone() -> None:
    gpus = [gpu(0, 5, GpuProcess(100, 5 * GIB, "alice")), gpu(1, 50, GpuProcess(101, None))]
    assert free_gpus(gpus, (), 90, None, tsd_pids={100, 101}) == (0,)
    assert free_gpus(gpus, (), 40, None, tsd_pids={100, 101}) == (0, 1)


def test_gpu_with_a_light_process_outside_tsd_is_busy_despite_free_memory() -> None:
    gpus = [gpu(0, 1, GpuProcess(4242, 1 * GIB, "bob")), gpu(1)]
    assert free_gpus(gpus, (), 90, None, tsd_pids=()) == (1,)


def test_held_and_invisible_gpus_are_not_free() -> None:
    gpus = [gpu(i) for i in range(4)]
    assert free_gpus(gpus, {1}, 90, visible={0, 1, 3}) == (0, 3)
    assert free_gpus(gpus, {1}, 90, visible=None) == (0, 2, 3)


def test_free_memory_exactly_at_the_threshold_counts_as_free() -> None:
    assert free_gpus([gpu(0, 10)], (), 90, None) == (0,)
    assert free_gpus([gpu(0, 10.5)], (), 90, None) == ()


def test_busy_reasons_name_the_job_the_process_and_the_memory() -> None:
    gpus = [
        gpu(0, 0),
        gpu(1, 0),
        gpu(2, 3.1, GpuProcess(4242, int(3.1 * GIB), "bob")),
        gpu(3, 95),
        gpu(4, 10.4),
        gpu(5, 0, GpuProcess(7, 512 << 20), GpuProcess(8, None, "carol"), GpuProcess(9, 1)),
        gpu(6, 0, GpuProcess(10, None)),
    ]
    assert busy_reasons(gpus, {1: 12}, 90, tsd_pids=(), visible={1, 2, 3, 4, 5, 6}) == {
        0: "not visible to tsd (gpus.visible)",
        1: "held by tsd job 12",
        2: "used by pid 4242 (bob), 3.1 GiB",
        3: "only 5% memory free (threshold 90%)",
        4: "only 89% memory free (threshold 90%)",
        5: "used by pid 7, 512 MiB, and 2 other processes",
        6: "used by pid 10",
    }


def test_busy_reasons_show_a_fractional_threshold_as_written() -> None:
    assert busy_reasons([gpu(0, 20)], {}, 87.5) == {0: "only 80% memory free (threshold 87.5%)"}
