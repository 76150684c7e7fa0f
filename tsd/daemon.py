"""The daemon's composition root: builds its parts, serves requests, stops.

`tsd --system` is the root service for a shared server (socket-activated by
systemd, config from /etc/tsd/tsd.yaml, jobs in transient scopes);
`tsd --user` is the personal daemon the first `ts` call starts. Both share
this code: the differences are who may connect, where state lives, and
whether jobs get a scope and a privilege drop.

The parts, each owning its state:

* tsd.jobtable.JobTable: the jobs, the queue's indexes, every transition,
  committed to SQLite before any client hears "ok" (the writes of one loop
  turn in one transaction: tsd.store's group commit; the server waits for it
  before it writes any answer);
* tsd.policy.Policy: the config, the -S and GPU-threshold overrides, quotas;
* tsd.gpumonitor.GpuMonitor: the NVML picture and its poll timer;
* tsd.dispatch.Dispatcher: the scheduler's verdicts applied, -W cascades;
* tsd.runner.Runner: supervisors, scopes, exit reports, kills;
* tsd.waiters.Waiters: clients parked on a job or on a full queue;
* tsd.idlewatch.IdleWatch: jobs holding idle GPUs flagged, notified, acted on;
* tsd.metricswriter.MetricsWriter: the Prometheus textfile (metrics.textfile);
* tsd.handlers: one function per request;
* with `cluster.engine: slurm`, tsd.slurm.SlurmEngine in the dispatcher's place:
  jobs go to Slurm, and one squeue poll follows them (tsd.engine is the seam).

Jobs outlive the daemon: each has a supervisor process (tsd.launch) that
leaves an exit report (tsd.exitreport), which the next daemon picks up.
Blocking calls (D-Bus, NVML) run in a small pool of worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tsd import __version__, daemonlog, handlers, heap, protocol
from tsd.config import Config, GpuConfig, unknown_names
from tsd.dispatch import Dispatcher
from tsd.engine import Scheduling
from tsd.errors import ConfigError
from tsd.gpumonitor import GpuMonitor
from tsd.gpuwatch import GpuWatch
from tsd.idlewatch import IdleWatch
from tsd.jobrows import gc_paused_then_frozen
from tsd.jobtable import JobTable
from tsd.ledger import PRUNE_EVERY, Ledger
from tsd.metrics import MetricsState
from tsd.metricswriter import MetricsWriter
from tsd.model import Job, UserLimits
from tsd.paths import SUBMIT_GROUP, SYSTEM_CONFIG, SYSTEM_SOCKET, SYSTEM_STATE
from tsd.policy import Policy
from tsd.runner import Runner, RunnerSettings, ScopeManager
from tsd.server import (
    ConnectionLimits,
    SendEvent,
    Server,
    bind_personal,
    bind_system,
    inherited_socket,
)
from tsd.store import Store, StoreError
from tsd.waiters import Waiters

TYPE_CHECKING = False
if TYPE_CHECKING:  # tsd.slurm (json, secrets, hashlib) loads only with cluster.engine: slurm
    from tsd.slurm import SlurmEngine

log = logging.getLogger("tsd")


def _load_config(path: str | os.PathLike[str]) -> Config:
    """tsd.configfile.load_config, imported here: YAML loads only where a config file is read."""
    from tsd.configfile import load_config

    return load_config(path)

IO_THREADS = 4  # D-Bus and NVML calls at once; each adapter serialises its own anyway


@dataclasses.dataclass
class Settings:
    """Where this daemon lives and how it behaves; decided at start from mode and env."""

    system: bool
    state_dir: Path
    socket_path: str | None
    config_path: str | None
    max_connections: int = 1000
    save_list: str | None = None
    on_finish: str | None = None


def personal_config(env: dict[str, str]) -> Config:
    """task-spooler's variables, read once when the personal daemon starts."""

    def number(name: str, default: int) -> int:
        try:
            return max(0, int(env.get(name, default)))
        except ValueError:
            return default

    visible = None
    if env.get("TS_VISIBLE_DEVICES", "").strip():
        from tsd.gpupool import parse_indices

        try:
            visible = tuple(sorted(parse_indices(env["TS_VISIBLE_DEVICES"])))
        except ValueError as exc:
            # Not "all GPUs": a typo must not hand out GPUs the user meant to keep free.
            logging.getLogger("tsd").error("TS_VISIBLE_DEVICES ignored, no GPUs used: %s", exc)
            visible = ()
    return Config(
        slots=number("TS_SLOTS", 1),
        gpus=GpuConfig(visible=visible),
        admins=(),
        defaults=UserLimits(max_queued=number("TS_MAXCONN", 1000) or None),
        max_finished=number("TS_MAXFINISHED", 1000),
    )


def _systemd_scopes() -> ScopeManager:
    from tsd.scope import SystemdScopes  # pydbus: the system service only

    return SystemdScopes()


class Daemon:
    """The parts of a running daemon, wired together on its event loop."""

    def __init__(
        self, settings: Settings, config: Config, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.settings = settings
        self.loop = loop
        state = settings.state_dir
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        exits_dir = state / "exits"
        exits_dir.mkdir(exist_ok=True, mode=0o700)
        self.store = Store(state / "state.db")
        # Group commit: the writes of one loop turn share one transaction and one fsync.
        self.store.group(loop)
        self.executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="tsd-io")
        self.policy = Policy(config, self.store, settings.system)
        self.waiters = Waiters(loop)
        self.ledger = Ledger(self.store, lambda: self.policy.config)
        # Under Slurm the table also knows "running on the cluster" (tsd.slurm).
        table_type = JobTable
        if config.cluster.slurm:
            from tsd.slurm import SlurmJobTable

            table_type = SlurmJobTable
        self.table = table_type(
            self.store, self.waiters, lambda: self.policy.config.max_finished,
            save_end=self.ledger.save_ended,
        )
        self.gpus = GpuMonitor(
            loop, self.executor, lambda: self.policy.config.gpus.visible, self.schedule,
            # A reused supervisor may still be listed for the job it ended a moment ago:
            # the one that started last is the one it runs now.
            supervisors=lambda: {
                j.supervisor_pid: j.id
                for j in sorted(self.table.running.values(), key=lambda j: j.start_time or 0.0)
                if j.supervisor_pid
            },
            scopes=settings.system,
        )
        self.gpu_watch = GpuWatch(
            self.store,
            self.table.holding,
            self.gpus,
            lambda: self.policy.config.gpus.poll_seconds,
            always=settings.system,
            # Fair share: GPU-seconds of use outside tsd count in their owner's usage.
            charge=self.ledger.charge_gpu,
            known=lambda job_id: job_id in self.table.jobs,
        )
        self.gpus.on_sample = self.gpu_watch.on_sample
        self.runner = Runner(
            loop,
            self.executor,
            RunnerSettings(settings.system, exits_dir, settings.on_finish),
            lambda: self.policy.config,
            self.table,
            self.store,
            self.gpus,
            _systemd_scopes,
            ended=self._job_ended,
            requeued=self.schedule,
            waited=self.waiters.waiting_on,
        )
        self.dispatcher = Dispatcher(
            self.table,
            self.policy,
            self.gpus,
            self._start,
            lambda: self.policy.config.gpus.poll_seconds,
            fair=self.ledger,
            wake=self._wake_at,
            ahead=None if settings.system else self.runner.send_ahead,
            not_started=None if settings.system else self.runner.not_started,
        )
        self.idle = IdleWatch(
            loop, lambda: self.policy.config, self.table, self.gpus, self.runner,
            self.store.env_of,
        )
        self.metrics = MetricsWriter(
            loop, self.executor, lambda: self.policy.config.metrics.path(settings.system),
            self.metrics_state, self._refresh_gpus_for_metrics,
        )
        self._wake: tuple[float, asyncio.TimerHandle] | None = None
        self._prune: asyncio.TimerHandle | None = None
        self._stopped = False  # the store is closing or closed: nothing may start
        self.slurm: SlurmEngine | None = None
        scheduling: Scheduling = self.dispatcher
        if config.cluster.slurm:
            from tsd.slurm import SlurmEngine, SlurmJobTable
            from tsd.slurmcmd import SlurmCommands

            assert isinstance(self.table, SlurmJobTable)

            self.slurm = SlurmEngine(
                loop, self.executor, lambda: self.policy.config.cluster, self.table,
                self.store, SlurmCommands(),
            )
            scheduling = self.slurm
        self.stopping = asyncio.Event()
        self.parts = handlers.Parts(
            system=settings.system,
            my_uid=os.getuid(),
            table=self.table,
            policy=self.policy,
            gpus=self.gpus,
            dispatcher=scheduling,
            runner=self.runner,
            waiters=self.waiters,
            gpu_watch=self.gpu_watch,
            settings=self.store,
            stop=self._stop_soon,
            ledger=self.ledger,
            cluster=self.slurm,
        )

    def _stop_soon(self) -> None:
        # Stop just after this answer is on its way, not before.
        self.loop.call_later(0.05, self.stopping.set)

    def schedule(self) -> None:
        """Start whatever may start now (here: nothing starts here under Slurm, nor once
        the daemon has stopped: a retry timer may still fire then)."""
        if self.slurm is None and not self._stopped:
            self.dispatcher.schedule()

    def _wake_at(self, when: float | None) -> None:
        """One timer: schedule again at epoch `when` (a --begin time), or never (None)."""
        if self._wake is not None:
            if self._wake[0] == when:
                return
            self._wake[1].cancel()
            self._wake = None
        if when is not None:
            # A little late rather than early: the clock must have passed `when`.
            delay = max(0.0, when - time.time()) + 0.05
            self._wake = (when, self.loop.call_later(delay, self._woken))

    def _woken(self) -> None:
        self._wake = None
        self.schedule()
    def _start(self, job: Job, gpu_ids: tuple[int, ...]) -> None:
        self.runner.start(job, gpu_ids)
        if gpu_ids:
            self.gpu_watch.rearm()  # its GPU memory is sampled while it runs

    def _job_ended(self, job: Job) -> None:
        self.gpu_watch.job_ended(job)
        if self.slurm is None:
            self.dispatcher.job_ended(job)
        else:
            # A job run here before the switch to Slurm: its queue is Slurm's now.
            self.table.drop_transparent(job)

    def metrics_state(self) -> MetricsState:
        """What the Prometheus textfile shows now (tsd.metrics)."""
        gpus, _ = self.gpus.cached()
        pool = self.gpus.pool()
        held, _ = self.table.gpu_holders()
        return MetricsState(
            jobs=list(self.table.jobs.values()),
            slots_total=self.policy.total_slots(),
            slots_used=self.table.used_slots(),
            gpus=gpus,
            gpu_pool=None if pool is None else len(pool),
            gpus_allocated=len(held),
            totals=self.store.usage_totals(),
            now=time.time(),
        )

    async def _refresh_gpus_for_metrics(self) -> None:
        # A machine without NVML is not asked again every few seconds.
        if self.gpus.absent() is None:
            await self.gpus.snapshot(max_age=self.metrics.interval)

    async def handle(
        self, creds: tuple[int, int, int], req: protocol.Request, send: SendEvent
    ) -> protocol.Response:
        """Serve one request (the server's handler)."""
        return await handlers.handle(self.parts, creds, req, send)

    def reload(self) -> None:
        """SIGHUP: apply the config file, or keep the old one and say why."""
        if not self.settings.config_path:
            return
        try:
            config = _load_config(self.settings.config_path)
        except ConfigError as exc:
            log.error("config not reloaded, keeping the previous one: %s", exc)
            return
        if config.cluster.engine != self.policy.config.cluster.engine:
            log.warning("cluster.engine changes to %s at the next restart "
                        "(systemctl restart tsd), not at a reload", config.cluster.engine)
            config = dataclasses.replace(config, cluster=dataclasses.replace(
                config.cluster, engine=self.policy.config.cluster.engine))
        self.policy.reload(config)
        self.gpus.expire(keep_problem=False)
        log.info("config reloaded from %s", self.settings.config_path)
        log_name_warnings(config)
        self.schedule()

    def save_list(self) -> None:
        """TS_SAVELIST: export the job list as text when the daemon stops."""
        if not self.settings.save_list:
            return
        from tsd.render import list_text

        text = list_text(
            list(self.table.listing()), self.policy.total_slots(), self.table.used_slots(), False
        )
        with contextlib.suppress(OSError):
            Path(self.settings.save_list).write_text(text)

    def prune_history(self) -> None:
        """Drop accounting history beyond accounting.keep_days: at start, then daily."""
        try:
            self.ledger.prune()
        except Exception as exc:  # a full disk or a locked db: try again tomorrow
            log.warning("accounting history not pruned: %s", exc)
        self._prune = self.loop.call_later(PRUNE_EVERY, self.prune_history)

    async def run(self, sock: socket.socket) -> None:
        """Serve until -K, SIGTERM or SIGINT. Running jobs are left running."""
        self.runner.launcher.start()  # the spawner loads while the state does
        heap.steady()
        heap.fewer_collections()
        with gc_paused_then_frozen():
            running = self.table.load()
        if len(self.table.jobs) >= heap.BIG:
            heap.give_back()  # what the load made and dropped (rows, JSON, SQLite's cache)
        # Jobs run here (also those left from before a switch to Slurm) stay the runner's.
        self.runner.recover([j for j in running if j.slurm_id is None])
        if self.slurm is not None:
            self.slurm.recover()
            self.slurm.start()
        self.prune_history()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stopping.set)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        server = Server(sock, self.handle, self.connection_limits, durable=self.table.durable)
        await server.start()
        sd_notify("READY=1\nSTATUS=serving")
        self.gpu_watch.rearm()  # re-adopted GPU jobs, or the system service's outside watch
        mode = "system" if self.settings.system else "user"
        log.info("tsd %s serving (%s mode)", __version__, mode)
        self.schedule()
        self.idle.start()
        self.metrics.start()
        await self.stopping.wait()
        sd_notify("STOPPING=1")
        self.save_list()
        await self.idle.stop()
        await self.metrics.stop()
        await server.close()
        await self.runner.drain()
        if self.slurm is not None:
            await self.slurm.stop()
        if not self.settings.system and self.settings.socket_path:
            with contextlib.suppress(OSError):
                os.unlink(self.settings.socket_path)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.runner.launcher.close()
        # The open group is committed first: its callbacks (a go, a watch) run now, and
        # nothing is watched or timed after _quiet.
        self.store.close_group()
        self._quiet()
        self.store.close()
        log.info("tsd stopped; %d running jobs keep running", len(self.table.running))

    def _quiet(self) -> None:
        # asyncio.run turns the loop a few more times after we return: no timer or
        # reader of ours may then schedule, poll, prune or record an end on a closed
        # store.
        if self._wake is not None:
            self._wake[1].cancel()
            self._wake = None
        if self._prune is not None:
            self._prune.cancel()
        self.gpus.stop_poll()
        self.gpus.stop_sample()
        self.runner.stop_watching()
        self._stopped = True

    def connection_limits(self) -> ConnectionLimits:
        """The server's caps: the config's on the system service, TS_MAXCONN on a personal one."""
        if not self.settings.system:
            return ConnectionLimits(total=self.settings.max_connections)
        c = self.policy.config.connections
        return ConnectionLimits(c.max, c.per_user, c.waiting_per_user)

    def _on_hup(self) -> None:
        sd_notify("RELOADING=1")
        self.reload()
        sd_notify("READY=1")


async def serve(settings: Settings, config: Config, sock: socket.socket) -> None:
    """Build the daemon on the running loop and serve until told to stop."""
    await Daemon(settings, config, asyncio.get_running_loop()).run(sock)


def name_warnings(config: Config) -> list[str]:
    """The config's users, groups and admins that do not exist on this machine."""
    import grp
    import pwd

    def user_exists(name: str) -> bool:
        try:
            pwd.getpwnam(name)
        except KeyError:
            return False
        return True

    def group_exists(name: str) -> bool:
        try:
            grp.getgrnam(name)
        except KeyError:
            return False
        return True

    return unknown_names(config, user_exists, group_exists)


def log_name_warnings(config: Config) -> None:
    """Log each unknown name once, at start and at reload, where admins look (the journal)."""
    for warning in name_warnings(config):
        log.warning("config: %s", warning)


def sd_notify(message: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


def _lock(state_dir: Path) -> int | None:
    """One daemon per state dir; None when another holds it."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def personal_state_dir(env: dict[str, str]) -> Path:
    """$XDG_STATE_HOME/tsd, else ~/.local/state/tsd."""
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "tsd"


def run_daemon(system: bool, config_path: str | None, socket_path: str | None) -> int:
    """Start a daemon in the foreground; returns its exit status."""
    env = dict(os.environ)
    if system:
        if os.getuid() != 0:
            print("tsd: --system must run as root", file=sys.stderr)
            return 1
        path = config_path or SYSTEM_CONFIG
        try:
            config = _load_config(path) if os.path.exists(path) or config_path else Config()
        except ConfigError as exc:
            print(f"tsd: {exc}", file=sys.stderr)
            return 1
        settings = Settings(
            system=True,
            state_dir=Path(os.environ.get("STATE_DIRECTORY", SYSTEM_STATE).split(":")[0]),
            socket_path=socket_path or SYSTEM_SOCKET,
            config_path=path,
        )
    else:
        from tsd.client import personal_socket_path

        try:
            config = _load_config(config_path) if config_path else Config()
        except ConfigError as exc:
            print(f"tsd: {exc}", file=sys.stderr)
            return 1
        settings = Settings(
            system=False,
            state_dir=personal_state_dir(env),
            socket_path=socket_path or personal_socket_path(env),
            config_path=config_path,
            max_connections=int(env.get("TS_MAXCONN", "1000") or 1000),
            save_list=env.get("TS_SAVELIST") or None,
            on_finish=env.get("TS_ONFINISH") or None,
        )
    lock = _lock(settings.state_dir)
    if lock is None:
        print("tsd: another daemon already runs on this state", file=sys.stderr)
        return 0
    daemonlog.setup(system, settings.state_dir, env)
    if not system and not config_path:
        config = personal_config(env)  # after logging is set up: it may complain
    if system:
        log_name_warnings(config)
    with contextlib.suppress(OSError):  # informational; a full disk must not stop the start
        (settings.state_dir / "tsd.pid").write_text(f"{os.getpid()}\n")
    sock = inherited_socket()
    if sock is None:
        assert settings.socket_path is not None
        try:
            if system:
                sock = bind_system(settings.socket_path, SUBMIT_GROUP)
            else:
                sock = bind_personal(settings.socket_path)
        except FileExistsError as exc:
            print(f"tsd: {exc}", file=sys.stderr)
            return 0
        except OSError as exc:
            log.error("cannot listen on %s: %s", settings.socket_path, exc)
            print(f"tsd: cannot listen on {settings.socket_path}: {exc}", file=sys.stderr)
            return 1
    if system:
        warn_unenforced_limits()
    try:
        asyncio.run(serve(settings, config, sock))
    except StoreError as exc:
        # One line, then a non-zero exit: systemd restarts us a few times and then
        # gives up (StartLimitBurst), instead of a loop of tracebacks in the journal.
        log.error("%s", exc)
        if not system:
            print(f"tsd: {exc}", file=sys.stderr)
        return 1
    return 0


def limits_warning() -> str | None:
    """Why tsd.yaml's job limits are not enforced on this machine, or None when they are."""
    from tsd.cgroupcheck import read_controller_status

    return read_controller_status().warning()


def warn_unenforced_limits() -> None:
    """At start of the system service: say in the log when job limits cannot be enforced."""
    warning = limits_warning()
    if warning is not None:
        log.warning("%s", warning)


def check_config(path: str = SYSTEM_CONFIG) -> int:
    """tsd --check-config [FILE]: validate for admins; one line either way.

    Users and groups the file names that do not exist here are warnings on
    stderr, not failures: the exit status (which `systemctl reload` relies on)
    says only whether the daemon would accept the file.
    """
    if path == SYSTEM_CONFIG and not os.path.exists(path):
        # What the service does too: no file means every default.
        print(f"{path}: absent; the service runs with the defaults")
        return 0
    try:
        config = _load_config(path)
    except ConfigError as exc:
        print(f"tsd: {exc}", file=sys.stderr)
        return 1
    for warning in name_warnings(config):
        print(f"tsd: warning: {path}: {warning}", file=sys.stderr)
    print(f"{path}: OK ({config.slots} slots, {len(config.users)} user and "
          f"{len(config.groups)} group overrides)")
    # A valid file whose limits this machine cannot enforce is still valid (exit 0),
    # but the admin must not believe memory_max and friends hold.
    limits = limits_warning()
    if limits is not None:
        print(f"tsd: warning: {limits}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `tsd`."""
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--system", "mode", flag_value="system", help="Run as the root service.")
    @click.option("--user", "mode", flag_value="user", default=True, help="Run a personal daemon.")
    @click.option("--config", "config_path", metavar="PATH", help="Config file to use.")
    @click.option("--socket", "socket_path", metavar="PATH", help="Socket to listen on.")
    @click.option(
        "--check-config",
        metavar="[FILE]",
        is_flag=False,
        flag_value=SYSTEM_CONFIG,
        help=f"Validate a config file (default {SYSTEM_CONFIG}) and exit.",
    )
    @click.version_option(__version__, "-V", "--version", prog_name="tsd")
    def cli(mode: str, config_path: str | None, socket_path: str | None,
            check_config: str | None) -> None:
        """tsd: the task spooler daemon."""
        if check_config:
            sys.exit(globals()["check_config"](check_config))
        sys.exit(run_daemon(mode == "system", config_path, socket_path))

    cli.main(args=argv, prog_name="tsd")


if __name__ == "__main__":
    main()
