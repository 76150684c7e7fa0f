"""The policy's overrides and quota cache; the GPU monitor's picture, refreshed off the loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

import pytest
from unit.daemon_fakes import FakeNvml, FakeStore, gpu

from tsd.config import Config
from tsd.gpumonitor import GpuMonitor
from tsd.model import Gpu, GpuProcess, UserLimits
from tsd.policy import LIMITS_TTL, Policy


def test_slot_override_is_kept_in_the_store_and_dropped_by_a_reload() -> None:
    store = FakeStore()
    policy = Policy(Config(slots=2), store, system=True)
    policy.set_slots(5)
    assert Policy(Config(slots=2), store, system=True).total_slots() == 5
    policy.reload(Config(slots=3))
    assert policy.total_slots() == 3 and "slots" not in store.settings


def test_threshold_override_wins_over_the_config_and_survives_a_reload() -> None:
    policy = Policy(Config(), FakeStore(), system=True)
    policy.set_free_threshold(42.0)
    policy.reload(Config())
    assert policy.free_threshold() == 42.0


def test_quotas_resolve_once_a_minute_on_the_system_service_only() -> None:
    calls: list[int] = []
    now = [100.0]

    def resolve(config: Config, uid: int) -> UserLimits:
        calls.append(uid)
        return UserLimits(max_gpus=uid)

    policy = Policy(Config(), FakeStore(), True, resolve=resolve, clock=lambda: now[0])
    assert policy.limits(7).max_gpus == 7 and policy.limits(7).max_gpus == 7
    assert calls == [7]
    now[0] += LIMITS_TTL
    policy.limits(7)
    assert calls == [7, 7]
    personal = Policy(Config(defaults=UserLimits(max_queued=3)), FakeStore(), False,
                      resolve=resolve)
    assert personal.limits(7) == UserLimits(max_queued=3) and calls == [7, 7]


def test_a_stale_picture_is_refreshed_off_the_loop_then_schedules_again() -> None:
    async def body() -> None:
        refreshed: list[int] = []
        nvml = FakeNvml([gpu(0), gpu(1)])
        monitor = GpuMonitor(
            asyncio.get_running_loop(), None, lambda: (1,), lambda: refreshed.append(1),
            lambda: nvml,
        )
        assert monitor.request(0.2) is False and monitor.pool() is None
        await asyncio.wait_for(monitor.snapshot(0.2), 5)
        assert refreshed == [1] and nvml.reads == 1 and nvml.threads != ["MainThread"]
        assert monitor.request(0.2) is True and monitor.pool() == (1,)
        assert monitor.free({}, set(), 90.0) == (1,)

    asyncio.run(body())


def test_an_nvml_failure_is_the_picture_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        nvml = FakeNvml(problem="driver not loaded")
        monitor = GpuMonitor(asyncio.get_running_loop(), None, lambda: None, lambda: None,
                             lambda: nvml)
        with caplog.at_level(logging.WARNING, logger="tsd"):
            assert await monitor.snapshot() == (None, "driver not loaded")
            monitor.expire()
            await monitor.snapshot()
        assert [r.message for r in caplog.records].count("GPUs unavailable: driver not loaded") == 1

    asyncio.run(body())


def test_the_poll_timer_runs_only_while_armed() -> None:
    async def body() -> None:
        refreshed: list[int] = []
        monitor = GpuMonitor(asyncio.get_running_loop(), None, lambda: None,
                             lambda: refreshed.append(1), lambda: FakeNvml([gpu(0)]))
        monitor.arm_poll(0.01)
        await asyncio.wait_for(_until(lambda: refreshed), 5)
        monitor.arm_poll(0.01)
        monitor.stop_poll()
        await asyncio.sleep(0.05)  # long enough for a poll that was not stopped
        assert refreshed == [1]

    asyncio.run(body())


async def _until(check: object) -> None:
    while not check():  # type: ignore[operator]
        await asyncio.sleep(0.005)


def test_a_poll_keeps_the_last_picture_to_explain_while_nvml_is_read_again() -> None:
    """`ts -i` during a poll's read still names who uses a busy GPU (it once said
    nothing: the poll dropped the picture until NVML answered)."""

    async def body() -> None:
        nvml = FakeNvml([gpu(0), gpu(1)])
        monitor = GpuMonitor(
            asyncio.get_running_loop(), None, lambda: None, lambda: None, lambda: nvml
        )
        await monitor.snapshot()
        stranger = GpuProcess(pid=4242, used_memory=1 << 30)
        nvml.gpus = (dataclasses.replace(gpu(0, used_gib=1), processes=(stranger,)), gpu(1))
        monitor.expire()
        await monitor.snapshot()
        entered, release = threading.Event(), threading.Event()
        slow_read = nvml.snapshot

        def blocked_read() -> tuple[Gpu, ...]:
            entered.set()
            release.wait(5)
            return slow_read()

        nvml.snapshot = blocked_read  # type: ignore[method-assign]
        monitor.arm_poll(0.0)
        await asyncio.wait_for(asyncio.to_thread(entered.wait, 5), 6)
        try:
            assert monitor.request(10.0) is False  # stale: nothing is placed on it
            assert monitor.busy({}, set(), 90.0) == {0: "used by pid 4242, 1.0 GiB"}
            assert monitor.pool() == (0, 1) and monitor.cached()[0] is not None
        finally:
            release.set()
        await asyncio.wait_for(_until(lambda: monitor.request(10.0)), 5)
        assert nvml.reads == 3

    asyncio.run(body())
