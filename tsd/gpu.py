"""The GPUs as NVML sees them, through pynvml; the only module that imports pynvml.

pynvml (and psutil) are imported inside the methods: the `ts` client never
loads them. NVML may be missing (no driver), fail at init (driver not loaded,
version mismatch) or fail later (a GPU fell off the bus); each case surfaces as
GpuUnavailable with one line naming the reason, and the next call tries again,
because a driver can come back without the daemon restarting.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tsd.model import Gpu, GpuProcess

# What pynvml dlopens; a library preloaded under this soname is the one it gets.
LIBRARY_SONAME = "libnvidia-ml.so.1"

# The nodes every CUDA process opens besides its GPUs' /dev/nvidia<minor>. They
# are listed even when absent: nvidia-uvm appears only once the first CUDA
# program loads the module, which may be after the job's scope was made.
CONTROL_NODES = (
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
)

_T = TypeVar("_T")


class GpuUnavailable(Exception):
    """NVML is missing or failing; str() is one clear line naming the reason.

    `absent` is True when this machine has no NVML at all (no NVIDIA driver, no
    pynvml): no GPU will ever appear without an install, so a GPU job is refused
    at submit instead of waiting forever. Other failures may pass (a driver
    reload), so GPU jobs wait through them.
    """

    def __init__(self, message: str, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent


class NvmlGpus:
    """Reads the GPUs through NVML.

    `library` is the path of a libnvidia-ml.so.1 to use instead of the system's
    (the daemon passes its own $TSD_NVML_LIBRARY; tests pass the stand-in). It
    is loaded under its soname before pynvml looks, so pynvml's
    dlopen("libnvidia-ml.so.1") finds it already loaded. One object may be used
    from several threads; calls are serialised.
    """

    def __init__(self, library: str | None = None) -> None:
        self._library = library
        self._preloaded: ctypes.CDLL | None = None
        self._initialized = False
        self._lock = threading.Lock()

    def snapshot(self) -> tuple[Gpu, ...]:
        """Every GPU with its memory and processes, in NVML (PCI bus) order.

        Raises GpuUnavailable when NVML cannot be initialised or any read fails;
        after a failed read NVML is shut down, and the next call initialises it again.
        """
        with self._lock:
            nvml = self._nvml()
            count = self._call(nvml, "count the GPUs", nvml.nvmlDeviceGetCount)
            return tuple(self._read(nvml, index) for index in range(count))

    def device_nodes(self, indices: Sequence[int]) -> list[str]:
        """The device nodes a job using these GPUs needs (for DeviceAllow on its scope).

        /dev/nvidia<minor> of each GPU, then the control nodes CUDA opens.
        Raises GpuUnavailable when NVML fails or an index is not a GPU.
        """
        with self._lock:
            nvml = self._nvml()
            count = self._call(nvml, "count the GPUs", nvml.nvmlDeviceGetCount)
            missing = [index for index in indices if not 0 <= index < count]
            if missing:
                # NVML works; the GPU is gone (or never was): no reason to re-init.
                raise GpuUnavailable(f"no GPU {missing[0]}: NVML reports {count} GPUs")
            nodes = []
            for index in indices:
                handle = self._call(
                    nvml, f"open GPU {index}", nvml.nvmlDeviceGetHandleByIndex, index
                )
                minor = self._call(
                    nvml,
                    f"read the minor number of GPU {index}",
                    nvml.nvmlDeviceGetMinorNumber,
                    handle,
                )
                nodes.append(f"/dev/nvidia{minor}")
            # MIG capability nodes and RDMA devices (NCCL, GPUDirect) where they exist:
            # without them such jobs break under DevicePolicy=closed.
            extra = sorted(
                str(p)
                for pattern in ("nvidia-caps/*", "infiniband/*")
                for p in Path("/dev").glob(pattern)
            )
            return nodes + list(CONTROL_NODES) + extra

    def close(self) -> None:
        """Shut NVML down if this object initialised it. Safe to call twice."""
        with self._lock:
            if self._initialized:
                import pynvml

                self._drop(pynvml)

    # -- internals -------------------------------------------------------------

    def _nvml(self) -> Any:
        """pynvml, initialised; raises GpuUnavailable with the reason it is not."""
        try:
            import pynvml
        except ImportError as e:
            raise GpuUnavailable(
                f"pynvml is not installed ({e}); install nvidia-ml-py", absent=True
            ) from e
        if self._initialized:
            return pynvml
        self._preload(pynvml)
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound as e:
            raise GpuUnavailable(
                f"NVML library {LIBRARY_SONAME} not found (is the NVIDIA driver installed?)",
                absent=True,
            ) from e
        except pynvml.NVMLError as e:
            raise GpuUnavailable(f"NVML failed to initialise: {_reason(e)}") from e
        self._initialized = True
        return pynvml

    def _preload(self, nvml: Any) -> None:
        """Load self._library under its soname before pynvml loads its own."""
        if self._library is None:
            return
        if self._preloaded is None:
            try:
                self._preloaded = ctypes.CDLL(self._library, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise GpuUnavailable(f"cannot load NVML library {self._library}: {e}") from e
        loaded = nvml.nvmlLib
        # pynvml loads once per process; a different library already in use would
        # silently answer for this one.
        if loaded is not None and loaded._handle != self._preloaded._handle:
            raise GpuUnavailable(
                f"pynvml already uses another {LIBRARY_SONAME}, not {self._library}"
            )

    def _drop(self, nvml: Any) -> None:
        """Forget the NVML session so that the next call initialises again."""
        if self._initialized:
            self._initialized = False
            # Already broken or not: what matters is that the next call inits.
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()

    def _call(self, nvml: Any, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args); an NVML error ends the session and becomes GpuUnavailable."""
        try:
            return fn(*args)
        except nvml.NVMLError as e:
            self._failed(nvml, what, e)

    def _failed(self, nvml: Any, what: str, error: BaseException) -> NoReturn:
        # NVML's advice after most errors (GPU lost, driver reloaded) is to init
        # again; shutting down here makes the next call do that.
        self._drop(nvml)
        raise GpuUnavailable(f"NVML failed to {what}: {_reason(error)}") from error

    def _read(self, nvml: Any, index: int) -> Gpu:
        handle = self._call(nvml, f"open GPU {index}", nvml.nvmlDeviceGetHandleByIndex, index)
        name = self._call(nvml, f"read the name of GPU {index}", nvml.nvmlDeviceGetName, handle)
        uuid = self._call(nvml, f"read the UUID of GPU {index}", nvml.nvmlDeviceGetUUID, handle)
        memory = self._call(
            nvml, f"read the memory of GPU {index}", nvml.nvmlDeviceGetMemoryInfo, handle
        )
        utilization = _sensor(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
        return Gpu(
            index=index,
            uuid=_text(uuid),
            name=_text(name),
            memory_total=int(memory.total),
            memory_used=int(memory.used),
            processes=self._processes(nvml, index, handle),
            utilization=None if utilization is None else int(utilization.gpu),
            memory_utilization=None if utilization is None else int(utilization.memory),
            temperature=_sensor(
                nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU
            ),
            power_mw=_sensor(nvml, nvml.nvmlDeviceGetPowerUsage, handle),
            power_limit_mw=_sensor(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle),
        )

    def _processes(self, nvml: Any, index: int, handle: Any) -> tuple[GpuProcess, ...]:
        """Compute then graphics processes, one entry per pid."""
        found: dict[int, int | None] = {}
        for kind in ("Compute", "Graphics"):
            for info in self._process_infos(nvml, index, handle, kind):
                pid, used = int(info.pid), info.usedGpuMemory
                used = None if used is None else int(used)
                if pid in found:
                    # A process in both lists: keep the larger figure, NVML
                    # reports the same allocation in each.
                    seen = found[pid]
                    used = seen if used is None else used if seen is None else max(seen, used)
                found[pid] = used
        return tuple(
            GpuProcess(pid=pid, used_memory=used, user=_owner(pid)) for pid, used in found.items()
        )

    def _process_infos(self, nvml: Any, index: int, handle: Any, kind: str) -> list[Any]:
        what = f"list the {kind.lower()} processes of GPU {index}"
        try:
            return list(getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses_v3")(handle))
        except (nvml.NVMLError_FunctionNotFound, nvml.NVMLLibraryMismatchError):
            pass  # drivers before 510 have only the _v2 call
        except nvml.NVMLError_NotSupported:
            return []
        except nvml.NVMLError as e:
            self._failed(nvml, what, e)
        try:
            return list(getattr(nvml, f"nvmlDeviceGet{kind}RunningProcesses_v2")(handle))
        except nvml.NVMLError_NotSupported:
            return []
        except nvml.NVMLError as e:
            self._failed(nvml, what, e)


def _sensor(nvml: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """A sensor's reading, or None when the board cannot give it.

    Sensors only inform: a board that lacks one (NOT_SUPPORTED, common on older
    or virtual GPUs) or fails to read it must not take the GPU out of the pool,
    which memory and process reads decide.
    """
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


def _reason(error: BaseException) -> str:
    """NVML's message for an error, on one line."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _owner(pid: int) -> str | None:
    """The user running pid, or None when it is gone or hidden from us."""
    import psutil

    try:
        return psutil.Process(pid).username()
    except (psutil.Error, KeyError, OSError):
        return None
