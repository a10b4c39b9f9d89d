"""``faasrm testbed up``: one trainer and N sidecars on this machine, over 127.0.0.1.

Each node is a real ``faasrm sidecar run`` process (``training.processes.SidecarProcess``) managing
its own cgroup v1 subtree ``faasrm-testbed-<id>/node<i>/fn<j>`` (a unique parent per testbed), each
child holding a real worker process. A driver thread per worker plays the invoker: ``POST
/v1/invocations`` on the node's unix socket, tell the worker to burn some CPU, ``POST
/v1/invocations/{id}/end`` with the measured duration. The sidecars spool trajectory records and
ship them to the trainer, which learns, gates and promotes; every sidecar long-polls the registry
and hot-swaps the new model.

``Testbed`` is also the fixture of the end-to-end and fault tests, of ``faasrm bench trainer``
and of ``faasrm bench faults`` (``invoke`` is one invocation as a driver makes it). Everything
it starts is stopped and every cgroup it made is removed by ``stop()`` (also on Ctrl-C). Needs
root and writable cgroup v1 hierarchies.
"""

from __future__ import annotations

import contextlib
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from training.processes import TOKEN, SidecarProcess, TrainerProcess, free_port
from training.service import call_trainer

GRID = {"cpu_unit_cores": 0.25, "cpu_units": 8, "mem_unit_mb": 64.0, "mem_units": 8}
"""Every node's grid (and the trainer's): a quarter core suits this 2-core machine."""
USER_CPU_CORES, USER_MEM_MB = 0.5, 256.0
"""Every worker's user size (its sidecar's ``cgroupfs.default_*``)."""
WORKER = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C: the testbed stops us
print("up", flush=True)
for line in sys.stdin:
    cmd, *a = line.split()
    if cmd == "burn":
        x = 0
        for i in range(int(a[0])):
            x += i * i
        print("done", flush=True)
"""


class Worker:
    """A child cgroup with a worker process in it (one 'container')."""

    def __init__(self, rel: str) -> None:
        from sidecar import cgroups

        self.rel = rel
        self.function = rel.rsplit("/", 1)[-1]
        self.cg = cgroups.create_v1(rel)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=cgroups.join_in_child(self.cg),  # noqa: PLW1509 (no driver thread yet)
        )
        try:
            assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "up"
        except BaseException:  # Ctrl-C while it starts: the caller never gets this Worker
            self.proc.kill()
            self.proc.wait()
            raise

    def burn(self, n: int) -> None:
        self.start_burn(n)
        self.wait_burn()

    def start_burn(self, n: int) -> None:
        """Tell the worker to run ``n`` loop iterations; ``wait_burn`` waits for them."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"burn {n}\n")
        self.proc.stdin.flush()

    def wait_burn(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "done"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except OSError:
                pass
        self.cg.close()


def wait_for(pred: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    """The first truthy ``pred()``, polled every ``poll_s``; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(poll_s)
    raise TimeoutError(f"timed out waiting for {what}")


def invoke(
    node: SidecarProcess, worker: Worker, burn: int, **start: Any
) -> tuple[dict, dict] | None:
    """One invocation as an invoker makes it: the start hook (``start``: more of its fields, e.g.
    ``pending``), ``burn`` loop iterations in the worker, the end hook with the measured
    duration. The start's and the end's answers, or None when either hook refused."""
    st, started = node.call(
        "/v1/invocations",
        {"container": worker.rel, "function": worker.function, **start},
        timeout=5,
    )
    if st != 200:
        return None
    t0 = time.monotonic()
    worker.burn(burn)
    dur = time.monotonic() - t0
    st, ended = node.call(
        f"/v1/invocations/{quote(started['invocation'], safe='')}/end",
        {"outcome": "success", "duration_s": dur},
        timeout=5,
    )
    return (started, ended) if st == 200 else None


class Testbed:
    """One trainer and N sidecars with their workers and driver threads (see the module)."""

    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self,
        nodes: int = 10,
        workers: int = 2,
        workdir: str | Path | None = None,
        trainer_overrides: dict[str, Any] | None = None,
        sidecar_overrides: dict[str, dict[str, Any]] | None = None,
        rate_per_worker: float = 2.0,
        burn: int = 150_000,
        seed: int = 0,
    ) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="faasrm-testbed-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.parent = f"faasrm-testbed-{uuid.uuid4().hex[:8]}"
        self.trainer = TrainerProcess(
            self.workdir,
            free_port(),
            {"grid.cpu_unit_cores": 0.25, "grid.mem_unit_mb": 64.0, **(trainer_overrides or {})},
        )
        self.nodes = [self._node(i, sidecar_overrides or {}) for i in range(nodes)]
        self.workers: dict[str, list[Worker]] = {n.id: [] for n in self.nodes}
        self.n_workers = workers
        self.rate = rate_per_worker
        self.burn_n = burn
        self.rng = random.Random(seed)
        self.produced: dict[str, list[str]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause = threading.Event()
        self._busy = 0
        self._threads: list[threading.Thread] = []
        self.driver_errors = 0

    def _node(self, i: int, extra: dict[str, dict[str, Any]]) -> SidecarProcess:
        node_id = f"node{i}"
        d = self.workdir / node_id
        sections: dict[str, dict[str, Any]] = {
            "grid": GRID,
            "sampler": {"tick_s": 0.1, "discover_every_s": 1.0},
            "spool": {"max_bytes": 64 * 2**20, "segment_bytes": 256 * 1024},
            "cgroupfs": {
                "version": 1,
                "parent": self.node_parent(node_id),
                "default_cpu_cores": USER_CPU_CORES,
                "default_mem_mb": USER_MEM_MB,
            },
            "shipper": self.trainer.shipper(
                d / "shipper.json",
                batch_records=500,
                interval_s=0.2,
                backoff_initial_s=0.1,
                backoff_max_s=2.0,
            ),
            "model_poller": {
                "enabled": True,
                "dir": str(d / "models"),
                "wait_s": 20.0,
                "backoff_initial_s": 0.1,
                "backoff_max_s": 2.0,
            },
        }
        for sec, kv in extra.items():
            sections[sec] = {**sections.get(sec, {}), **kv}
        return SidecarProcess(d, sections, node_id=node_id)

    def node_parent(self, node_id: str) -> str:
        """The cgroup under which a node's workers live (its sidecar's cgroupfs parent)."""
        return f"{self.parent}/{node_id}"

    def worker_rel(self, node_id: str, j: int) -> str:
        """The cgroup of a node's worker ``j``."""
        return f"{self.node_parent(node_id)}/fn{j}"

    # ------------------------------------------------------------------------ lifecycle
    def start(self, drive: bool = True) -> Testbed:
        try:
            from sidecar import cgroups

            for n in self.nodes:
                parent = self.node_parent(n.id)
                cgroups.create_v1(parent).close()
                for j in range(self.n_workers):  # one by one: stop() sees every worker made
                    self.workers[n.id].append(Worker(self.worker_rel(n.id, j)))
                    stop_requested()
            self.trainer.start(wait=False)
            for n in self.nodes:
                n.start(wait=False)
            stop_requested()
            self.trainer.wait()
            for n in self.nodes:
                n.wait()
            stop_requested()
            if drive:
                self.drive()
        except BaseException:
            self.stop()
            raise
        return self

    def drive(self) -> None:
        for n in self.nodes:
            for w in self.workers[n.id]:
                t = threading.Thread(target=self._drive, args=(n, w), daemon=True)
                t.start()
                self._threads.append(t)

    def _drive(self, node: SidecarProcess, worker: Worker) -> None:
        rng = random.Random(self.rng.random())
        while not self._stop.is_set():
            if self._pause.is_set():
                time.sleep(0.02)
                continue
            with self._lock:
                self._busy += 1
            try:
                self._one(node, worker, rng)
            except (OSError, ValueError):
                self.driver_errors += 1
                time.sleep(0.2)
            finally:
                with self._lock:
                    self._busy -= 1
            self._stop.wait(rng.expovariate(self.rate))

    def _one(self, node: SidecarProcess, worker: Worker, rng: random.Random) -> None:
        done = invoke(node, worker, int(self.burn_n * rng.uniform(0.5, 1.5)))
        if done is None:
            self.driver_errors += 1
            time.sleep(0.2)
            return
        with self._lock:
            self.produced[node.id].append(done[0]["invocation"])

    def pause(self, timeout_s: float = 10.0) -> None:
        """Stop starting invocations and wait until none is running."""
        self._pause.set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._busy == 0:
                    return
            time.sleep(0.01)
        raise TimeoutError("invocations still running")

    def resume(self) -> None:
        self._pause.clear()

    def stop(self) -> None:
        from sidecar import cgroups

        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        for n in self.nodes:
            n.stop()
        for n in self.nodes:
            for w in self.workers[n.id]:
                w.close()
        self.trainer.stop()
        for n in self.nodes:  # by name: a start cut short may have made a cgroup, no Worker
            for j in range(self.n_workers):
                cgroups.remove_v1(self.worker_rel(n.id, j))
            cgroups.remove_v1(self.node_parent(n.id))
        cgroups.remove_v1(self.parent)

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------ views
    def produced_ids(self) -> list[str]:
        with self._lock:
            return [i for ids in self.produced.values() for i in ids]

    def stored_ids(self) -> list[str]:
        from training.registry import TrajectoryStore

        st = TrajectoryStore(self.trainer.dir / "data" / "trajectories.sqlite")
        try:
            return [r["invocation"] for r in st.iter_records()]
        finally:
            st.close()

    def stored_count(self) -> int:
        return self.trainer.records()

    def versions(self) -> dict[str, int | None]:
        return {n.id: n.active_version() for n in self.nodes}

    def wait_all_on(self, version: int, timeout_s: float = 30.0, poll_s: float = 0.02) -> float:
        """Seconds until every node runs ``version`` (raises on timeout)."""
        t0 = time.monotonic()
        pending = list(self.nodes)
        while pending:
            pending = [n for n in pending if n.active_version() != version]
            if not pending:
                break
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"not on v{version}: {[n.id for n in pending]}")
            time.sleep(poll_s)
        return time.monotonic() - t0


STOP = threading.Event()
"""Set by ``interrupt``. A KeyboardInterrupt raised while a child is being forked lands in an
at-fork callback, which only prints it ("Exception ignored"): the run checks this too
(``stop_requested``), so a Ctrl-C during a start is never lost."""


def interrupt(signum: int, frame: Any) -> None:
    """A handler for SIGINT and SIGTERM: both stop a run as Ctrl-C does, through its cleanup
    (also when started as a shell's background job, which inherits SIGINT ignored)."""
    STOP.set()
    raise KeyboardInterrupt


def stop_requested() -> None:
    """Raise KeyboardInterrupt if ``interrupt`` ran, whether or not its own raise got through."""
    if STOP.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up (a second Ctrl-C would leave cgroups)."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(args: Any) -> int:
    # a testbed learns fast: small updates often (a real trainer waits for more data)
    tb = Testbed(
        args.nodes,
        args.workers,
        args.dir,
        rate_per_worker=args.rate,
        trainer_overrides={"learner.interval_s": 5.0, "learner.min_records": 100},
    )
    print(f"starting 1 trainer + {args.nodes} sidecars in {tb.workdir} (cgroups under {tb.parent})")
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        tb.start()
        print(f"trainer {tb.trainer.url}; nodes " + ", ".join(n.url for n in tb.nodes))
        t0 = time.monotonic()
        while not args.duration or time.monotonic() - t0 < args.duration:
            if STOP.wait(5):
                break
            models = call_trainer(tb.trainer.url + "/v1/models", TOKEN)
            print(
                f"{time.monotonic() - t0:6.0f}s  produced {len(tb.produced_ids())}  stored "
                f"{tb.stored_count()}  latest v{models.get('latest')}  nodes {tb.versions()}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    finally:
        with uninterrupted():
            tb.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        print("stopped; cgroups removed")
    return 0
