"""tsd.idle: when a job's GPUs count as idle, when it is flagged, notified and acted on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tsd.idle import IdleRule, IdleTracker, Verdict, sample_is_idle

KEY = (7, 1000.0)
RULE = IdleRule(after=60.0, threshold=5.0, grace=30.0, action="kill")


Samples = list[tuple[float, list[int | None] | None]]


def run(samples: Samples, rule: IdleRule = RULE) -> list[Verdict]:
    tracker = IdleTracker()
    return [tracker.observe(t, {KEY: utils}, rule)[0] for t, utils in samples]


def test_a_sample_is_idle_only_when_every_gpu_reports_at_or_below_the_threshold() -> None:
    assert sample_is_idle([0, 5], 5.0)
    assert not sample_is_idle([0, 6], 5.0)
    assert not sample_is_idle([0, None], 5.0)  # a GPU it cannot see is never called idle
    assert not sample_is_idle(None, 5.0)  # no picture at all
    assert not sample_is_idle([], 5.0)


def test_flagged_after_idle_after_then_notified_once_then_acted_on_after_the_grace() -> None:
    verdicts = run([(t, [0]) for t in (0, 30, 59, 60, 70, 89, 90, 120)])
    flagged = [v.idle_since for v in verdicts]
    assert flagged == [None, None, None, 0, 0, 0, 0, 0]
    assert [v.notify for v in verdicts] == [False, False, False, True, False, False, False, False]
    assert [v.act for v in verdicts] == [False] * 6 + [True, False]


def test_a_busy_sample_resets_the_idle_time_and_the_flag() -> None:
    samples: list[tuple[float, list[int | None] | None]] = [(0, [0]), (50, [0]), (55, [80])]
    samples += [(t, [0]) for t in (60, 100, 119, 120)]
    verdicts = run(samples)
    assert [v.idle_since for v in verdicts] == [None, None, None, None, None, None, 60]


def test_no_action_configured_flags_and_notifies_but_never_acts() -> None:
    rule = IdleRule(after=10.0, threshold=5.0, grace=1.0, action="none")
    verdicts = run([(t, [1, 2]) for t in range(0, 100, 5)], rule)
    assert any(v.idle_since is not None for v in verdicts)
    assert sum(v.notify for v in verdicts) == 1
    assert not any(v.act for v in verdicts)


def test_the_user_is_notified_once_per_run_even_when_it_is_flagged_again() -> None:
    samples: list[tuple[float, list[int | None] | None]] = [(0, [0]), (60, [0]), (61, [90])]
    samples += [(62, [0]), (200, [0])]
    assert [v.notify for v in run(samples)] == [False, True, False, False, False]


def test_a_new_run_of_the_same_job_starts_afresh_and_gone_runs_are_forgotten() -> None:
    tracker = IdleTracker()
    tracker.observe(0, {KEY: [0]}, RULE)
    assert tracker.observe(60, {KEY: [0]}, RULE)[0].notify
    again = (KEY[0], 5000.0)  # requeued and started again: another start time
    assert tracker.observe(61, {again: [0]}, RULE)[0].idle_since is None
    assert tracker.observe(121, {again: [0]}, RULE)[0].notify  # its own first flag


utilisation = st.one_of(st.none(), st.integers(0, 100))
rounds = st.lists(
    st.tuples(st.floats(0.01, 50.0), st.one_of(st.none(), st.lists(utilisation, max_size=3))),
    max_size=60,
)


@settings(max_examples=300)
@given(rounds, st.floats(1.0, 200.0), st.floats(0.0, 100.0), st.floats(0.0, 100.0),
       st.sampled_from(["none", "kill", "requeue"]))
def test_never_flagged_before_idle_after_of_continuous_idleness_and_acted_on_at_most_once(
    steps: list[tuple[float, list[int | None] | None]], after: float, threshold: float,
    grace: float, action: str,
) -> None:
    rule = IdleRule(after=after, threshold=threshold, grace=grace, action=action)
    tracker = IdleTracker()
    now = 0.0
    idle_from: float | None = None  # the naive model: when the current idle stretch began
    notified = acted = 0
    for gap, utils in steps:
        now += gap
        verdict = tracker.observe(now, {KEY: utils}, rule)[0]
        idle = bool(utils) and all(u is not None and u <= threshold for u in utils or ())
        if not idle:
            idle_from = None
            assert verdict.idle_since is None  # any sample that is not idle resets
        else:
            idle_from = now if idle_from is None else idle_from
            expect_flag = now - idle_from >= after
            assert (verdict.idle_since is not None) == expect_flag
            if expect_flag:
                assert verdict.idle_since == idle_from
        if verdict.act:
            assert action != "none" and verdict.idle_since is not None
            assert now - verdict.idle_since >= after + grace
        notified += verdict.notify
        acted += verdict.act
    assert notified <= 1 and acted <= 1
