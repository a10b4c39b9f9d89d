"""``faasrm bench faults``: the faults of issue 15, end to end on this machine, and what they did.

One ``Testbed`` (the trainer and two sidecars as real processes on 127.0.0.1; each sidecar
manages two real worker processes in cgroup v1 containers of user size ``USER_CPU_CORES`` /
``USER_MEM_MB``, invoked through its unix socket by driver threads) goes through these scenarios
in order. The sidecars run without a model, deciding with the ``smallest`` rule, until the
``bad_models`` scenario publishes one.

* ``kill9``: every container of node0 gets an invocation (the burn loop's CPU peak exceeds its
  user's quota and its memory stays far below, so ``smallest`` accelerates CPU and harvests
  memory) and burns CPU; the sidecar is killed (SIGKILL) and started again.
  ``restore_after_kill_s``: from the restart until every container is back at its user's
  limits (read from the cgroup files every 5 ms), the maximum over ``kill_tries``.
* ``trainer_outage``: the trainer is stopped (SIGTERM) for ``outage_s`` while the drivers keep
  invoking, then started again on the same port and data.
* ``trainer_sigkill``: the trainer is killed (SIGKILL) while a node's batch is in flight (its
  shipper state names a pending batch), then started again.
* ``malformed_hooks``: ``hook_posts`` malformed bodies on node1's socket (the bodies of issue
  15.2 and 15.3, garbage, random JSON, truncated and mutated starts, bad ends of a running
  invocation), after issue 15.1's user-size sequence.
* ``malformed_trajectories``: ``trajectory_posts`` malformed batches with the token (hostile
  msgpack, random bytes, truncated batches, one bad field, a bad envelope) while the nodes ship.
* ``bad_models``: a good model is published, then a corrupt file, random bytes, a wrong-shape
  model, a NaN model and a model for another grid. ``bad_models_served``: bad ones the registry
  took or lists.
* ``rollback``: a model that passes the probe checks but scores NaN once ``pending`` >= 12 is
  published; node1 gets busy invocations until it rolls back, then restarts (SIGTERM).
  ``rollback_survives_restart``: after the restart it runs the previous good version, keeps it
  over two registry polls, and its busy invocations are decided by it, never by the bad one.
* ``end``: the drivers stop, then every sidecar gets SIGTERM.

``records_lost`` / ``records_duplicated``: invocations a driver (or this script) finished with a
stored record missing / stored more than once, once every node has shipped: after the trainer
faults and, for the whole run, at the end (the figure reported). ``http_5xx``: answers >= 500,
refused or broken connections and crashed servers, over both malformed streams.
``containers_off_user_after_end``: after every scenario (no invocation running; 3 s allowed for a
restore the kernel defers) and after the final SIGTERM, containers whose cgroup limits are not
their user's, summed. The target is 0 for every count and true for the flag (``TARGETS``).
Everything is stopped and removed (processes, cgroups, the working directory), also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import string
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from sidecar.core.features import N_CONTEXT
from sidecar.core.grid import ResourceGrid
from sidecar.units import MB
from training.bench_trainer import pack_batch, synthetic_record
from training.linear_policies import onnx_policy
from training.processes import TOKEN, unix_request, v1_unavailable
from training.service import TrainerError, call_trainer, publish
from training.testbed import (
    GRID,
    USER_CPU_CORES,
    USER_MEM_MB,
    Testbed,
    Worker,
    interrupt,
    invoke,
    uninterrupted,
    wait_for,
)

KEYS = (
    "restore_after_kill_s",
    "records_lost",
    "records_duplicated",
    "http_5xx",
    "containers_off_user_after_end",
    "bad_models_served",
    "rollback_survives_restart",
)
"""The figures at the top level of the JSON (with ``targets_met``, ``settings``, ``scenarios``)."""
TARGETS: dict[str, Any] = {k: 0 for k in KEYS[1:]} | {"rollback_survives_restart": True}
"""Every count 0 and the flag true; ``restore_after_kill_s`` must be a time (every try restored)."""
USER = (USER_CPU_CORES, int(USER_MEM_MB * MB))
"""A worker's user limits as the cgroup files hold them: quota in cores, memory limit in bytes."""
USER_BODY = {"cpu_cores": USER_CPU_CORES, "mem_mb": USER_MEM_MB}
BURN = 150_000
"""Loop iterations of a warm-up invocation (~20 ms of CPU)."""
KILL_BURN = 3_000_000
"""Loop iterations of an invocation a kill interrupts (still burning at the restart)."""
RESTORE_TIMEOUT_S = 30.0
SHIPPED_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    """How much of each fault (the defaults are ``faasrm bench faults``'s flags)."""

    kill_tries: int
    """SIGKILLs of node0's sidecar, each mid-invocation."""
    outage_s: float
    """Seconds the trainer is down while the drivers keep invoking."""
    hook_posts: int
    """Malformed hook posts on node1's socket."""
    trajectory_posts: int
    """Malformed trajectory batches posted to the trainer."""
    seed: int
    """Drivers' timing, the malformed bodies and the random model bytes."""


# --------------------------------------------------------------------------- malformed bodies
HUGE = "9" * 401
"""An integer no float can hold (issue 15.3's OverflowError)."""
DEEP = b"[" * 100_000 + b"]" * 100_000
"""JSON nested 100,000 levels deep (issue 15.3's RecursionError)."""


def bad_user_sizes(host_cores: float) -> list[tuple[dict, str]]:
    """User sizes the kernel or the host cannot take (issue 15.2), each with the field its 400
    must name: under the kernel's 1,000 us quota, under the 16 MB memory floor, more cores or
    memory than the host has."""
    return [
        ({"cpu_cores": 0.001, "mem_mb": 256}, "cpu_cores"),
        ({"cpu_cores": 1.0, "mem_mb": 1e-6}, "mem_mb"),
        ({"cpu_cores": 1.0, "mem_mb": 8}, "mem_mb"),
        ({"cpu_cores": 1024, "mem_mb": 256}, "cpu_cores"),
        ({"cpu_cores": host_cores + 0.5, "mem_mb": 256}, "cpu_cores"),
        ({"cpu_cores": 1.0, "mem_mb": 2**30}, "mem_mb"),
    ]


def bad_start_bodies(container: str) -> list[bytes]:
    """Start bodies that must get a 400 (issue 15.3): deep nesting, numbers beyond a float."""
    c = container
    return [
        DEEP,
        b'{"container": ' + DEEP + b"}",
        f'{{"container": "{c}", "user": {{"cpu_cores": {HUGE}, "mem_mb": 256}}}}'.encode(),
        f'{{"container": "{c}", "user": {{"cpu_cores": 1, "mem_mb": {HUGE}}}}}'.encode(),
        f'{{"container": "{c}", "input_size": {HUGE}}}'.encode(),
        f'{{"container": "{c}", "pending": {HUGE}}}'.encode(),
        f'{{"container": "{c}", "pending": -{HUGE}}}'.encode(),
        f'{{"container": "{c}", "input_size": 1e300}}'.encode(),
        f'{{"container": "{c}", "pending": 1e300}}'.encode(),
    ]


def bad_end_bodies() -> list[bytes]:
    """End bodies that must get a 400 (issue 15.3): a duration beyond a float, or absurd."""
    return [f'{{"duration_s": {HUGE}}}'.encode(), b'{"duration_s": 1e300}']


_ODD = (0, -1, 0.001, 1e-6, 16, 2**30, 1e15, 1e16, 86_400, 1e300, -1e300, math.nan, math.inf)
_ODD += (2**1400, -(2**64), 1.5)
_CHARS = string.printable + "é\u2028\x00\ud7ff"


def _text(rng: random.Random, most: int) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randrange(most + 1)))


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value (NaN, Infinity and 400-digit integers included), at most 3 levels deep."""
    pick = rng.randrange(7 if depth < 3 else 5)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.choice(_ODD)
    if pick == 3:
        return _text(rng, 12)
    if pick == 4:
        return rng.uniform(-1e6, 1e6)
    if pick == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_text(rng, 6): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _json(obj: Any) -> bytes:
    """As a client could send it: NaN and Infinity literals included."""
    return json.dumps(obj, allow_nan=True).encode()


def malformed_hook_posts(
    containers: list[str], host_cores: float, n: int, rng: random.Random
) -> list[tuple[str, bytes]]:
    """``n`` (path, body) posts for the hook API: the fixed regressions first, then random ones
    (random bytes, random JSON to either route, truncated and mutated starts). A random one may
    happen to be valid; the caller ends what it starts."""
    c = containers[0]
    starts = [
        *bad_start_bodies(c),
        *(_json({"container": c, "user": u}) for u, _ in bad_user_sizes(host_cores)),
        b"",
        b"{",
        b"null",
        b"[]",
        b"42",
        b'"x"',
        b"\xff\xfe{}",
        b'{"container": NaN}',
        b'{"container": 5}',
        b'{"container": "no/such@1"}',
        _json({"container": c, "pending": math.nan}),
        _json({"container": c, "input_size": math.inf}),
        _json({"container": c, "pending": -1}),
        _json({"container": c, "pending": 1.5}),
        _json({"container": c, "pending": True}),
        _json({"container": c, "surprise": 1}),
        _json({"container": c, "user": "big"}),
        _json({"container": c, "user": {"cpu_cores": "1", "mem_mb": 256}}),
        _json({"container": c, "user": {"cpu_cores": 1, "mem_mb": 256, "cpu_weight": 0}}),
        _json({"container": c, "function": "f" * 600}),
    ]
    ends = [b"{}", DEEP, *bad_end_bodies(), b'{"outcome": "exploded"}', b'{"duration_s": -1}']
    posts = [("/v1/invocations", b) for b in starts]
    posts += [("/v1/invocations/no-such-invocation/end", b) for b in ends]
    valid = {"container": c, "function": "fn", "pending": 3, "input_size": 10.0, "user": USER_BODY}
    fields = ("container", "function", "id", "input_size", "pending", "user")
    while len(posts) < n:
        kind = len(posts) % 4
        if kind == 0:
            posts.append(("/v1/invocations", rng.randbytes(rng.randrange(1, 200))))
        elif kind == 1:
            path = rng.choice(("/v1/invocations", "/v1/invocations/x/end"))
            posts.append((path, _json(_random_value(rng))))
        elif kind == 2:
            body = _json({**valid, "container": rng.choice(containers)})
            posts.append(("/v1/invocations", body[: rng.randrange(1, len(body))]))
        else:
            mutated = {**valid, "container": rng.choice(containers)}
            mutated[rng.choice(fields)] = _random_value(rng)
            posts.append(("/v1/invocations", _json(mutated)))
    return posts[:n]


FUZZ_NODE = "faults-fuzz"
"""The node id of every malformed batch (no real node's (node, seq) is touched)."""
BAD_RECORD_VALUES: dict[str, list[Any]] = {
    "v": [None, "1", 1.5, -1, 99],
    "node": [None, 5, "other", b"n1"],
    "function": [None, 3, b"x", "f" * 600],
    "container": [None, [], {}],
    "time": [None, "now", math.inf, math.nan],
    "context": [
        None,
        [],
        "abc",
        [1.0] * 3,
        [[1.0]] * N_CONTEXT,
        [math.nan] * N_CONTEXT,
        ["x"] * N_CONTEXT,
        [{"a": 1}] * N_CONTEXT,
        [True] * N_CONTEXT,
        [2**80] * N_CONTEXT,
        [1e308] * N_CONTEXT,  # finite in float64, infinite in the learner's float32
        [0.0] * (N_CONTEXT - 1) + [-3.5e38],
    ],
    "cpu_block": [
        None,
        [[1.0, 2.0]] * 8,
        [[1.0, 2.0, 3.0]] * 3 + [[1.0]],
        "x",
        [[None] * 3] * 8,
        [[-1e300, 0.0, 0.0]] * 8,
    ],
    "mem_block": [[], [[math.inf] * 3] * 8, 7, [[0.0, 0.0, 1e39]] * 8],
    "mask": [None, b"", b"\x00" * 8, "ffff", b"\xff" * 9, [1, 2]],
    "action": [None, -1, 64, 1.0, "3", True],
    "logp": [None, 0.5, math.nan, "x", -1e39],
    "reward": ["x", math.inf, math.nan, 1e9, [1.0]],
    "duration_s": [None, -1.0, math.inf],
    "outcome": [None, "exploded", 1],
}
"""Values wrong for each field of a trajectory record (type, range or content)."""
BAD_ENVELOPE_VALUES: dict[str, list[Any]] = {
    "node_id": [None, "", "a b", "x" * 200, 5, "../etc"],
    "seq": [None, -1, 2**64, 1.5, "1", True],
    "records": [None, [], {}, "x", [None], [1, 2], [[]]],
}
"""Values wrong for each field of a batch's envelope."""


def hostile_batches(valid: bytes) -> list[bytes]:
    """msgpack that claims more than it holds, nests deeply, or carries what no batch may."""
    import msgpack

    return [
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4G elements, no data
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4G pairs
        b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # str32 claiming 4 GB
        b"\x91" * 100_000 + b"\xc0",  # 100,000 nested arrays
        msgpack.packb(msgpack.ExtType(5, b"boom")),
        msgpack.packb(
            {"schema_version": 1, "node_id": "n1", "seq": 0, "records": [msgpack.ExtType(1, b"x")]}
        ),
        valid + b"\x00",  # trailing garbage
        msgpack.packb({1: 2}),  # non-string map keys
    ]


def malformed_batches(n: int, rng: random.Random) -> list[bytes]:
    """``n`` malformed ``POST /v1/trajectories`` bodies: the hostile ones, then in turn random
    bytes, a truncated valid batch, a batch with one bad record field, one with a bad envelope."""
    import msgpack

    np_rng = np.random.default_rng(rng.randrange(2**32))

    def records() -> list[dict]:
        return [synthetic_record(FUZZ_NODE, i, np_rng) for i in range(3)]

    valid = pack_batch(FUZZ_NODE, 0, records())
    out = hostile_batches(valid)
    turn = 0
    while len(out) < n:
        turn += 1
        try:
            if turn % 4 == 0:
                out.append(rng.randbytes(rng.randrange(1, 2000)))
            elif turn % 4 == 1:
                out.append(valid[: rng.randrange(len(valid))])
            elif turn % 4 == 2:
                recs = records()
                field = rng.choice(sorted(BAD_RECORD_VALUES))
                recs[rng.randrange(len(recs))][field] = rng.choice(BAD_RECORD_VALUES[field])
                out.append(pack_batch(FUZZ_NODE, 1, recs))
            else:
                env = {"schema_version": 1, "node_id": FUZZ_NODE, "seq": 2, "records": records()}
                field = rng.choice(sorted(BAD_ENVELOPE_VALUES))
                env[field] = rng.choice(BAD_ENVELOPE_VALUES[field])
                out.append(msgpack.packb(env, use_bin_type=True))
        except (OverflowError, ValueError, TypeError):  # not even msgpack can carry it
            continue
    return out[:n]


def bad_model_files(grid: ResourceGrid, rng: random.Random) -> dict[str, bytes]:
    """Models no node can run on ``grid``: the registry must refuse every one."""
    good = onnx_policy("harvest", grid)
    other = ResourceGrid(grid.cpu_unit_cores * 4, grid.cpu_units, grid.mem_unit_mb, grid.mem_units)
    return {
        "corrupt": good[:200],
        "random_bytes": rng.randbytes(4096),
        "wrong_shape": onnx_policy("wrong_shape", grid),
        "nan": onnx_policy("nan", grid),
        "other_grid": onnx_policy("harvest", other),
    }


# --------------------------------------------------------------------------- the run
class Tally:
    """Answers to a stream of malformed posts, by status; 0 = refused or broken connection."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()

    def add(self, status: int) -> None:
        self.statuses[status] += 1

    @property
    def failures(self) -> int:
        """Answers >= 500 and connections that failed."""
        return sum(c for s, c in self.statuses.items() if s >= 500 or s == 0)

    @property
    def accepted(self) -> int:
        return sum(c for s, c in self.statuses.items() if 200 <= s < 300)

    def view(self) -> dict:
        return {
            "posts": sum(self.statuses.values()),
            "statuses": {str(s): c for s, c in sorted(self.statuses.items())},
            "failures": self.failures,
            "accepted": self.accepted,
        }


def _limits(w: Worker) -> tuple[float | None, int | None]:
    lim = w.cg.read_limits()
    return lim.cpu_quota_cores, lim.mem_limit_bytes


def _off_user(workers: list[Worker]) -> list[str]:
    return [w.rel for w in workers if _limits(w) != USER]


def _kill9(proc: subprocess.Popen | None) -> int:
    """SIGKILL ``proc``; how many of its descendants outlived it by 5 s (then killed too)."""
    import psutil

    assert proc is not None
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(kids, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return len(alive)


class FaultRun:
    """The scenarios on one testbed, and what each found."""

    def __init__(self, tb: Testbed, settings: Settings) -> None:
        self.tb = tb
        self.s = settings
        self.rng = random.Random(settings.seed)
        self.grid = ResourceGrid(**GRID)
        self.finished: list[str] = []
        """Invocations this script finished itself (beside the drivers')."""
        self.scenarios: dict[str, dict] = {}
        self.off_user_checks: list[dict] = []
        self.v1: int | None = None

    # ------------------------------------------------------------------ shared checks
    def all_workers(self) -> list[Worker]:
        return [w for n in self.tb.nodes for w in self.tb.workers[n.id]]

    def check_off_user(self, after: str, wait_s: float = 3.0) -> dict:
        """Containers off their user's limits once no invocation runs (``wait_s`` for a restore
        the kernel defers)."""
        deadline = time.monotonic() + wait_s
        while (off := _off_user(self.all_workers())) and time.monotonic() < deadline:
            time.sleep(0.05)
        check = {
            "after": after,
            "containers": len(self.all_workers()),
            "off_user": off,
            "invocations_running": [  # none, unless a hook's end went astray
                c["id"]
                for n in self.tb.nodes
                if n.proc is not None and n.proc.poll() is None
                for c in n.call("/debug/containers", timeout=5)[1]["containers"]
                if c["invocation"] is not None
            ],
        }
        self.off_user_checks.append(check)
        return check

    def invoke(self, node_i: int, worker_i: int, burn: int = 0, **start: Any) -> dict | None:
        """One invocation through the hooks by this script; the start's answer."""
        node = self.tb.nodes[node_i]
        done = invoke(node, self.tb.workers[node.id][worker_i], burn, **start)
        if done is None:
            return None
        self.finished.append(done[0]["invocation"])
        return done[0]

    def check_records(self, after: str) -> dict:
        """Once every node has shipped (up to a minute): finished invocations whose record is
        missing or stored twice, records nobody finished (invocations lost to a kill or a
        SIGTERM), and SQLite's integrity check."""
        self.tb.pause()
        produced = set(self.tb.produced_ids()) | set(self.finished)
        deadline = time.monotonic() + SHIPPED_TIMEOUT_S
        while True:
            stored = Counter(self.tb.stored_ids())
            missing = produced - set(stored)
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        db = sqlite3.connect(self.tb.trainer.dir / "data" / "trajectories.sqlite")
        try:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            db.close()
        return {
            "after": after,
            "finished": len(produced),
            "stored": sum(stored.values()),
            "lost": len(missing),
            "duplicated": sum(1 for i in produced if stored[i] > 1),
            "not_finished_by_a_driver": len(set(stored) - produced),
            "sqlite_integrity": integrity,
        }

    def scenario(self, name: str, body: Callable[[], dict], check: bool = True) -> None:
        """Run one scenario, then (``check``) look at the limits with the drivers paused. A
        scenario that fails is a finding, not the end of the run: its error is its detail, its
        figures are missing, and whatever it left stopped is started again."""
        t0 = time.monotonic()
        print(f"{name} ...", flush=True)
        try:
            detail = body()
        except Exception as exc:  # reported; the next scenarios still run
            detail = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name} failed: {detail['error']}", flush=True)
            for proc in (self.tb.trainer, *self.tb.nodes):
                if proc.proc is None or proc.proc.poll() is not None:
                    proc.start()
        if check:
            self.tb.pause()
            detail["off_user_after"] = self.check_off_user(name)["off_user"]
        detail["elapsed_s"] = round(time.monotonic() - t0, 2)
        self.scenarios[name] = detail
        self.tb.resume()

    # ------------------------------------------------------------------ the scenarios
    def kill9(self) -> dict:
        node = self.tb.nodes[0]
        workers = self.tb.workers[node.id]
        tries = []
        for _ in range(self.s.kill_tries):
            self.tb.pause()
            for i in range(len(workers)):  # a history per function: no safeguard run next
                for _ in range(2):
                    self.invoke(0, i, BURN)
            kinds, burning = [], []
            for w in workers:
                st, started = node.call(
                    "/v1/invocations", {"container": w.rel, "function": w.function}, timeout=5
                )
                if st == 200:
                    kinds.append(started["allocation"]["kind"])
                    w.start_burn(KILL_BURN)
                    burning.append(w)
            at_kill = [_limits(w) for w in workers]
            orphans = _kill9(node.proc)
            t0 = time.monotonic()
            node.start(wait=False)
            restore_s: float | None = None
            while time.monotonic() - t0 < RESTORE_TIMEOUT_S:
                if not _off_user(workers):
                    restore_s = time.monotonic() - t0
                    break
                time.sleep(0.005)
            node.wait()
            for w in burning:
                w.wait_burn()
            tries.append(
                {
                    "kinds_at_kill": kinds,
                    "limits_at_kill": [
                        {"cpu_cores": cpu, "mem_mb": None if mem is None else mem / MB}
                        for cpu, mem in at_kill
                    ],
                    "containers_off_user_at_kill": sum(lim != USER for lim in at_kill),
                    "restore_s": None if restore_s is None else round(restore_s, 4),
                    "orphans": orphans,
                }
            )
            self.tb.resume()
            time.sleep(0.5)
        times = [t["restore_s"] for t in tries]
        return {
            "tries": tries,
            "restore_after_kill_s": None if None in times else max(times),
        }

    def _wait_flowing(self) -> None:
        n0 = self.tb.stored_count()
        wait_for(lambda: self.tb.stored_count() > n0 + 10, 30, "records flowing to the trainer")

    def trainer_outage(self) -> dict:
        self._wait_flowing()
        before = len(self.tb.produced_ids())
        self.tb.trainer.stop()
        time.sleep(self.s.outage_s)
        during = len(self.tb.produced_ids()) - before
        self.tb.trainer.start()
        return {"outage_s": self.s.outage_s, "finished_during_outage": during} | {
            "records": self.check_records("trainer_outage")
        }

    def trainer_sigkill(self) -> dict:
        self._wait_flowing()
        states = [n.dir / "shipper.json" for n in self.tb.nodes]

        def in_flight() -> list[str]:
            out = []
            for n, path in zip(self.tb.nodes, states):
                with contextlib.suppress(OSError, ValueError):
                    if json.loads(path.read_text()).get("pending"):
                        out.append(str(n.id))
            return out

        deadline = time.monotonic() + 20
        while not (nodes := in_flight()) and time.monotonic() < deadline:
            time.sleep(0.001)
        orphans = _kill9(self.tb.trainer.proc)
        time.sleep(1.0)  # the nodes fail, back off and keep spooling
        self.tb.trainer.start()
        return {
            "batches_in_flight_at_kill": nodes,
            "orphans": orphans,
            "records": self.check_records("trainer_sigkill"),
        }

    def malformed_hooks(self) -> dict:
        self.tb.pause()
        node = self.tb.nodes[1]
        workers = self.tb.workers[node.id]
        # issue 15.1: another user size, then the original again, must leave the original
        for user in ({"cpu_cores": 0.75, "mem_mb": 192.0}, USER_BODY):
            self.invoke(1, 0, user=user)
        tally = Tally()
        posts = malformed_hook_posts(
            [w.rel for w in workers], os.cpu_count() or 1, self.s.hook_posts, self.rng
        )
        crashes = 0
        for path, body in posts:
            status, answer = self._hook(node, path, body, tally)
            if status == 200 and path == "/v1/invocations":  # a random body that was valid
                end = f"/v1/invocations/{quote(answer['invocation'], safe='')}/end"
                if self._hook(node, end, b"{}", tally)[0] == 200:
                    self.finished.append(answer["invocation"])
            if node.proc is None or node.proc.poll() is not None:
                crashes += 1
                node.start()
        # bad ends of a running invocation: refused, and the invocation still ends normally
        st, started = node.call("/v1/invocations", {"container": workers[1].rel}, timeout=5)
        ended = False
        if st == 200:
            end = f"/v1/invocations/{quote(started['invocation'], safe='')}/end"
            for body in (*bad_end_bodies(), DEEP, b"{", b'{"duration_s": NaN}', b'{"outcome": 1}'):
                self._hook(node, end, body, tally)
            ended = node.call(end, {}, timeout=5)[0] == 200
            if ended:
                self.finished.append(started["invocation"])
        # the user size every random start may have reported, put back to the testbed's
        for i in range(len(workers)):
            self.invoke(1, i, user=USER_BODY)
        ready = node.call("/readyz", timeout=5)
        return {
            **tally.view(),
            "crashes": crashes,
            "running_invocation_survived_bad_ends": ended,
            "ready_after": ready[0] == 200 and ready[1].get("containers") == len(workers),
        }

    @staticmethod
    def _hook(node: Any, path: str, body: bytes, tally: Tally) -> tuple[int, Any]:
        try:
            status, answer = unix_request(node.socket, "POST", path, body, timeout=30)
        except OSError:
            status, answer = 0, None
        tally.add(status)
        return status, answer

    def malformed_trajectories(self) -> dict:
        tally = Tally()
        url = self.tb.trainer.url + "/v1/trajectories"
        for body in malformed_batches(self.s.trajectory_posts, self.rng):
            try:
                call_trainer(url, TOKEN, body)
                tally.add(200)
            except TrainerError as exc:
                tally.add(exc.status)
            except (OSError, ValueError):
                tally.add(0)
        crashes = int(self.tb.trainer.proc is None or self.tb.trainer.proc.poll() is not None)
        if crashes:
            self.tb.trainer.start()
        return {**tally.view(), "crashes": crashes, "healthy_after": self.tb.stored_count() >= 0}

    def bad_models(self) -> dict:
        url = self.tb.trainer.url
        self.v1 = publish(url, TOKEN, onnx_policy("user", self.grid))["version"]
        self.tb.wait_all_on(self.v1)
        answers: dict[str, dict] = {}
        served: set[str] = set()
        bad = bad_model_files(self.grid, self.rng)
        for kind, data in bad.items():
            try:
                version = publish(url, TOKEN, data)["version"]
                answers[kind] = {"status": 200, "version": version}
                served.add(kind)
            except TrainerError as exc:
                answers[kind] = {"status": exc.status, "reason": exc.reason[:300]}
        sha = {hashlib.sha256(data).hexdigest(): kind for kind, data in bad.items()}
        listing = call_trainer(url + "/v1/models", TOKEN)
        for v in listing["versions"]:
            meta = call_trainer(f"{url}/v1/models/{v}/meta", TOKEN)
            if meta["sha256"] in sha:
                served.add(sha[meta["sha256"]])
        return {
            "good_version": self.v1,
            "answers": answers,
            "served": sorted(served),
            "latest_after": listing["latest"],
            "nodes_versions_after": self.tb.versions(),
        }

    def rollback(self) -> dict:
        self.tb.pause()
        node = self.tb.nodes[1]
        assert self.v1 is not None
        wait_for(lambda: node.active_version() == self.v1, 30, f"node1 on v{self.v1}")
        good = node.model()["current"]["id"]
        v2 = publish(self.tb.trainer.url, TOKEN, onnx_policy("nan_when_busy", self.grid))
        wait_for(lambda: node.active_version() == v2["version"], 30, f"node1 on v{v2['version']}")
        bad = node.model()["current"]["id"]

        def busy(n: int) -> list[str]:
            """Models that decided ``n`` invocations started with 12 pending."""
            return [
                (s or {}).get("model", "refused")
                for s in (self.invoke(1, 0, pending=12) for _ in range(n))
            ]

        before = []
        while len(before) < 10 and node.active_version() != self.v1:
            before += busy(1)
        rolled_back = node.active_version() == self.v1 and node.model()["current"]["id"] == good
        node.stop()
        node.start()
        after = {"model": node.model()["current"]["id"], "version": node.active_version()}
        polls = node.model()["registry"]["polls"]
        wait_for(lambda: node.model()["registry"]["polls"] >= polls + 2, 30, "two polls")
        decided = busy(4)
        reg = node.model()["registry"]
        survived = (
            rolled_back
            and after == {"model": good, "version": self.v1}
            and reg["active_version"] == self.v1
            and decided == [good] * 4
        )
        return {
            "good": {"version": self.v1, "model": good},
            "bad": {"version": v2["version"], "model": bad},
            "decided_before_rollback": before,
            "rolled_back": rolled_back,
            "after_restart": after,
            "decided_after_restart": decided,
            "registry_after": {k: reg[k] for k in ("active_version", "previous_version", "polls")},
            "rollback_survives_restart": survived,
        }

    def end(self) -> dict:
        """The drivers stop: records and limits; then every sidecar's SIGTERM: limits again."""
        self.tb.pause()
        records = self.check_records("end")
        off_at_end = self.check_off_user("end")["off_user"]
        codes = {}
        for n in self.tb.nodes:
            n.stop()
            codes[str(n.id)] = None if n.proc is None else n.proc.returncode
        return {
            "records": records,
            "off_user_after": off_at_end,
            "sidecar_exit_codes": codes,
            "off_user_after_sigterm": self.check_off_user("sigterm", wait_s=0)["off_user"],
        }

    # ------------------------------------------------------------------ the report
    def report(self) -> dict:
        sc = self.scenarios

        def figure(names: tuple[str, ...], of: Callable[..., Any]) -> Any:
            """``of`` the scenarios' details; None when one of them failed."""
            details = [sc[n] for n in names]
            return None if any("error" in d for d in details) else of(*details)

        hooks_and_batches = ("malformed_hooks", "malformed_trajectories")
        figures = {
            "restore_after_kill_s": figure(("kill9",), lambda d: d["restore_after_kill_s"]),
            "records_lost": figure(("end",), lambda d: d["records"]["lost"]),
            "records_duplicated": figure(("end",), lambda d: d["records"]["duplicated"]),
            "http_5xx": figure(
                hooks_and_batches, lambda *ds: sum(d["failures"] + d["crashes"] for d in ds)
            ),
            "containers_off_user_after_end": sum(len(c["off_user"]) for c in self.off_user_checks),
            "bad_models_served": figure(("bad_models",), lambda d: len(d["served"])),
            "rollback_survives_restart": figure(
                ("rollback",), lambda d: d["rollback_survives_restart"]
            ),
        }
        met = figures["restore_after_kill_s"] is not None and all(
            figures[k] == v for k, v in TARGETS.items()
        )
        return {
            **figures,
            "targets_met": met,
            "settings": asdict(self.s),
            "machine": {"cores": os.cpu_count(), "load_1m_at_end": round(os.getloadavg()[0], 2)},
            "testbed": {"cgroups": self.tb.parent, "dir": str(self.tb.workdir.parent)},
            "driver_errors": self.tb.driver_errors,
            "processes_outliving_sigkill": {
                "sidecar": sum(t["orphans"] for t in sc["kill9"].get("tries", [])),
                "trainer": sc["trainer_sigkill"].get("orphans", 0),
            },
            "off_user_checks": self.off_user_checks,
            "scenarios": sc,
        }


SCENARIOS = (
    "kill9",
    "trainer_outage",
    "trainer_sigkill",
    "malformed_hooks",
    "malformed_trajectories",
    "bad_models",
    "rollback",
)
"""In this order, then ``end``."""


def run(settings: Settings, workdir: Path) -> dict:
    """Every scenario on a new testbed in ``workdir``; the report (see the module)."""
    tb = Testbed(
        nodes=2,
        workers=2,
        workdir=workdir / "testbed",
        trainer_overrides={"learner.enabled": False},
        sidecar_overrides={
            "model": {"path": str(workdir / "no-model.onnx"), "rule": "smallest"},
            "model_poller": {"wait_s": 1.0},
            "shipper": {"batch_records": 20, "interval_s": 0.1},
        },
        rate_per_worker=4.0,
        burn=BURN,
        seed=settings.seed,
    )
    try:
        tb.start()
        fr = FaultRun(tb, settings)
        for name in SCENARIOS:
            fr.scenario(name, getattr(fr, name))
        fr.scenario("end", fr.end, check=False)
        return fr.report()
    finally:
        with uninterrupted():
            tb.stop()


def render_table(report: dict) -> str:
    rows = [("figure", "value", "target")]
    for k in KEYS:
        v = report[k]
        target = "a time (every try restored)" if k == "restore_after_kill_s" else TARGETS[k]
        rows.append((k, "n/a" if v is None else str(v), str(target)))
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.append(f"targets met: {'yes' if report['targets_met'] else 'NO'}")
    for name, detail in report["scenarios"].items():
        if "error" in detail:
            lines.append(f"error in {name}: {detail['error']}")
    for who, n in report["processes_outliving_sigkill"].items():
        if n:
            lines.append(f"note: {n} child processes of the {who} outlived its SIGKILL (killed)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    reason = v1_unavailable()
    if reason:
        raise ValueError(f"bench faults {reason}")
    settings = Settings(
        args.kill_tries, args.outage_s, args.hook_posts, args.trajectory_posts, args.seed
    )
    workdir = Path(tempfile.mkdtemp(prefix="faasrm-faults-"))
    # Ctrl-C and SIGTERM stop the run and clean up, as the demo's do, also when started as a
    # shell's background job (which inherits SIGINT ignored)
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    # a SIGKILLed trainer cannot remove multiprocessing's temporary directory: the children's
    # temporary files go in the run's directory, removed with it
    tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(workdir)
    try:
        report = run(settings, workdir)
    except KeyboardInterrupt:
        print("interrupted: every process, cgroup and file of the run removed")
        return 130
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if tmp is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = tmp
        shutil.rmtree(workdir, ignore_errors=True)
    print(render_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if report["targets_met"] else 1
