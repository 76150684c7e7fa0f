"""Golden layout checks for what `ts` prints, against task-spooler's formats."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from tsd import render
from tsd.model import OPTION_NAMES, DependMode, ExitInfo, Job, JobSpec, JobState

T0 = 1_700_000_000.0
HEADER = "ID   State      Output               E-Level  Time   GPUs  Command [run=1/4]"


def make_job(
    ident: int,
    state: JobState,
    command: tuple[str, ...] = ("sleep", "1"),
    **kw: object,
) -> Job:
    """A job record as the daemon would report it, with sensible times for its state."""
    spec_kw = {
        k: kw.pop(k) for k in list(kw) if k in JobSpec.__dataclass_fields__ or k in OPTION_NAMES
    }
    spec = JobSpec(command=command, cwd="/home/alice", env=(), **spec_kw)  # type: ignore[arg-type]
    base: dict[str, object] = {"enqueue_time": T0}
    if state in (JobState.RUNNING, JobState.FINISHED):
        base["start_time"] = T0 + 1
        base["output_path"] = f"/tmp/ts-out.{ident}.aB3dEf"
        base["pid"] = 4242
    if state is JobState.FINISHED:
        base["end_time"] = T0 + 1.5
        base["exit"] = ExitInfo(code=0, cpu_seconds=0.25, max_rss=3 * 2**20)
    if state is JobState.SKIPPED:
        base["end_time"] = T0 + 2
    base.update(kw)
    return Job(
        id=ident, uid=1000, user="alice", spec=spec, state=state, order=ident, **base  # type: ignore[arg-type]
    )


def columns_of(header: str) -> list[int]:
    """Start offsets of the header's column names."""
    return [m.start() for m in re.finditer(r"\S+", header)][:5]


def test_list_header_is_gpu_task_spoolers_exactly() -> None:
    text = render.list_text([], slots=4, running=1)
    assert text == HEADER + "\n"


def test_list_rows_line_up_under_the_header() -> None:
    jobs = [
        make_job(1, JobState.FINISHED),
        make_job(2, JobState.RUNNING),
        make_job(3, JobState.QUEUED, label="train"),
    ]
    lines = render.list_text(jobs, slots=4, running=1, now=T0 + 3).splitlines()
    starts = columns_of(lines[0])
    finished = lines[3]
    assert finished[0] != " "
    for start in starts[1:3]:
        assert finished[start] != " ", (start, finished)
        assert finished[start - 1] == " "
    # E-Level under E-Level, the time right-aligned in the 6-wide Time column.
    assert finished[starts[3]] == "0"
    assert finished[starts[4] : starts[4] + 7] == " 0.50s "
    assert lines[1][starts[4] : starts[4] + 6] == " 2.00s"


def test_finished_row_matches_task_spooler_format() -> None:
    job = make_job(7, JobState.FINISHED, command=("echo", "hi"), output_path="/tmp/ts-out.Lx7H9a")
    row = render.list_text([job], slots=1, running=0).splitlines()[1]
    assert row == "7    finished   /tmp/ts-out.Lx7H9a   0         0.50s -     echo hi"


def test_queued_row_shows_file_placeholder_and_label_before_command() -> None:
    job = make_job(3, JobState.QUEUED, command=("python", "train.py"), label="exp1")
    row = render.list_text([job], slots=1, running=0).splitlines()[1]
    assert row == "3    queued     (file)                               -     [exp1]python train.py"


def test_dependencies_prefix_the_command() -> None:
    running = make_job(5, JobState.RUNNING, depends=(3, 4), label="x")
    queued = make_job(6, JobState.QUEUED, depend_mode=DependMode.SUCCESS, depends=(5,))
    lines = render.list_text([running, queued], slots=2, running=1, now=T0 + 2).splitlines()
    assert lines[1].endswith(" [3,4]&& [x]sleep 1")
    assert lines[2].endswith(" [5]&& sleep 1")


def test_gpus_column_shows_ids_held_count_wanted_or_dash() -> None:
    holding = make_job(5, JobState.RUNNING, gpus=2, gpu_ids=(0, 1))
    waiting = make_job(6, JobState.QUEUED, gpus=2)
    cpu = make_job(7, JobState.QUEUED)
    lines = render.list_text([holding, waiting, cpu], slots=2, running=1, now=T0 + 2).splitlines()
    at = lines[0].index("GPUs")
    assert [line[at:].split()[0] for line in lines[1:]] == ["0,1", "2", "-"]
    assert lines[1][at:].endswith("0,1   sleep 1")


def test_skipped_and_no_output_placeholders() -> None:
    skipped = make_job(8, JobState.SKIPPED)
    no_store = make_job(9, JobState.FINISHED, store_output=False)
    rows = {ln.split()[0]: ln for ln in render.list_text([skipped, no_store], 1, 0).splitlines()}
    assert "(no output)" in rows["8"]
    assert rows["8"].split()[4:] == ["-", "sleep", "1"]  # no E-Level, no time for a skipped job
    assert rows["9"].split()[2] == "stdout"


def test_killed_job_has_elevel_minus_one() -> None:
    job = make_job(4, JobState.FINISHED, exit=ExitInfo(signal=15))
    row = render.list_text([job], slots=1, running=0).splitlines()[1]
    assert row.split()[3] == "-1"


def test_long_output_names_widen_the_column_instead_of_being_cut() -> None:
    long_path = "/home/alice/logs/a-very-long-output-name.txt"
    jobs = [make_job(1, JobState.FINISHED, output_path=long_path), make_job(2, JobState.QUEUED)]
    lines = render.list_text(jobs, slots=1, running=0).splitlines()
    assert long_path in lines[2]  # the finished job, after the queued one
    assert lines[0].index("E-Level") == lines[2].index(" 0 ") + 1
    assert lines[0].index("E-Level") == len("ID   State      ") + len(long_path) + 1


def test_big_ids_keep_columns_aligned() -> None:
    jobs = [make_job(123456, JobState.QUEUED), make_job(7, JobState.QUEUED)]
    lines = render.list_text(jobs, slots=1, running=0).splitlines()
    assert {line.index("queued") for line in lines[1:]} == {lines[0].index("State")}


def test_show_user_adds_a_user_column() -> None:
    job = replace(make_job(1, JobState.QUEUED), user="bob")
    lines = render.list_text([job], slots=1, running=0, show_user=True).splitlines()
    assert lines[0].startswith("ID   User     State      Output")
    assert lines[1].split()[:3] == ["1", "bob", "queued"]
    assert lines[1].index("queued") == lines[0].index("State")


def test_terminal_width_shortens_long_commands() -> None:
    job = make_job(1, JobState.QUEUED, command=("echo", "x" * 300))
    row = render.list_text([job], slots=1, running=0, width=80).splitlines()[1]
    assert len(row) == 80
    assert row.endswith("...")


def test_listing_order_is_running_then_queue_order_then_ended() -> None:
    jobs = [
        replace(make_job(1, JobState.QUEUED), order=20),
        make_job(2, JobState.RUNNING),
        replace(make_job(3, JobState.FINISHED), end_time=T0 + 9),
        replace(make_job(4, JobState.QUEUED), order=10),
        replace(make_job(5, JobState.FINISHED), end_time=T0 + 8),
        replace(make_job(6, JobState.RUNNING), order=1),
    ]
    ids = [int(line.split()[0]) for line in render.list_text(jobs, 1, 1).splitlines()[1:]]
    assert ids == [6, 2, 4, 1, 5, 3]
    assert [j["ID"] for j in json.loads(render.list_json(jobs))] == ids


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.01, " 0.01s"), (59.5, "59.50s"), (90, " 1.50m"), (7200, " 2.00h"), (3 * 86400, " 3.00d")],
)
def test_time_is_printed_like_task_spooler(seconds: float, shown: str) -> None:
    assert render.format_duration(seconds) == shown


def test_json_has_task_spoolers_keys_and_tsds_with_types() -> None:
    jobs = [
        make_job(1, JobState.FINISHED, gpus=1, gpu_ids=(2,), label="l"),
        make_job(2, JobState.QUEUED, depends=(1,)),
    ]
    data = json.loads(render.list_json(jobs, now=T0 + 5))
    assert isinstance(data, list) and len(data) == 2
    second, first = data  # the queued job is listed before the finished one
    for key in ("ID", "State", "Output", "E-Level", "Time_ms", "Command", "GPUs"):
        assert key in first
    for key in ("User", "Label", "Cwd", "Depends", "GPU_IDs", "Enqueue", "Start", "End", "Unit"):
        assert key in first
    assert first["ID"] == 1 and first["State"] == "finished" and first["E-Level"] == 0
    assert first["Time_ms"] == 500  # 0.5 s run: milliseconds, not seconds
    assert first["GPUs"] == 1 and first["GPU_IDs"] == [2] and first["Label"] == "l"
    assert first["Start"] == T0 + 1 and first["End"] == T0 + 1.5
    assert second["E-Level"] is None and second["Time_ms"] is None and second["Depends"] == [1]
    assert second["Output"] == "(file)"


def test_json_time_of_running_job_counts_up_to_now() -> None:
    data = json.loads(render.list_json([make_job(1, JobState.RUNNING)], now=T0 + 3.25))
    assert data[0]["Time_ms"] == 2250


def test_tab_rows_all_have_the_same_number_of_columns() -> None:
    jobs = [
        make_job(1, JobState.FINISHED, label="a"),
        make_job(2, JobState.RUNNING),
        make_job(3, JobState.QUEUED, depends=(1, 2)),
        make_job(4, JobState.SKIPPED),
        make_job(5, JobState.QUEUED, command=("printf", "a\tb\nc")),
    ]
    for show_user in (False, True):
        rows = render.list_tab(jobs, show_user=show_user, now=T0 + 2).splitlines()
        assert len(rows) == 5
        widths = {len(row.split("\t")) for row in rows}
        assert widths == {len(render.TAB_COLUMNS) + show_user}


def test_tab_fields_follow_task_spooler() -> None:
    jobs = [make_job(1, JobState.FINISHED, label="a"), make_job(3, JobState.QUEUED, depends=(1,))]
    rows = [r.split("\t") for r in render.list_tab(jobs).splitlines()]
    # The queued job first, as in `ts -l`.
    assert rows[1] == ["1", "finished", "/tmp/ts-out.1.aB3dEf", "0", "0.50", "s", "0", "", "[a]",
                       "sleep 1"]  # fmt: skip
    assert rows[0] == ["3", "queued", "(file)", "", "", "", "0", "[1]&& ", "", "sleep 1"]


def test_tab_escapes_tabs_and_newlines_inside_values() -> None:
    job = make_job(5, JobState.QUEUED, command=("printf", "a\tb\nc\\"))
    (row,) = render.list_tab([job]).splitlines()
    assert row.split("\t")[-1] == "printf a\\tb\\nc\\\\"


def test_info_of_finished_job_has_task_spooler_lines_in_order() -> None:
    job = make_job(1, JobState.FINISHED, command=("bash", "countlines"), slots=2)
    text = render.info_text(job, now=T0 + 10)
    lines = text.splitlines()
    assert lines[0] == "Exit status: died with exit code 0"
    assert lines[1] == "Command: bash countlines"
    order = ["Exit status:", "Command:", "Slots required: 2", "Enqueue time:", "Start time:",
             "End time:", "Time run: 0.500000s"]  # fmt: skip
    positions = [next(i for i, ln in enumerate(lines) if ln.startswith(o)) for o in order]
    assert positions == sorted(positions)
    assert "User: alice (uid 1000)" in lines
    assert "Output: /tmp/ts-out.1.aB3dEf" in lines
    assert "CPU time: 0.25s" in lines
    assert "Peak memory: 3.0 MiB" in lines
    assert f"Enqueue time: {render._ctime(T0)}" in lines


def test_info_of_killed_job_says_signal() -> None:
    job = make_job(1, JobState.FINISHED, exit=ExitInfo(signal=9))
    assert render.info_text(job, now=T0).startswith("Exit status: killed by signal 9\n")


def test_info_of_pending_job_says_why_it_waits_and_has_no_exit_status() -> None:
    job = make_job(2, JobState.ALLOCATING, gpus=2, wait_reason="waiting for 2 free GPUs")
    text = render.info_text(job, now=T0 + 1)
    assert "Exit status" not in text
    assert "Wait reason: waiting for 2 free GPUs" in text
    assert "GPUs required: 2" in text
    assert "Start time" not in text


def test_info_starts_with_ts_env_output_and_shows_stderr_file() -> None:
    job = make_job(3, JobState.RUNNING, env_info="host=a\ncuda=12\n", stderr_apart=True)
    text = render.info_text(job, now=T0 + 4)
    assert text.startswith("host=a\ncuda=12\nCommand: sleep 1\n")
    assert "Stderr: /tmp/ts-out.3.aB3dEf.e" in text
    assert "Time running: 3.000000s" in text


def test_gpu_status_lists_running_gpu_jobs_then_the_gpus() -> None:
    jobs = [make_job(4, JobState.RUNNING, gpus=2, gpu_ids=(0, 3))]
    resp = {
        "gpus": [
            {"index": 0, "uuid": "GPU-a", "name": "NVIDIA H100", "memory_total": 80 * 2**30,
             "memory_used": 2**30, "free_percent": 98.75, "busy": None, "processes": []},
            {"index": 1, "uuid": "GPU-b", "name": "NVIDIA H100", "memory_total": 80 * 2**30,
             "memory_used": 40 * 2**30, "free_percent": 50.0, "busy": "used by pid 77",
             "processes": [{"pid": 77, "user": "bob", "used_memory": 40 * 2**30}]},
        ],
        "jobs": [],
        "problem": "",
    }  # fmt: skip
    lines = render.gpu_status_text(resp, jobs).splitlines()
    assert lines[0] == "ID   GPU-IDs"
    assert lines[1] == "4    0 3"
    gpu_rows = [ln for ln in lines if ln.startswith(("0 ", "1 "))]
    assert "98.8%" in gpu_rows[0] and gpu_rows[0].endswith("free")
    assert gpu_rows[1].endswith("busy: used by pid 77")
    assert "pid 77 (bob) 40.0 GiB" in lines[-1]


def test_gpu_status_reports_a_problem() -> None:
    text = render.gpu_status_text({"gpus": [], "jobs": [], "problem": "NVML not found"})
    assert text == "ID   GPU-IDs\n\nGPU status: NVML not found\n"
