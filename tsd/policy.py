"""What the server allows: the config, the -S and GPU-threshold overrides, user quotas.

The overrides are kept in memory as well as in the store: the scheduler reads
them on every decision, the database only when they change. Quotas resolve a
user's groups through the group database, so they are cached for a minute.
"""

from __future__ import annotations

import pwd
import time
from collections.abc import Callable
from typing import Protocol

from tsd import auth
from tsd.config import Config
from tsd.model import UserLimits

LIMITS_TTL = 60.0  # seconds a user's resolved quota is reused


class SettingStore(Protocol):
    """The part of tsd.store.Store the policy uses."""

    def get_setting(self, key: str) -> str | None: ...

    def set_setting(self, key: str, value: str | None) -> None: ...


def limits_from_groups(config: Config, uid: int) -> UserLimits:
    """A user's quota under `config`, from their name and groups (the group database)."""
    user = auth.user_name(uid)
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = -1
    return config.limits_for(user, auth.group_names(auth.group_ids(user, gid)))


class Policy:
    """The config in force, its runtime overrides and every user's quota."""

    def __init__(
        self,
        config: Config,
        store: SettingStore,
        system: bool,
        resolve: Callable[[Config, int], UserLimits] = limits_from_groups,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.system = system
        self._store = store
        self._resolve = resolve
        self._clock = clock
        self._limits: dict[int, tuple[float, UserLimits]] = {}
        slots = store.get_setting("slots")
        self._slots = None if slots is None else int(slots)
        perc = store.get_setting("gpu_free_perc")
        self._free_perc = None if perc is None else float(perc)

    def limits(self, uid: int) -> UserLimits:
        """A user's quota; the personal daemon has only the defaults."""
        if not self.system:
            return self.config.defaults
        now = self._clock()
        cached = self._limits.get(uid)
        if cached is not None and now - cached[0] < LIMITS_TTL:
            return cached[1]
        limits = self._resolve(self.config, uid)
        self._limits[uid] = (now, limits)
        return limits

    def total_slots(self) -> int:
        """The server's slot count: -S's override if set, else the config's."""
        return self._slots if self._slots is not None else self.config.slots

    def set_slots(self, value: int) -> None:
        """ts -S N: override the config's slot count until the next reload."""
        self._store.set_setting("slots", str(value))
        self._slots = value

    def free_threshold(self) -> float:
        """The free-memory percentage above which a GPU counts as free."""
        if self._free_perc is not None:
            return self._free_perc
        return self.config.gpus.free_memory_percent

    def set_free_threshold(self, value: float) -> None:
        """--set_gpu_free_perc: kept across reloads and restarts."""
        self._store.set_setting("gpu_free_perc", str(value))
        self._free_perc = value

    def hold_unmanaged(self) -> bool:
        """gpu.unmanaged: hold: a user's GPU use outside tsd holds their queued GPU jobs."""
        return self.config.gpu.unmanaged == "hold"

    def reload(self, config: Config) -> None:
        """A new config: quotas resolve again, and -S gives way to the file's slots."""
        self.config = config
        self._limits.clear()
        self._store.set_setting("slots", None)
        self._slots = None
