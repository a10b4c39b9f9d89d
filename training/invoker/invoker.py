"""Containers (a real cgroup v1/v2 or a real Docker container, each holding one long-lived
worker) and the asyncio trace replay.

One container per function, one invocation at a time per container (as an OpenWhisk action
container): later arrivals wait for it, which is the response time's queueing. For every invocation
the invoker calls the sidecar's hook (``POST /v1/invocations`` before, ``.../end`` after, on the
sidecar's unix socket) when one is given, with ``pending`` every arrival on the invoker not yet
started (all containers: the simulator's admission queue, not only the function's own backlog), runs
the function in the container's worker and records execution time (measured inside the worker),
response time (arrival to completion) and outcome (``success``, ``failure``, ``timeout``, ``oom``:
the kernel killed the worker; a dead worker is restarted, the invocation is not retried). The caller
owns cleanup: ``Containers.stop()`` kills every worker and removes every cgroup (or Docker
container), and is safe to call twice.

With ``memory_mb`` the invoker also has a ``MemoryPool``: a call whose container is free still
waits until its allocation's memory fits beside the calls running, as in a container pool with a
memory limit (off by default: this host's memory is never short).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sidecar import cgroups
from sidecar.units import MB
from training.invoker.functions import BY_NAME, DEFAULT_RATIO, SPECS, FunctionSpec

if TYPE_CHECKING:
    from sidecar.dockerd import DockerEngine
    from training.baselines import BaselineRule

_PR_SET_PDEATHSIG = 1
# The workers' BLAS/OpenMP pools: 2 threads (this host's cores), not one per core of the machine.
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


@dataclass(frozen=True)
class Arrival:
    """One invocation of the replayed schedule (the sidecar's own ``Invocation`` is another)."""

    idx: int
    t_s: float  # arrival, seconds after the replay starts
    container: str  # container name (== function name here)
    size: float


@dataclass
class Measurement:
    """What the invoker measured of one arrival: times, outcome and the allocation it ran at."""

    idx: int
    function: str
    size: float
    arrival_s: float
    start_s: float = 0.0
    exec_s: float = 0.0
    response_s: float = 0.0
    outcome: str = "lost"
    kind: str = "user"  # the sidecar's allocation kind (harvested / accelerated / user)
    cpu_cores: float = 0.0
    mem_mb: float = 0.0
    give_backs: int = 0
    held_core_s: float | None = None  # what the sidecar's end hook says the call held, give-backs
    held_mb_s: float | None = None  # included (NaN: it did not say); None: no sidecar ran it
    pending: int = 0  # the other arrivals not yet started when its container came free (the hook)
    error: str | None = None
    units: tuple[int, int] | None = None  # the sidecar's choice and its inputs, in grid units:
    user_units: tuple[int, int] | None = None  # the user's size,
    allowed: tuple[int, int, int, int] | None = None  # the safeguard's box (cpu lo, hi, mem lo, hi)


def schedule(
    minutes: float,
    speedup: float = 15.0,
    seed: int = 0,
    functions: list[FunctionSpec] | None = None,
) -> list[Arrival]:
    """The bundled Azure sample's arrivals, ``speedup`` trace minutes per real minute.

    Trace function i is played by ``functions[i % len(functions)]``; with more functions than
    the trace has, function k also plays trace function ``k % n`` (n trace functions), the two
    taking its invocations in turn. Each invocation's input is drawn log-uniformly in the
    function's range from ``seed`` (the same for every manager). Longer slices than the 60-minute
    sample wrap around it.
    """
    from training.traces import sample_trace

    functions = functions or SPECS
    trace = sample_trace()
    times, fns = trace.arrivals(seed)
    span = trace.minutes * 60.0
    horizon = minutes * 60.0 * speedup  # trace seconds to play
    reps = max(1, math.ceil(horizon / span))
    all_t = np.concatenate([times + k * span for k in range(reps)])
    all_f = np.concatenate([fns] * reps)
    keep = all_t < horizon
    all_t, all_f = all_t[keep] / speedup, all_f[keep]
    u = np.random.default_rng(seed + 1).random(all_t.size)
    n, m = len(trace.functions), len(functions)
    players = [[functions[k % m] for k in range(i, max(n, m), n)] for i in range(n)]
    turns = [0] * n
    out = []
    for i, (t, f) in enumerate(zip(all_t, all_f, strict=True)):
        group = players[int(f)]
        spec = group[turns[int(f)] % len(group)]
        turns[int(f)] += 1
        out.append(Arrival(i, float(t), spec.name, float(spec.input_size(u[i]))))
    return out


def child_setup(cg: cgroups.Cgroup | None = None) -> Callable[[], None]:
    """A ``preexec_fn`` for the invoker's children: join ``cg`` (when given) and die with the
    invoker (``PR_SET_PDEATHSIG``), so no worker or sidecar outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    join = cgroups.join_in_child(cg) if cg is not None else None

    def setup() -> None:  # in the child between fork and exec
        if join is not None:
            join()
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return setup


class WorkerContainer(abc.ABC):
    """What both container kinds share: the user's size, one invocation at a time, and the
    worker's JSON-line protocol (``training/invoker/worker.py``) on the container's stdin/stdout.

    ``cg`` is the container's cgroup while it runs: the baseline rules write their allocations
    there (``Invoker._managed_run``), as the sidecar does, whatever started the container."""

    def __init__(self, spec: FunctionSpec, ratio: float = DEFAULT_RATIO) -> None:
        self.spec = spec
        self.name = spec.name
        self.user_mem_mb = spec.mem_mb
        self.user_cpu = round(spec.mem_mb * ratio, 3)
        self.cg: cgroups.Cgroup | None = None
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.restarts = 0
        self._stdin: asyncio.StreamWriter | None = None
        self._stdout: asyncio.StreamReader | None = None

    @property
    @abc.abstractmethod
    def sidecar_id(self) -> str:
        """The id the sidecar's hook API knows this container by (its runtime's container id)."""

    @property
    def user_limits(self) -> cgroups.Limits:
        return container_limits(self.user_cpu, self.user_mem_mb)

    @abc.abstractmethod
    async def start(self) -> None:
        """Create the container at the user's size and start its worker (``_spawn``)."""

    @abc.abstractmethod
    async def _spawn(self) -> None:
        """Start the worker, set ``_stdin``/``_stdout`` and wait for it (``_ready``)."""

    @abc.abstractmethod
    async def _kill(self) -> None:
        """Kill the worker (a timed-out invocation)."""

    @abc.abstractmethod
    async def _wait_exit(self) -> int | None:
        """Wait until the worker is gone; its exit code. Afterwards ``oom_kills`` counts it if
        the kernel killed it for memory."""

    @abc.abstractmethod
    def oom_kills(self) -> int:
        """OOM kills in this container so far."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Kill the worker and remove the container; safe to call twice."""

    async def _ready(self) -> None:
        assert self._stdout is not None
        line = await asyncio.wait_for(self._stdout.readline(), 120)
        if not line.startswith(b'{"ready"'):
            raise RuntimeError(f"worker {self.name} did not start: {line!r}")

    def limits(self) -> cgroups.Limits | None:
        try:
            return self.cg.read_limits() if self.cg is not None else None
        except cgroups.CgroupError:
            return None

    async def run(
        self, size: float, timeout_s: float = 120.0, respawn: bool = True
    ) -> tuple[float, str, str | None]:
        """(execution seconds, outcome, error) of one invocation in the worker.

        Outcomes: ``success``, ``failure`` (the function raised, or the worker crashed),
        ``timeout`` (killed after ``timeout_s``), ``oom`` (the kernel killed the worker). A dead
        worker is started again unless ``respawn`` is false (``bench curves`` probes an OOM last
        and leaves it dead)."""
        assert self._stdin is not None and self._stdout is not None
        oom_before = self.oom_kills()
        t0 = time.perf_counter()
        timed_out = False
        try:
            self._stdin.write(json.dumps({"size": size}).encode() + b"\n")
            await self._stdin.drain()
            line = await asyncio.wait_for(self._stdout.readline(), timeout_s)
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        except TimeoutError:
            await self._kill()
            line, timed_out = b"", True
        if line:
            reply = json.loads(line)
            if reply.get("ok"):
                return float(reply["exec_s"]), "success", None
            return time.perf_counter() - t0, "failure", reply.get("error")
        elapsed = time.perf_counter() - t0
        code = await self._wait_exit()  # the worker died: OOM kill (or a crash); start a new one
        outcome = "oom" if self.oom_kills() > oom_before else "timeout" if timed_out else "failure"
        if respawn:
            self.restarts += 1
            await self._spawn()
        return elapsed, outcome, f"worker exited {code}"


class Container(WorkerContainer):
    """A real cgroup ``<parent>/<name>`` at the user's size holding one worker process: v1 (cpu,
    cpuacct, memory hierarchies) or v2 (the unified hierarchy), as the host has it."""

    def __init__(self, parent: str, spec: FunctionSpec, ratio: float = DEFAULT_RATIO) -> None:
        super().__init__(spec, ratio)
        self.rel = f"{parent}/{spec.name}"
        self.version: int | None = None  # the host's cgroup version, known at start()
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def sidecar_id(self) -> str:
        return self.rel  # the cgroupfs runtime's id: the path under its parent

    async def start(self) -> None:
        self.version = cgroups.detect_version()
        self.cg = cgroups.create(self.rel, version=self.version)
        self.cg.write_limits(self.user_limits, headroom_bytes=0, force=True)
        await self._spawn()

    async def _spawn(self) -> None:
        assert self.cg is not None
        env = {**os.environ, **WORKER_ENV}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "training.invoker.worker",
            self.spec.name,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            preexec_fn=child_setup(self.cg),
            start_new_session=True,  # Ctrl-C reaches the invoker only; it stops the workers
        )
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
        await self._ready()

    async def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def _wait_exit(self) -> int | None:
        assert self.proc is not None
        return await self.proc.wait()

    def oom_kills(self) -> int:
        """The kernel's counter: v1 ``memory.oom_control``, v2 ``memory.events`` ``oom_kill``."""
        try:
            return self.cg.read_usage(slow=False).oom_kills if self.cg is not None else 0
        except cgroups.CgroupError:
            return 0

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                pass
        self.proc = None
        if self.cg is not None:
            self.cg.close()
            self.cg = None
        if self.version is not None:
            cgroups.remove(self.rel, version=self.version)


def remove_parent(parent: str) -> None:
    """Remove the (empty) parent cgroup of a run's containers."""
    cgroups.remove(parent)


class Containers(dict[str, WorkerContainer]):
    """name -> container of each function; ``stop()`` removes them all (and their parent).

    ``engine``: real Docker containers on that engine (``DockerContainer``, named after
    ``parent``) instead of bare cgroups under ``parent``."""

    def __init__(
        self,
        parent: str,
        specs: list[FunctionSpec],
        ratio: float = DEFAULT_RATIO,
        engine: DockerEngine | None = None,
    ) -> None:
        if engine is None:
            super().__init__((s.name, Container(parent, s, ratio)) for s in specs)
        else:
            from training.invoker.docker_container import DockerContainer

            super().__init__(
                (s.name, DockerContainer(engine, parent, n, s, ratio)) for n, s in enumerate(specs)
            )
        self.parent = parent
        self.engine = engine

    async def start(self, warm: bool = True) -> None:
        """Start every container; if one fails, raise only once the others' starts are over, so
        the caller's ``stop()`` finds every worker and cgroup (none is made after it)."""
        results = await asyncio.gather(*(c.start() for c in self.values()), return_exceptions=True)
        if errors := [r for r in results if isinstance(r, BaseException)]:
            raise errors[0]
        if warm:  # one unrecorded mid-size run each, one at a time: warm allocator, caches, BLAS
            for c in self.values():
                await c.run(c.spec.input_size(0.5))

    async def stop(self) -> None:
        errors = []
        for c in self.values():
            try:
                await c.stop()
            except Exception as exc:  # noqa: BLE001 (remove the rest anyway)
                errors.append(exc)
        if self.engine is None:
            try:
                remove_parent(self.parent)
            except cgroups.CgroupError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


class MemoryPool:
    """The host's memory for running invocations, handed out first come, first served, as a
    container pool holds arrivals back while its memory is full: memory a manager harvests admits
    the next arrival sooner, an acceleration's extra holds it back. A call larger than the whole
    pool runs when nothing else does. Held from admission to the end of the run at the
    allocation's size (a give-back during the run is not added)."""

    def __init__(self, mb: float) -> None:
        if not mb > 0:
            raise ValueError(f"a memory pool needs some memory, got {mb} MB")
        self.mb = mb
        self.used = 0.0
        self._queue: deque[tuple[float, asyncio.Future[None]]] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, mb: float) -> AsyncIterator[None]:
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((mb, fut))
        self._admit()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted as the cancel came: hand it back
                self._release(mb)
            raise
        try:
            yield
        finally:
            self._release(mb)

    def _release(self, mb: float) -> None:
        self.used -= mb
        self._admit()

    def _admit(self) -> None:
        while self._queue and (self.used == 0 or self.used + self._queue[0][0] <= self.mb):
            mb, fut = self._queue.popleft()
            if not fut.cancelled():
                self.used += mb
                fut.set_result(None)


@dataclass
class Progress:
    total: int = 0
    done: int = 0
    running: int = 0
    waiting: int = 0  # arrived, not yet started: the hook's ``pending``
    failures: int = 0
    records: list[Measurement] = field(default_factory=list)


class Invoker:
    """Replays a schedule over ``containers``, through the sidecar's hooks (on its unix socket)
    when ``sidecar_socket``."""

    def __init__(
        self,
        containers: Containers,
        sidecar_socket: str | Path | None = None,
        rule: BaselineRule | None = None,
        baselines: dict[str, float] | None = None,
        headroom_mb: float = 16.0,
        memory_mb: float | None = None,
    ) -> None:
        """``memory_mb``: the host's memory for running invocations (``MemoryPool``); None: no
        limit, every call starts as soon as its container is free.

        ``rule``: a baseline rule (``training.baselines``) the invoker applies itself (no
        sidecar): its allocation is written before each invocation (memory never below current
        usage + ``headroom_mb``; if refused, the user's memory stays) and the user's size restored
        after it; the rule observes the measured CPU/memory peak and time, and ``baselines[fn]``
        as the function's time at the user's size (ENSURE's reference: the Fixed run's mean)."""
        self.containers = containers
        self.sidecar_socket = sidecar_socket
        self.rule = rule
        self.baselines = baselines or {}
        self.headroom_bytes = int(headroom_mb * MB)
        self.pool = MemoryPool(memory_mb) if memory_mb is not None else None
        self.progress = Progress()

    @contextlib.asynccontextmanager
    async def _admitted(self, rec: Measurement, t0: float) -> AsyncIterator[None]:
        """Wait for the pool to hold the allocation's memory, then count the call as started."""
        async with self.pool.hold(rec.mem_mb) if self.pool else contextlib.nullcontext():
            self.progress.waiting -= 1
            self.progress.running += 1
            rec.start_s = time.monotonic() - t0
            try:
                yield
            finally:
                self.progress.running -= 1

    async def replay(self, invocations: list[Arrival]) -> list[Measurement]:
        import aiohttp

        self.progress = Progress(total=len(invocations))
        t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=10)
        sock = self.sidecar_socket
        connector = aiohttp.UnixConnector(str(sock)) if sock else None
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            tasks = [asyncio.create_task(self._one(inv, t0, http)) for inv in invocations]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _hook(self, http, path: str, body: dict) -> dict | None:
        try:
            async with http.post("http://localhost" + path, json=body) as r:
                data = await r.json(content_type=None)
                return data if r.status == 200 else {"error": data}
        except Exception as exc:  # noqa: BLE001 (a sidecar problem must not stop the replay)
            return {"error": repr(exc)}

    async def _one(self, inv: Arrival, t0: float, http) -> Measurement:
        c = self.containers[inv.container]
        await asyncio.sleep(max(0.0, t0 + inv.t_s - time.monotonic()))
        rec = Measurement(
            inv.idx, c.name, inv.size, inv.t_s, cpu_cores=c.user_cpu, mem_mb=c.user_mem_mb
        )
        arrived = time.monotonic()
        c.waiting += 1
        self.progress.waiting += 1
        async with c.lock:
            c.waiting -= 1
            rec.pending = self.progress.waiting - 1  # the others not yet started
            inv_id = None
            if self.sidecar_socket:
                start = await self._hook(
                    http,
                    "/v1/invocations",
                    {
                        "container": c.sidecar_id,
                        "function": c.name,
                        "input_size": inv.size,
                        "user": {"cpu_cores": c.user_cpu, "mem_mb": c.user_mem_mb},
                        "pending": rec.pending,
                    },
                )
                if start and "invocation" in start:
                    inv_id = start["invocation"]
                    alloc = start.get("allocation") or {}
                    rec.kind = alloc.get("kind", "user")
                    rec.cpu_cores = float(alloc.get("cpu_cores", c.user_cpu))
                    rec.mem_mb = float(alloc.get("mem_bytes", c.user_mem_mb * MB)) / MB
                    box = start.get("allowed") or {}
                    if "units" in alloc and "cpu_units" in box:
                        rec.units = tuple(alloc["units"])
                        rec.user_units = tuple(start["user"]["units"])
                        rec.allowed = (*box["cpu_units"], *box["mem_units"])
                else:
                    rec.error = f"hook start: {start}"
            if self.rule is not None:
                err = await self._managed_run(c, inv, rec, t0)
            else:
                async with self._admitted(rec, t0):
                    rec.exec_s, rec.outcome, err = await c.run(inv.size)
            rec.error = rec.error or err
            if inv_id is not None:
                end = await self._hook(
                    http,
                    f"/v1/invocations/{inv_id}/end",
                    {
                        "outcome": "success" if rec.outcome == "success" else "failure",
                        "duration_s": rec.exec_s,
                    },
                )
                rec.give_backs = len((end or {}).get("give_backs") or [])
                rec.held_core_s = _held(end, "held_core_s")
                rec.held_mb_s = _held(end, "held_mb_s")
        rec.response_s = time.monotonic() - arrived
        self.progress.done += 1
        self.progress.failures += rec.outcome != "success"
        self.progress.records.append(rec)
        return rec

    async def _managed_run(
        self, c: WorkerContainer, inv: Arrival, rec: Measurement, t0: float
    ) -> str | None:
        """Apply the rule's allocation, run, measure, restore the user's size, observe."""
        from training.baselines import Run

        assert c.cg is not None and self.rule is not None
        g = self.rule.grid
        want_cpu, want_mem = self.rule.decide(c.name)
        cpu = c.user_cpu if want_cpu is None else g.cores(want_cpu)
        mem_mb = c.user_mem_mb if want_mem is None else g.mb(want_mem)
        err = None
        try:
            c.cg.write_limits(container_limits(cpu, mem_mb), headroom_bytes=self.headroom_bytes)
        except (ValueError, cgroups.CgroupError) as exc:  # memory refused: keep the user's
            mem_mb, err = c.user_mem_mb, f"limit refused: {exc}"
            try:
                c.cg.write_limits(container_limits(cpu, mem_mb), headroom_bytes=self.headroom_bytes)
            except (ValueError, cgroups.CgroupError) as exc2:
                cpu, err = c.user_cpu, f"limits refused: {exc2}"
                c.cg.read_limits()
        rec.cpu_cores, rec.mem_mb = cpu, mem_mb
        rec.kind = kind(c.user_cpu, c.user_mem_mb, cpu, mem_mb)
        try:
            c.cg.reset_peak()
        except cgroups.CgroupError:
            pass
        async with self._admitted(rec, t0):
            u0 = c.cg.read_usage(oom=False, slow=True)
            started = time.monotonic()
            try:
                rec.exec_s, rec.outcome, run_err = await c.run(inv.size)
            finally:
                wall = max(1e-6, time.monotonic() - started)
                u1 = c.cg.read_usage(oom=False, slow=True)
                try:  # back to the user's size (the kernel reclaims cache when memory goes down)
                    c.cg.write_limits(c.user_limits, headroom_bytes=0, force=True)
                except cgroups.CgroupError:
                    c.cg.read_limits()  # retried through the diff at the next invocation
        self.rule.observe(
            c.name,
            Run(
                cpu_cores=cpu,  # what the container actually had
                mem_mb=mem_mb,
                cpu_peak_cores=max(0.0, u1.cpu_usage_s - u0.cpu_usage_s) / wall,
                mem_peak_mb=max(u1.mem_peak_bytes, u1.mem_bytes) / MB,
                exec_s=rec.exec_s,
                baseline_s=self.baselines.get(c.name, math.nan),
                failed=rec.outcome != "success",
                oom=rec.outcome == "oom",
            ),
        )
        return run_err or err


def _held(end: dict | None, key: str) -> float:
    """A figure of the end hook's answer; NaN when it has none (a failed hook): such a call is
    left out of the resource figures rather than credited with its start allocation."""
    v = (end or {}).get(key)
    return float(v) if isinstance(v, int | float) else math.nan


def kind(user_cpu: float, user_mem_mb: float, cpu: float, mem_mb: float) -> str:
    """harvested (less of some resource, more of none), accelerated (more of some), or user:
    the sidecar's classification (``sidecar.engine``'s allocation kind)."""
    more = cpu > user_cpu + 1e-9 or mem_mb > user_mem_mb + 1e-9
    less = cpu < user_cpu - 1e-9 or mem_mb < user_mem_mb - 1e-9
    if more:
        return "accelerated"
    return "harvested" if less else "user"


def container_limits(cpu_cores: float, mem_mb: float, period_us: int = 100_000) -> cgroups.Limits:
    """A container's limits: CFS quota = cores, weight 100 x cores (OpenWhisk-style), memory."""
    return cgroups.Limits(
        cpu_quota_cores=cpu_cores,
        cpu_period_us=period_us,
        cpu_weight=max(1, int(100 * cpu_cores)),
        mem_limit_bytes=int(mem_mb * MB),
    )


def record_dicts(records: list[Measurement]) -> list[dict]:
    return [asdict(r) for r in records]


__all__ = [
    "BY_NAME",
    "Container",
    "Containers",
    "Arrival",
    "Invoker",
    "Measurement",
    "WorkerContainer",
    "schedule",
]
