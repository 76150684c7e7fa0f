"""tsd.gpu through the real pynvml, against the NVML stand-in (or a real GPU).

Each test drives NvmlGpus in a fresh interpreter (fixtures/nvml/probe.py),
because pynvml loads its library once per process. With TSD_REAL_NVML=1 on a
machine with an NVIDIA driver, test_real_nvml_reports_sane_gpus checks the same
code against the real library.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.nvml.picture import GIB, FakeGpu, FakeProc, PictureFile, simple_gpus, uuid_for

from tsd.model import Gpu, GpuProcess

PROBE = Path(__file__).resolve().parents[1] / "fixtures" / "nvml" / "probe.py"


class ProbeFailed(Exception):
    """The probe's NvmlGpus raised; args are (exception class name, message)."""

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    @property
    def kind(self) -> str:
        return str(self.args[0])

    @property
    def message(self) -> str:
        return str(self.args[1])


class Probe:
    """One child interpreter holding one NvmlGpus."""

    def __init__(self, library: Path | str | None, env: dict[str, str]) -> None:
        args = [sys.executable, str(PROBE)] + ([] if library is None else [str(library)])
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )

    def call(self, **command: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"probe died (exit {self.proc.wait()})"
        answer = json.loads(line)
        if not answer["ok"]:
            raise ProbeFailed(answer["error"], answer["message"])
        return answer["value"]

    def snapshot(self) -> list[Gpu]:
        return [
            Gpu(**{**g, "processes": tuple(GpuProcess(**p) for p in g["processes"])})
            for g in self.call(op="snapshot")
        ]

    def nodes(self, indices: list[int]) -> list[str]:
        return list(self.call(op="nodes", indices=indices))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TSD_FAKE_NVML", "TSD_NVML_LIBRARY")}
    env.update(extra)
    return env


@pytest.fixture
def probe(nvml_picture: PictureFile) -> Iterator[Probe]:
    """A child using the stand-in, reading this test's picture."""
    p = Probe(nvml_picture.library, _env(TSD_FAKE_NVML=str(nvml_picture.path)))
    yield p
    p.close()


def _me() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


def test_snapshot_reports_each_gpu_name_uuid_and_memory(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(
        [
            FakeGpu(0, uuid_for(0), "NVIDIA A100-SXM4-80GB", 80 * GIB, 0),
            FakeGpu(1, uuid_for(1), "NVIDIA A100-SXM4-80GB", 80 * GIB, 40 * GIB),
            FakeGpu(2, uuid_for(2), "NVIDIA H100 80GB HBM3", 80 * GIB + 123, 7),
            FakeGpu(3, uuid_for(3), "Tesla V100-PCIE-16GB", 16 * GIB, 16 * GIB),
        ]
    )
    gpus = probe.snapshot()
    assert [(g.index, g.uuid, g.name, g.memory_total, g.memory_used) for g in gpus] == [
        (0, uuid_for(0), "NVIDIA A100-SXM4-80GB", 80 * GIB, 0),
        (1, uuid_for(1), "NVIDIA A100-SXM4-80GB", 80 * GIB, 40 * GIB),
        (2, uuid_for(2), "NVIDIA H100 80GB HBM3", 80 * GIB + 123, 7),
        (3, uuid_for(3), "Tesla V100-PCIE-16GB", 16 * GIB, 16 * GIB),
    ]
    assert [g.processes for g in gpus] == [(), (), (), ()]
    assert gpus[1].free_percent == 50.0


def test_sensors_report_utilisation_temperature_and_power(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(
        [
            FakeGpu(0, uuid_for(0), "NVIDIA A100-SXM4-80GB", 80 * GIB, 0, util=97,
                    memory_util=41, temperature=71, power_mw=312_000, power_limit_mw=400_000),
            FakeGpu(1, uuid_for(1), "NVIDIA A100-SXM4-80GB", 80 * GIB, 0, util=0,
                    temperature=33),
        ]
    )
    first, second = probe.snapshot()
    assert (first.utilization, first.memory_utilization, first.temperature) == (97, 41, 71)
    assert (first.power_mw, first.power_limit_mw) == (312_000, 400_000)
    # A board without a memory-utilisation or power sensor: those read as None,
    # and NVML refuses the whole utilisation call, as a real board does.
    assert (second.utilization, second.memory_utilization) == (None, None)
    assert (second.temperature, second.power_mw, second.power_limit_mw) == (33, None, None)


def test_gpu_without_sensors_stays_in_the_pool_with_sensors_unknown(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(2))
    gpus = probe.snapshot()
    assert len(gpus) == 2
    assert {(g.utilization, g.temperature, g.power_mw) for g in gpus} == {(None, None, None)}


def test_process_on_gpu_is_reported_with_pid_memory_and_owner(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    me = os.getpid()  # a live process, so its owner resolves
    gone = 2**22 + 12345  # above pid_max's default ceiling: no such process
    nvml_picture.write(
        simple_gpus(4),
        [FakeProc(2, me, 3 * GIB), FakeProc(2, gone, None), FakeProc(0, me, 1, "graphics")],
    )
    gpus = probe.snapshot()
    assert gpus[2].processes == (
        GpuProcess(pid=me, used_memory=3 * GIB, user=_me()),
        GpuProcess(pid=gone, used_memory=None, user=None),
    )
    assert gpus[0].processes == (GpuProcess(pid=me, used_memory=1, user=_me()),)
    assert gpus[1].processes == gpus[3].processes == ()


def test_process_in_both_compute_and_graphics_lists_is_reported_once(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(
        simple_gpus(1), [FakeProc(0, 777, GIB), FakeProc(0, 777, 2 * GIB, "graphics")]
    )
    (gpu,) = probe.snapshot()
    assert [(p.pid, p.used_memory) for p in gpu.processes] == [(777, 2 * GIB)]


def test_many_processes_are_all_reported(probe: Probe, nvml_picture: PictureFile) -> None:
    procs = [FakeProc(1, 10_000 + i, i * 1000) for i in range(200)]
    nvml_picture.write(simple_gpus(2), procs)
    gpus = probe.snapshot()
    assert [(p.pid, p.used_memory) for p in gpus[1].processes] == [(p.pid, p.used) for p in procs]


def test_rewriting_the_picture_changes_the_next_snapshot(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(4))
    assert len(probe.snapshot()) == 4
    nvml_picture.write(simple_gpus(2, used=10 * GIB), [FakeProc(1, 4242, 10 * GIB)])
    gpus = probe.snapshot()
    assert [g.memory_used for g in gpus] == [10 * GIB, 10 * GIB]
    assert [p.pid for p in gpus[1].processes] == [4242]


def test_init_failure_names_the_reason_and_the_same_object_recovers(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(2), fail="init")
    with pytest.raises(ProbeFailed) as failed:
        probe.snapshot()
    assert failed.value.kind == "GpuUnavailable"
    assert failed.value.message == "NVML failed to initialise: Driver Not Loaded"
    nvml_picture.write(simple_gpus(2))
    assert [g.index for g in probe.snapshot()] == [0, 1]


def test_failure_after_init_names_the_call_and_the_next_snapshot_recovers(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(3))
    assert len(probe.snapshot()) == 3
    nvml_picture.write(simple_gpus(3), fail="memory")
    with pytest.raises(ProbeFailed) as failed:
        probe.snapshot()
    assert failed.value.kind == "GpuUnavailable"
    assert failed.value.message == "NVML failed to read the memory of GPU 0: Unknown Error"
    nvml_picture.write(simple_gpus(3), fail="count")
    with pytest.raises(
        ProbeFailed, match=r"^GpuUnavailable: NVML failed to count the GPUs: Unknown Error$"
    ):
        probe.snapshot()
    nvml_picture.write(simple_gpus(3))
    assert len(probe.snapshot()) == 3


def test_missing_picture_reads_as_driver_not_loaded(probe: Probe) -> None:
    with pytest.raises(ProbeFailed) as failed:
        probe.snapshot()
    assert (failed.value.kind, failed.value.message) == (
        "GpuUnavailable",
        "NVML failed to initialise: Driver Not Loaded",
    )


def test_unloadable_library_path_raises_gpu_unavailable(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "libnvidia-ml.so.1"
    p = Probe(missing, _env())
    try:
        with pytest.raises(ProbeFailed) as failed:
            p.snapshot()
    finally:
        p.close()
    assert failed.value.kind == "GpuUnavailable"
    assert failed.value.message.startswith(f"cannot load NVML library {missing}: ")
    assert "\n" not in failed.value.message


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has a real NVML"
)
def test_no_library_and_no_driver_raises_gpu_unavailable() -> None:
    p = Probe(None, _env())
    try:
        with pytest.raises(ProbeFailed) as failed:
            p.snapshot()
    finally:
        p.close()
    assert (failed.value.kind, failed.value.message) == (
        "GpuUnavailable",
        "NVML library libnvidia-ml.so.1 not found (is the NVIDIA driver installed?)",
    )


def test_device_nodes_use_minor_numbers_then_control_nodes(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(
        [
            FakeGpu(i, uuid_for(i), "NVIDIA A100-SXM4-80GB", 80 * GIB, 0, minor=m)
            for i, m in enumerate([4, 5, 0, 7])
        ]
    )
    assert probe.nodes([2, 0]) == [
        "/dev/nvidia0",
        "/dev/nvidia4",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "/dev/nvidia-modeset",
    ]
    with pytest.raises(ProbeFailed, match=r"^GpuUnavailable: no GPU 4: NVML reports 4 GPUs$"):
        probe.nodes([4])


def test_second_library_is_refused_once_pynvml_uses_another(
    tmp_path: Path, nvml_picture: PictureFile
) -> None:
    # A copy is a distinct object for the dynamic loader, as a real driver would be.
    other = tmp_path / "other" / "libnvidia-ml.so.1"
    other.parent.mkdir()
    shutil.copy(nvml_picture.library, other)
    nvml_picture.write(simple_gpus(1))
    code = (
        "from tsd.gpu import NvmlGpus, GpuUnavailable\n"
        f"print(len(NvmlGpus({str(nvml_picture.library)!r}).snapshot()))\n"
        "try:\n"
        f"    NvmlGpus({str(other)!r}).snapshot()\n"
        "except GpuUnavailable as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(TSD_FAKE_NVML=str(nvml_picture.path)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == [
        "1",
        f"pynvml already uses another libnvidia-ml.so.1, not {other}",
    ]


def test_importing_tsd_gpu_does_not_load_pynvml() -> None:
    code = "import sys, tsd.gpu; print('pynvml' in sys.modules, 'psutil' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


def test_close_shuts_nvml_down_and_a_later_snapshot_initialises_again(
    probe: Probe, nvml_picture: PictureFile
) -> None:
    nvml_picture.write(simple_gpus(1))
    assert len(probe.snapshot()) == 1
    probe.call(op="close")
    probe.call(op="close")
    assert len(probe.snapshot()) == 1


@pytest.mark.skipif(os.environ.get("TSD_REAL_NVML") != "1", reason="set TSD_REAL_NVML=1 on a GPU")
def test_real_nvml_reports_sane_gpus() -> None:
    p = Probe(None, _env())
    try:
        gpus = p.snapshot()
        nodes = p.nodes([g.index for g in gpus])
    finally:
        p.close()
    assert len(gpus) >= 1
    assert [g.index for g in gpus] == list(range(len(gpus)))
    for g in gpus:
        assert g.uuid.startswith("GPU-") and g.name
        assert g.memory_total > 0 and 0 <= g.memory_used <= g.memory_total
        assert all(p.pid > 0 for p in g.processes)
        assert g.utilization is None or 0 <= g.utilization <= 100
        assert g.temperature is None or 0 < g.temperature < 120
        assert g.power_mw is None or g.power_mw >= 0
    gpu_nodes = nodes[: len(gpus)]
    assert all(os.path.exists(n) for n in gpu_nodes), gpu_nodes
    assert "/dev/nvidiactl" in nodes
