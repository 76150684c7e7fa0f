"""Records built and copied through a twin class (tsd.twin).

`record_builder`'s and `record_maker`'s functions fill a record's slots directly
instead of going through a frozen dataclass's `__init__`, and `record_copier`'s
copy a record the same way instead of `dataclasses.replace`: what they make must
be the record the class makes (equal, hashed, shown and frozen alike), and a
copy must leave its original as it was. tsd.model.replace copies every Job so;
every launch plan is made so (tsd.launch.make_plan).
"""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from unit.test_jobrows import saved_jobs, specs

from tsd.launch import LaunchPlan
from tsd.model import ExitInfo, Job, JobSpec, JobState, replace
from tsd.twin import record_builder, record_copier, record_maker

JOB_FIELDS = [f.name for f in fields(Job)]


@given(specs)
def test_a_built_spec_is_the_spec_the_class_builds(spec: JobSpec) -> None:
    build = record_builder(JobSpec, [f.name for f in fields(JobSpec)])
    built = build(*(getattr(spec, f.name) for f in fields(JobSpec)))
    assert type(built) is JobSpec
    assert built == spec and hash(built) == hash(spec) and repr(built) == repr(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.cwd = "/"  # type: ignore[misc]


@given(saved_jobs())
def test_a_built_job_takes_the_defaults_of_the_fields_not_given(pair: tuple[JobSpec, Job]) -> None:
    _, job = pair
    names = ["spec", "id", "state", "user", "uid", "order", "enqueue_time", "exit"]
    built = record_builder(Job, names)(*(getattr(job, n) for n in names))
    assert built == Job(**{n: getattr(job, n) for n in names})
    assert built.wait_reason == "" and built.gpu_ids == () and built.slurm_id is None


def test_a_builder_refuses_what_it_cannot_build_as_the_class_would() -> None:
    @dataclasses.dataclass(frozen=True)
    class Unslotted:
        a: int

    with pytest.raises(TypeError):
        record_builder(Unslotted, ["a"])
    with pytest.raises(ValueError):
        record_builder(Job, ["id", "no_such_field"])
    with pytest.raises(ValueError):
        record_builder(Job, ["id", "id"])
    with pytest.raises(ValueError):  # `user` has no default
        record_builder(Job, ["id", "uid", "spec", "state", "order", "enqueue_time"])


@given(saved_jobs(), saved_jobs(), st.sets(st.sampled_from(JOB_FIELDS)))
def test_a_copied_job_is_the_record_replace_makes_and_the_original_stays(
    pair: tuple[JobSpec, Job], other: tuple[JobSpec, Job], changed: set[str]
) -> None:
    _, job = pair
    changes: dict[str, Any] = {name: getattr(other[1], name) for name in changed}
    before = repr(job)
    copy = record_copier(Job)(job, changes)
    expected = dataclasses.replace(job, **changes)
    assert type(copy) is Job and copy is not job
    assert copy == expected and hash(copy) == hash(expected) and repr(copy) == repr(expected)
    assert repr(job) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        copy.pid = 1  # type: ignore[misc]
    # The model's replace is that copier for a Job, dataclasses.replace for the rest.
    assert replace(job, **changes) == expected
    exit_info = ExitInfo(code=3, note="x")
    assert replace(exit_info, code=4) == ExitInfo(code=4, note="x")


def test_a_copy_refuses_a_name_that_is_no_field_and_makes_nothing() -> None:
    job = Job(id=1, uid=0, user="root", spec=JobSpec(command=("true",), cwd="/", env=()),
              state=JobState.QUEUED, order=1, enqueue_time=1.0)  # fmt: skip
    copier = record_copier(Job)
    for bad in ("no_such_field", "__dict__", "redacted"):
        with pytest.raises(TypeError, match=f"Job has no field '{bad}'"):
            copier(job, {"pid": 5, bad: 1})
    with pytest.raises(TypeError, match="no field 'nope'"):
        replace(job, nope=1)  # type: ignore[call-arg]
    assert job.pid is None


def test_a_copier_refuses_a_class_it_cannot_copy_as_replace_would() -> None:
    @dataclasses.dataclass(frozen=True)
    class Unslotted:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("negative")

    for cls in (Unslotted, Checked):
        with pytest.raises(TypeError, match="not a slotted dataclass without __post_init__"):
            record_copier(cls)


plans = st.builds(
    dict, job_id=st.integers(1, 10**6), uid=st.integers(0, 2**31), gid=st.integers(0, 2**31),
    user=st.text(max_size=8), command=st.lists(st.text(max_size=8), max_size=3).map(tuple),
    cwd=st.text(max_size=8), env=st.dictionaries(st.text(max_size=4), st.text(max_size=4)),
    umask=st.integers(0, 0o777), log_dir=st.just("/tmp"), exits_dir=st.just("/x"),
)
optional_plan_fields = st.fixed_dictionaries({}, optional={
    "store_output": st.booleans(), "output_name": st.none() | st.text(max_size=8),
    "timeout": st.none() | st.floats(0, 1e6), "groups": st.none() | st.just((1, 2)),
    "reuse": st.booleans(), "ack_on_go": st.booleans(), "ahead_until": st.none() | st.floats(0, 9),
})  # fmt: skip


@given(plans, optional_plan_fields)
def test_a_made_plan_is_the_plan_the_class_makes_by_name_or_in_order(
    required: dict[str, Any], optional: dict[str, Any]
) -> None:
    make = record_maker(LaunchPlan)
    expected = LaunchPlan(**required, **optional)
    made = make(**required, **optional)
    assert type(made) is LaunchPlan
    assert made == expected and repr(made) == repr(expected)
    in_order = make(*(getattr(expected, f.name) for f in fields(LaunchPlan)))
    assert in_order == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.uid = 0  # type: ignore[misc]


def test_a_maker_refuses_what_the_class_refuses() -> None:
    make = record_maker(LaunchPlan)
    with pytest.raises(TypeError):
        make(job_id=1)  # the other fields without a default are missing
    with pytest.raises(TypeError):
        make(1, 0, 0, "u", (), "/", {}, 0, "/tmp", "/x", no_such_field=1)

    @dataclasses.dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="default factory"):
        record_maker(Factory)
