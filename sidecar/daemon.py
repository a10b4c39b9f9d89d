"""``faasrm sidecar run``: the daemon's wiring (aiohttp owns the whole program).

Start-up, in cleanup-context order (teardown runs in reverse, each only if its start-up half ran):

1. ``_node_ctx``: restore every container left in the state file by a previous run (first, before
   anything slow: a crashed daemon's containers are back at user limits within a second), load
   the model (or the rule fallback), open the spool, discover containers.
   Teardown: end running invocations as lost, restore every container to its user limits, save
   the function profiles.
2. ``_sampling_ctx``: the 100 ms tick on monotonic deadlines: sample, give-back, OOM, inferred
   boundaries; ``READY=1`` after the first tick, ``WATCHDOG=1`` from inside the loop.
   ``_profiles_ctx``: saves what the node learned about each function every ``[actuation]
   profiles_save_s`` (``sidecar.profiles``; read at start-up by ``_node_ctx`` and saved once more
   after its teardown).
3. ``_events_ctx``: one task per runtime event stream (Docker pause/unpause, container changes).
4. ``_shipper_ctx`` (when ``[shipper] enabled``): ships the spool to the trainer
   (``sidecar.shipper``); ``_poller_ctx`` (when ``[model_poller] enabled``): follows the trainer's
   model registry (``sidecar.model_poller``). Each task is cancelled and awaited at teardown
   (the poller then saves its rollback watch's counts).
5. ``_signals_ctx``: SIGHUP reloads config and model. SIGTERM/SIGINT belong to ``run_app``
   (graceful exit: ``STOPPING=1`` in on_shutdown, then the teardowns above).

The API is served on a unix socket (``hook_socket``: mode 0660, owned by ``[server]
socket_group``), the only way to the hooks unless ``[server] tcp_hooks`` lets bearer-token
holders post over TCP too; the TCP listener on ``[server] host:port`` serves everything else
(``sidecar.api.guard_hooks``). Logs are JSON lines on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from sidecar import config as config_mod
from sidecar.actuator import Actuator
from sidecar.api import HOOK_ACCESS, HookAccess, add_routes, guard_hooks
from sidecar.config import Config, ConfigError, ServerConfig
from sidecar.metrics import Metrics
from sidecar.models import ModelManager
from sidecar.node import NODE, Node
from sidecar.process import Notifier, setup_logging, start_site
from sidecar.runtimes.base import Runtime
from sidecar.sampler import Ticker
from sidecar.spool import Spool
from sidecar.units import MB

log = logging.getLogger("faasrm.daemon")

# ------------------------------------------------------------------------------------ app keys
NOTIFIER = web.AppKey("notifier", Notifier)
METRICS = web.AppKey("metrics", Metrics)
CONFIG = web.AppKey("config", Config)
CONFIG_SOURCE = web.AppKey("config_source", tuple)
SAMPLE_TASK = web.AppKey("sample_task", asyncio.Task)
TICKER = web.AppKey("ticker", Ticker)
EVENT_TASKS = web.AppKey("event_tasks", list)


ROLLED_BACK_FILE = "rolled-back-models.json"
"""Beside the state file: the sha256 of every model rolled back on this node
(``ModelManager.rolled_back``)."""


def host_capacity() -> tuple[float, float]:
    import psutil

    return float(psutil.cpu_count() or os.cpu_count() or 1), psutil.virtual_memory().total / MB


def make_runtimes(cfg: Config) -> list[Runtime]:
    """Runtimes tried in order, most specific first; plain cgroups (the catch-all) last."""
    runtimes: list[Runtime] = []
    if cfg.docker.enabled:
        from sidecar.runtimes.docker import DockerRuntime

        d = cfg.docker
        try:
            runtimes.append(
                DockerRuntime(
                    d.base_url or None,
                    cores_per_share=d.cores_per_share or None,
                    namespaces=d.namespaces,
                    cgroup_root=cfg.cgroupfs.root,
                )
            )
        except Exception as exc:  # the engine does not answer: say so, do not half-start
            raise ConfigError(
                f"docker.enabled: cannot reach the Docker Engine at "
                f"{d.base_url or '$DOCKER_HOST or the default socket'}: {exc}"
            ) from None
    if cfg.cgroupfs.enabled:
        from sidecar.runtimes.cgroupfs import CgroupfsRuntime

        cores, mem_mb = host_capacity()
        runtimes.append(CgroupfsRuntime(cfg.cgroupfs, cores, int(mem_mb * MB)))
    return runtimes


# ------------------------------------------------------------------------------------ contexts
async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    metrics = app[METRICS]
    actuator = Actuator.for_config(cfg)
    models = ModelManager(
        cfg.grid,
        cfg.model.path,
        cfg.model.sha256,
        cfg.model.rule,
        rolled_back_file=Path(cfg.actuation.state_file).parent / ROLLED_BACK_FILE,
    )
    spool = Spool(cfg.spool.dir, cfg.spool.max_bytes, cfg.spool.segment_bytes)
    cores, mem_mb = host_capacity()
    node = Node(
        cfg,
        runtimes=make_runtimes(cfg),
        actuator=actuator,
        models=models,
        spool=spool,
        metrics=metrics,
        host_cores=cores,
        host_mem_mb=mem_mb,
    )
    node.recover()  # first: a crashed run's containers go back to user limits now
    node.load_profiles()
    ok = models.load()
    metrics.model_loads.labels("ok" if ok else "rejected").inc()
    metrics.set_policy(models.current.id)
    node.sync_containers()
    app[NODE] = node
    log.info(
        "sidecar started",
        extra={
            "containers": len(node.engine.containers),
            "model": models.ready_note(),
            "node": cfg.node,
        },
    )
    try:
        yield
    finally:
        results = node.shutdown()
        for rt in node.runtimes:
            rt.close()
        log.info("restored user limits", extra={"containers": results})
        node.save_profiles()  # after shutdown: what the runs it cut short had taught is kept


async def _sample_loop(app: web.Application) -> None:
    node = app[NODE]
    notifier = app[NOTIFIER]
    ticker = app[TICKER]
    ready = False
    counted = 0  # ticker.overruns grows between ticks: count what it skipped since the last one

    def tick() -> None:
        nonlocal ready, counted
        if ticker.overruns > counted:
            node.metrics.tick_overruns.inc(ticker.overruns - counted)
            counted = ticker.overruns
        try:
            node.tick()
        except Exception:  # the loop must survive one bad tick; the logs say what happened
            log.exception("tick failed")
            return
        if not ready:
            ready = True
            notifier.ready()
            log.info("ready")
        notifier.watchdog()

    def tick_oom() -> None:
        try:
            node.tick_oom()
        except Exception:
            log.exception("OOM wake-up failed")

    loop, watched = asyncio.get_running_loop(), node.sampler.oom_fd()
    loop.add_reader(watched, tick_oom)
    try:
        await ticker.run(tick)
    finally:
        loop.remove_reader(watched)


async def _sampling_ctx(app: web.Application) -> AsyncIterator[None]:
    app[TICKER] = Ticker(app[NODE].cfg.sampler.tick_s)  # a reload changes its period
    task = asyncio.create_task(_sample_loop(app), name="faasrm-sampler")
    app[SAMPLE_TASK] = task
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _profiles_loop(app: web.Application, stop: asyncio.Event) -> None:
    node = app[NODE]
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), node.cfg.actuation.profiles_save_s)
        if stop.is_set():
            return
        if node.cfg.actuation.profiles_path is not None:
            data = node.profiles_snapshot()  # on the loop: one consistent view
            await asyncio.to_thread(node.save_profiles, data)


async def _profiles_ctx(app: web.Application) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(_profiles_loop(app, stop), name="faasrm-profiles")
    yield
    stop.set()  # not a cancel: a save under way in its thread finishes before the shutdown's own
    await task


async def _consume_events(app: web.Application, runtime: Runtime) -> None:
    """Hand one runtime's pushed changes to the node until the stream ends or a reload
    replaces the runtime (its successor has a consumer of its own)."""
    node = app[NODE]
    async for ev in runtime.events():
        if node.runtimes and runtime not in node.runtimes:
            return
        try:
            node.on_runtime_event(runtime, ev)
        except Exception:
            log.exception("runtime event failed", extra={"runtime": runtime.name, "event": ev.kind})


def _start_consumers(app: web.Application, runtimes: list[Runtime]) -> None:
    tasks = app.get(EVENT_TASKS)
    if tasks is None:  # before _events_ctx: it starts them
        return
    tasks[:] = [t for t in tasks if not t.done()]
    for rt in runtimes:
        tasks.append(
            asyncio.get_running_loop().create_task(
                _consume_events(app, rt), name=f"faasrm-events-{rt.name}"
            )
        )


async def _events_ctx(app: web.Application) -> AsyncIterator[None]:
    app[EVENT_TASKS] = []
    _start_consumers(app, app[NODE].runtimes)
    yield
    tasks = app[EVENT_TASKS]  # reloads may have replaced some
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t


async def _shipper_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    if not cfg.shipper.enabled:
        yield
        return
    from sidecar.shipper import SHIPPER, Shipper

    node = app[NODE]
    shipper = Shipper(node.spool, cfg.shipper, cfg.shipper.resolve_token(), app[METRICS])
    app[SHIPPER] = shipper
    task = asyncio.create_task(shipper.run(), name="faasrm-shipper")
    log.info(
        "shipping trajectories",
        extra={"url": cfg.shipper.url, "next_seq": shipper.state.next_seq},
    )
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _poller_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[CONFIG]
    if not cfg.model_poller.enabled:
        yield
        return
    from sidecar.model_poller import POLLER, ModelPoller

    poller = ModelPoller(
        app[NODE],
        cfg.model_poller,
        cfg.model_poller.url or cfg.shipper.url,
        app[METRICS],
        token=cfg.shipper.resolve_token(),
        ssl_context=cfg.shipper.ssl_context(),
    )
    poller.restore_active()
    app[POLLER] = poller
    task = asyncio.create_task(poller.run(), name="faasrm-model-poller")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    poller.close()


async def reload(app: web.Application) -> bool:
    """SIGHUP: re-read the config file and the model; False if the new config was refused. The
    runtimes are built and listed in a worker thread (a Docker API call can take seconds), so
    the loop keeps ticking and serving meanwhile."""
    path, overrides = app[CONFIG_SOURCE]
    node = app[NODE]
    try:
        new = config_mod.load(path, overrides)
    except ConfigError as exc:
        log.error("reload refused: bad config, keeping the running one", extra={"reason": str(exc)})
        return False
    old = node.cfg
    if (
        new.grid != old.grid
        or new.actuation.profiles_path != old.actuation.profiles_path
        or new.actuation.state_file != old.actuation.state_file
    ):
        log.error("reload refused: grid, state_file and profiles_file need a restart")
        return False
    if (new.server, new.spool, new.shipper, new.model_poller) != (
        old.server,
        old.spool,
        old.shipper,
        old.model_poller,
    ):
        log.warning(
            "server, spool, shipper and model_poller changes need a restart; applying the rest"
        )
    logging.getLogger().setLevel(new.log_level.upper())
    node.cfg = new
    ticker = app.get(TICKER)
    if ticker is not None and new.sampler.tick_s != ticker.period_s:
        ticker.set_period(new.sampler.tick_s)  # /healthz judges the ticks by the new period
    node.sampler.set_slow_every(new.sampler.slow_every)
    eng = node.engine
    eng.tick_s = new.sampler.tick_s
    eng.sg_cfg, eng.reward_cfg, eng.act_cfg, eng.bounds = (
        new.safeguard,
        new.reward,
        new.actuation,
        new.boundaries,
    )
    node.actuator.headroom_bytes = int(new.safeguard.mem_headroom_mb * MB)
    node.actuator.period_us = new.actuation.cpu_period_us
    node.actuator.oom_hold = new.actuation.oom_hold
    try:
        runtimes = await asyncio.to_thread(make_runtimes, new)
    except ConfigError as exc:
        log.error("reload: keeping the running runtimes", extra={"reason": str(exc)})
        runtimes = None
    if runtimes is not None:
        for rt in node.runtimes:
            rt.close()  # ends their event consumers
        node.runtimes = runtimes
        _start_consumers(app, runtimes)
    await node.relist(full=True)  # containers the new config dropped are restored and forgotten
    models = node.models
    models.configure(new.model.path, new.model.sha256, new.model.rule)
    eng.fallback = models.fallback.scorer
    ok = models.load()
    node.metrics.model_loads.labels("ok" if ok else "rejected").inc()
    from sidecar.model_poller import POLLER

    poller = app.get(POLLER)
    if poller is not None and poller.active_version is not None:
        poller.restore_active("kept across SIGHUP")  # a registry model outranks the local file
    node.metrics.set_policy(models.current.id)
    log.info("reloaded", extra={"model": models.ready_note(), "containers": len(eng.containers)})
    return True


async def _signals_ctx(app: web.Application) -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    lock = asyncio.Lock()  # one reload at a time, in the order of the signals
    reloads: set[asyncio.Task[None]] = set()

    async def reload_in_turn() -> None:
        async with lock:
            await reload(app)

    def on_sighup() -> None:
        task = loop.create_task(reload_in_turn(), name="faasrm-reload")
        reloads.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(reloads.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        installed = True
    except (NotImplementedError, RuntimeError):  # not the main thread (tests)
        installed = False
    yield
    if installed:
        loop.remove_signal_handler(signal.SIGHUP)
    for task in list(reloads):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _stopping(app: web.Application) -> None:
    app[NOTIFIER].stopping()
    log.info("stopping: restoring user limits")


def build_app(
    cfg: Config,
    config_path: str | None = None,
    overrides: dict | None = None,
    notifier: Notifier | None = None,
) -> web.Application:
    app = web.Application(middlewares=[guard_hooks])
    app[CONFIG] = cfg
    app[HOOK_ACCESS] = HookAccess(
        cfg.server.socket, cfg.server.resolve_token() if cfg.server.tcp_hooks else ""
    )
    app[CONFIG_SOURCE] = (config_path, overrides or {})
    app[NOTIFIER] = notifier or Notifier.from_env()
    app[METRICS] = Metrics(cfg.debug.max_function_labels)
    app.cleanup_ctx.append(_node_ctx)
    app.cleanup_ctx.append(_sampling_ctx)
    app.cleanup_ctx.append(_profiles_ctx)
    app.cleanup_ctx.append(_events_ctx)
    app.cleanup_ctx.append(_shipper_ctx)
    app.cleanup_ctx.append(_poller_ctx)
    app.cleanup_ctx.append(_signals_ctx)
    app.on_shutdown.append(_stopping)
    add_routes(app, app[METRICS].registry)
    return app


def hook_socket(server: ServerConfig) -> socket.socket:
    """The API's unix socket, bound (not yet listening): mode 0660, group ``socket_group``, in a
    directory created if needed. ConfigError for a group that does not exist, a path that is not
    a socket, or a socket another daemon still serves."""
    gid = -1
    if server.socket_group:
        try:
            gid = grp.getgrnam(server.socket_group).gr_gid
        except KeyError:
            raise ConfigError(
                f"server.socket_group {server.socket_group!r}: no such group (create it, e.g. "
                f'groupadd --system {server.socket_group}, or set "" for root\'s group)'
            ) from None
    path = Path(server.socket)
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"server.socket {path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                if probe.connect_ex(str(path)) == 0:
                    raise ConfigError(f"server.socket {path} is in use by another process")
            path.unlink()  # left by a run that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))  # nobody can connect before listen(), which run_app does
            os.chmod(path, 0o660)
            os.chown(path, -1, gid)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"server.socket {path}: {exc.strerror or exc}") from None
    return sock


async def serve(app: web.Application, server: ServerConfig, unix: socket.socket | None) -> None:
    """Serve ``app`` on TCP and the unix socket until SIGTERM/SIGINT. A TCP address that cannot
    be listened on (a port in use) is a ConfigError, after the start-up's containers are given
    back by the cleanup."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        keys = f"server.port {server.port} on server.host {server.host!r}"
        await start_site(web.TCPSite(runner, server.host, server.port), keys)
        if unix is not None:
            await web.SockSite(runner, unix).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def run(cfg: Config, config_path: str | None = None, overrides: dict | None = None) -> int:
    setup_logging(cfg.log_level)
    app = build_app(cfg, config_path, overrides)
    unix = hook_socket(cfg.server) if cfg.server.socket else None
    try:
        asyncio.run(serve(app, cfg.server, unix))
    finally:
        if unix is not None:
            Path(cfg.server.socket).unlink(missing_ok=True)
    return 0
