"""The trainer service's HTTP contract: auth, sizes, validation, idempotency, durability,
registry."""

from __future__ import annotations

import hashlib
import io
import random
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
from trainer_helpers import GRID, TOKEN, ServerThread, batch, http, js, record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sidecar"))
from sidecar_helpers import onnx_policy  # noqa: E402

from sidecar import config as sidecar_config  # noqa: E402
from sidecar.config import ConfigError  # noqa: E402
from sidecar.core.grid import ResourceGrid  # noqa: E402
from sidecar.models import ModelRejected  # noqa: E402
from training.processes import TrainerProcess  # noqa: E402
from training.registry import Registry, Superseded, TrajectoryStore  # noqa: E402
from training.service import BatchError, decode_batch, load_config  # noqa: E402


@pytest.fixture
def server(tmp_path: Path):
    with ServerThread(tmp_path / "data", max_body_bytes=64 * 1024) as s:
        yield s


def post(server, body: bytes, token: str | None = TOKEN):
    return http(
        server.url + "/v1/trajectories",
        body,
        token=token,
        headers={"Content-Type": "application/msgpack"},
    )


def test_accepts_stores_durably_and_is_idempotent(server, tmp_path: Path) -> None:
    recs = [record("n1", i) for i in range(20)]
    st, _, body = post(server, batch("n1", 0, recs))
    assert st == 200 and js(body) == {"stored": True, "duplicate": False, "records": 20, "seq": 0}
    st, _, body = post(server, batch("n1", 0, recs))  # the reply was lost; the node re-sends
    assert st == 200 and js(body)["duplicate"] is True
    assert post(server, batch("n1", 1, recs[:5]))[0] == 200
    assert post(server, batch("n2", 0, [record("n2", 0)]))[0] == 200  # seq is per node
    # committed before the reply: a second connection (another process would do) sees it all
    store = TrajectoryStore(tmp_path / "data" / "trajectories.sqlite")
    assert store.counts() == {"batches": 3, "records": 26, "rewarded": 26}
    assert [r["invocation"] for r in store.iter_records()][:20] == [r["invocation"] for r in recs]
    store.close()
    metrics = http(server.url + "/metrics", token=None)[2].decode()
    assert "faasrm_trainer_ingest_transitions_total 26.0" in metrics
    assert 'faasrm_trainer_ingest_batches_total{result="duplicate"} 1.0' in metrics


def test_rejections(server) -> None:
    good = batch("n1", 7, [record("n1", 0)])
    assert post(server, good, token=None)[0] == 401
    assert post(server, good, token="wrong")[0] == 401
    assert post(server, b"\x00" * (64 * 1024 + 1))[0] == 413
    st, _, body = post(server, b"\xc1garbage")
    assert st == 400 and "msgpack" in js(body)["error"]
    assert post(server, batch("n1", 7, [record("n1", 0)], schema_version=99))[0] == 422
    rec = record("n1", 0)
    rec["v"] = 42
    assert post(server, batch("n1", 7, [rec]))[0] == 422
    rec = record("n1", 0)
    del rec["logp"]
    st, _, body = post(server, batch("n1", 7, [rec]))
    assert st == 400 and "logp" in js(body)["error"]
    rec = record("n1", 0)
    rec["context"][3] = "x"
    assert post(server, batch("n1", 7, [rec]))[0] == 400
    rec = record("n1", 0)
    rec["context"][3] = float("nan")
    assert post(server, batch("n1", 7, [rec]))[0] == 400
    assert post(server, batch("n1", 7, [record("other", 0)]))[0] == 400  # node mismatch
    metrics = http(server.url + "/metrics", token=None)[2].decode()
    assert 'faasrm_trainer_rejected_batches_total{reason="unauthorized"} 2.0' in metrics
    assert 'faasrm_trainer_rejected_batches_total{reason="too_large"} 1.0' in metrics
    assert 'faasrm_trainer_rejected_batches_total{reason="schema_version"} 2.0' in metrics
    # nothing of the above was stored; the good batch still is, once
    assert post(server, good)[0] == 200
    assert js(http(server.url + "/healthz", token=None)[2])["records"] == 1


def test_a_batch_the_store_cannot_take_is_a_500_and_an_ingest_error(server, tmp_path) -> None:
    """A valid batch the database refuses: 500 (the node keeps it and resends the same seq),
    counted in ``faasrm_trainer_ingest_errors_total`` (the "trainer ingest errors" alert)."""
    db = sqlite3.connect(tmp_path / "data" / "trajectories.sqlite")
    db.execute("ALTER TABLE batches RENAME TO gone")  # the next INSERT fails: no such table
    db.commit()
    st, _, body = post(server, batch("n1", 0, [record("n1", 0)]))
    assert st == 500 and "cannot store the batch" in js(body)["error"]
    metrics = http(server.url + "/metrics", token=None)[2].decode()
    assert "faasrm_trainer_ingest_errors_total 1.0" in metrics
    db.execute("ALTER TABLE gone RENAME TO batches")
    db.commit()
    db.close()
    assert post(server, batch("n1", 0, [record("n1", 0)]))[0] == 200  # the resend is stored


def test_healthz_answers_while_a_commit_waits(server, tmp_path) -> None:
    """/healthz runs on the event loop: its counts must not wait for the store, which can be
    busy committing a 15 MiB batch (fsync) for a while."""
    db = sqlite3.connect(tmp_path / "data" / "trajectories.sqlite", isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")  # the trainer's next commit waits (sqlite's 5 s busy timeout)
    got: dict = {}
    th = threading.Thread(target=lambda: got.update(r=post(server, batch("n1", 0, [record()]))))
    th.start()
    try:
        time.sleep(0.5)  # the batch is validated and its commit is waiting for the lock
        st, _, body = http(server.url + "/healthz", token=None, timeout=30)
        assert st == 200 and js(body)["batches"] == 0
        assert th.is_alive(), got  # answered while the commit still waited
    finally:
        db.execute("ROLLBACK")
        db.close()
        th.join(30)
    assert got["r"][0] == 200
    assert js(http(server.url + "/healthz", token=None)[2])["batches"] == 1


def test_decode_batch_rejects_disallowed_action() -> None:
    rec = record("n1", 0)
    mask = bytearray(rec["mask"])
    a = rec["action"]
    mask[a >> 3] &= ~(1 << (7 - (a & 7)))
    rec["mask"] = bytes(mask)
    with pytest.raises(BatchError, match="allowed"):
        decode_batch(batch("n1", 0, [rec]), 100)


def _publish(server, onnx: bytes, **extra) -> tuple[int, dict]:
    body = msgpack.packb({"onnx": onnx, **extra}, use_bin_type=True)
    st, _, out = http(server.url + "/v1/models", body)
    return st, js(out)


def test_registry_etag_and_long_poll(server, tmp_path: Path) -> None:
    one, two = onnx_policy("harvest"), onnx_policy("user")
    st, _, body = http(server.url + "/v1/models/latest")
    assert st == 404
    st, out = _publish(server, one, token="x")
    assert st == 400 and "unknown keys" in out["error"]
    st, out = _publish(server, one, sha256="0" * 64)
    assert st == 400  # sha mismatch
    assert http(server.url + "/v1/models", msgpack.packb({"onnx": b"x"}), token="bad")[0] == 401
    st, out = _publish(server, one, evaluation={"mean_rfet": 1.0})
    assert st == 200 and out["version"] == 1
    st, h, body = http(server.url + "/v1/models/latest")
    assert st == 200 and body == one and h["X-Model-Version"] == "1"
    assert h["X-Model-Sha256"] == hashlib.sha256(one).hexdigest()
    etag = h["ETag"]
    t0 = time.monotonic()
    st, h2, _ = http(server.url + "/v1/models/latest?wait=0.3", headers={"If-None-Match": etag})
    assert st == 304 and 0.25 <= time.monotonic() - t0 < 3 and h2["ETag"] == etag
    # a long-poll answers as soon as a newer version is promoted
    got: dict = {}

    def poll() -> None:
        t = time.monotonic()
        got["r"] = http(
            server.url + "/v1/models/latest?wait=20", headers={"If-None-Match": etag}, timeout=30
        )
        got["dt"] = time.monotonic() - t

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.3)
    assert _publish(server, two)[1]["version"] == 2
    th.join(10)
    st, h3, body = got["r"]
    assert st == 200 and body == two and h3["X-Model-Version"] == "2"
    assert got["dt"] < 5
    assert http(server.url + "/v1/models/1")[2] == one
    meta = js(http(server.url + "/v1/models/1/meta")[2])
    assert meta["evaluation"] == {"mean_rfet": 1.0} and meta["version"] == 1
    assert http(server.url + "/v1/models/9")[0] == 404
    assert js(http(server.url + "/v1/models")[2]) == {"latest": 2, "versions": [1, 2]}
    # the registry survives a restart
    assert Registry(tmp_path / "data" / "models", GRID).latest().version == 2


def test_the_registry_refuses_models_no_node_can_run(server, tmp_path: Path) -> None:
    """Every version the registry stores passed the nodes' own checks on the trainer's grid, so
    a node that starts fresh never finds an unusable model as the latest."""
    other_grid = ResourceGrid(cpu_unit_cores=0.5, cpu_units=4, mem_unit_mb=128.0, mem_units=4)
    bad = {
        "corrupt": (onnx_policy("harvest")[:300], "onnxruntime cannot load it"),
        "random bytes": (random.Random(15).randbytes(4096), "onnxruntime cannot load it"),
        "wrong shape": (onnx_policy("wrong_shape"), "wrong output shape"),
        "nan": (onnx_policy("nan"), "non-finite scores"),
        "other grid": (onnx_policy("harvest", grid=other_grid), "trained for grid"),
        "no metadata": (onnx_policy("harvest", metadata=False), "feature_version"),
    }
    for kind, (data, reason) in bad.items():
        st, out = _publish(server, data)
        assert st == 422 and reason in out["error"], (kind, st, out)
    assert http(server.url + "/v1/models/latest")[0] == 404
    assert js(http(server.url + "/v1/models")[2]) == {"latest": None, "versions": []}
    good = onnx_policy("harvest")
    st, out = _publish(server, good)
    assert st == 200 and out["version"] == 1
    assert _publish(server, onnx_policy("nan"))[0] == 422  # refused after a good one too
    st, h, body = http(server.url + "/v1/models/latest")
    assert st == 200 and body == good and h["X-Model-Version"] == "1"
    # the same check guards every other way into the registry (the online learner's)
    reg = Registry(tmp_path / "other-models", GRID)
    with pytest.raises(ModelRejected, match="non-finite"):
        reg.add(onnx_policy("nan"))
    assert reg.latest() is None and reg.versions() == []


def test_metadata_that_is_not_json_is_refused_with_400_and_nothing_stored(
    server, tmp_path: Path
) -> None:
    """A published map's keys may be bytes (msgpack allows them) or its values nested beyond
    what JSON takes; meta.json could not hold them: 400 naming the field, not a 500 that leaves
    a half-written version behind."""
    good = onnx_policy("harvest")
    for key, value in (
        ("metadata", {b"raw": 1}),
        ("evaluation", {"runs": {b"k": 1.0}}),
        ("metadata", {"deep": [{b"x": 2}]}),
    ):
        st, out = _publish(server, good, **{key: value})
        assert st == 400 and key in out["error"], (key, value, st, out)
    assert js(http(server.url + "/v1/models")[2]) == {"latest": None, "versions": []}
    assert not list((tmp_path / "data" / "models").glob(".tmp-*"))
    st, out = _publish(server, good, metadata={"note": b"bytes become text"})
    assert st == 200 and out["version"] == 1


class _RunsCode:
    """A pickled object that would create ``marker`` when unpickled (any code could run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_no_learner_could_load_is_refused_without_running_it(
    server, tmp_path: Path
) -> None:
    """A published checkpoint is what every online update starts from: one that does not load
    into the agent would fail each of them, and one loaded with pickle's full powers would run
    whatever code any token holder (every node) put in it. 422, nothing stored, nothing run."""
    torch = pytest.importorskip("torch")
    from training.export import export
    from training.ppo import Agent, Args, load_checkpoint, save_checkpoint

    def saved(obj: object) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    marker = tmp_path / "ran"
    agent = Agent()
    wrong = {k: v[..., :1] for k, v in agent.state_dict().items()}
    good = onnx_policy("harvest")
    for ckpt in (
        b"not a checkpoint",
        saved({"agent": agent.state_dict(), "args": _RunsCode(marker)}),
        saved({"agent": wrong}),
        saved({"optimizer": {}}),
    ):
        st, out = _publish(server, good, checkpoint=ckpt)
        assert st == 422 and "checkpoint" in out["error"], (st, out)
    assert js(http(server.url + "/v1/models")[2]) == {"latest": None, "versions": []}
    planted = tmp_path / "planted.pt"  # e.g. written into the registry some other way
    planted.write_bytes(saved({"agent": agent.state_dict(), "args": _RunsCode(marker)}))
    with pytest.raises(Exception, match="Weights only load failed"):
        load_checkpoint(planted)  # what the learner starts from
    assert not marker.exists()
    # a `faasrm train` checkpoint (optimizer, numpy's RNG state) of the model is taken
    path = tmp_path / "train.pt"
    save_checkpoint(path, agent, torch.optim.Adam(agent.parameters()), 3, 100, Args())
    export(agent, tmp_path / "train.onnx", grid=GRID)
    st, out = _publish(server, (tmp_path / "train.onnx").read_bytes(), checkpoint=path.read_bytes())
    assert st == 200 and out["version"] == 1, out
    stored = Registry(tmp_path / "data" / "models", GRID).latest().checkpoint_path
    Agent().load_state_dict(load_checkpoint(stored)["agent"])


def test_a_checkpoint_of_another_policy_than_the_model_is_refused(server, tmp_path: Path) -> None:
    """Online updates continue from the published checkpoint and weigh each record by its
    probability there against the one the node recorded under the model: a checkpoint of another
    policy makes every importance ratio compare two policies that have nothing in common."""
    torch = pytest.importorskip("torch")
    from training.export import export
    from training.ppo import Agent

    torch.manual_seed(0)
    ran, other = Agent(), Agent()
    export(ran, tmp_path / "ran.onnx", grid=GRID)
    onnx = (tmp_path / "ran.onnx").read_bytes()

    def saved(agent: Agent) -> bytes:
        buf = io.BytesIO()
        torch.save({"agent": agent.state_dict()}, buf)
        return buf.getvalue()

    for wrong in (onnx_policy("harvest"), onnx):
        st, out = _publish(server, wrong, checkpoint=saved(other))
        assert st == 422 and "scores differently" in out["error"], (st, out)
    assert js(http(server.url + "/v1/models")[2]) == {"latest": None, "versions": []}
    st, out = _publish(server, onnx, checkpoint=saved(ran))
    assert st == 200 and out["version"] == 1, out


NODE_IDS = ["n1", "host.example.com", "10.0.0.7:9", "x" * 128, "a b", "n1\n", "-n", "x" * 129]


@pytest.mark.parametrize("node", NODE_IDS)
def test_a_node_id_the_trainer_refuses_is_a_sidecar_config_error(node: str) -> None:
    """A node the trainer would refuse every batch of must not start at all."""
    try:
        decode_batch(batch(node, 0, [record(node, 0)]), 100)
        trainer_takes = True
    except BatchError as exc:
        assert "node_id" in exc.reason
        trainer_takes = False
    try:
        sidecar_config.from_dict({"node_id": node})
        sidecar_takes = True
    except ConfigError as exc:
        assert "node_id" in str(exc)
        sidecar_takes = False
    assert sidecar_takes == trainer_takes == (node in NODE_IDS[:4]), node


def test_a_token_that_is_not_utf8_is_refused_with_401(server) -> None:
    """aiohttp keeps header bytes that are not UTF-8 as surrogates: a wrong token, not a 500."""
    for raw in (b"Bearer \xff", b"\xc3( \xff"):
        headers = {"Authorization": raw, "Content-Type": "application/msgpack"}
        good = batch("n1", 0, [record("n1", 0)])
        assert http(server.url + "/v1/trajectories", good, token=None, headers=headers)[0] == 401
        assert http(server.url + "/v1/models", token=None, headers=headers)[0] == 401


def test_a_candidate_gated_against_a_version_that_is_no_longer_latest_is_refused(
    tmp_path: Path,
) -> None:
    """The learner gates a candidate against the latest version of when it started; if another
    was published meanwhile, adding the candidate would silently replace a model it was never
    compared with (a lost update). ``replaces`` names the version it was gated against (0: none)."""
    reg = Registry(tmp_path / "models", GRID)
    with pytest.raises(Superseded, match="the latest version is 0, not 3"):
        reg.add(onnx_policy("harvest"), replaces=3)
    assert reg.add(onnx_policy("harvest"), replaces=0).version == 1
    assert reg.add(onnx_policy("user")).version == 2  # an operator's publish: no check
    with pytest.raises(Superseded, match="the latest version is 2, not 1 "):
        reg.add(onnx_policy("largest"), replaces=1)
    with pytest.raises(Superseded):
        reg.add(onnx_policy("largest"), replaces=0)
    assert reg.latest().version == 2 and reg.versions() == [1, 2]
    assert not list((tmp_path / "models").glob(".tmp-*"))
    assert Registry(tmp_path / "models", GRID).latest().version == 2
    assert reg.add(onnx_policy("largest"), replaces=2).version == 3


def test_every_endpoint_but_health_and_metrics_needs_the_token(server) -> None:
    """Models and the learner's report are the cluster's data: a GET needs the token too."""
    assert _publish(server, onnx_policy("harvest"))[0] == 200
    for path in (
        "/v1/models",
        "/v1/models/latest",
        "/v1/models/latest?wait=5",
        "/v1/models/1",
        "/v1/models/1/meta",
        "/debug/learner",
    ):
        for token in (None, "wrong"):
            st, _, body = http(server.url + path, token=token)
            assert st == 401 and "bearer token" in js(body)["error"], (path, token, st)
        assert http(server.url + path)[0] == 200, path
    for path in ("/healthz", "/metrics"):
        assert http(server.url + path, token=None)[0] == 200, path
    # a GET with a wrong token is not a refused batch (the trainer's alert counts writes)
    metrics = http(server.url + "/metrics", token=None)[2].decode()
    assert 'faasrm_trainer_rejected_batches_total{reason="unauthorized"} 0.0' in metrics


def test_config_requires_token(tmp_path: Path, monkeypatch) -> None:
    from sidecar.config import ConfigError

    monkeypatch.delenv("FAASRM_TRAINER_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="token"):
        load_config(None, {"data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, {"token": "t", "nope": 1})
    (tmp_path / "tok").write_text("secret\n")
    assert load_config(None, {"token_file": str(tmp_path / "tok")}).resolve_token() == "secret"


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("max_model_bytes", 1024, "max_model_bytes 1024 must be >= 1048576"),
        ("long_poll_max_s", -1, "long_poll_max_s -1.0 must be > 0"),
        ("long_poll_max_s", 0, "long_poll_max_s 0.0 must be > 0"),
        ("learner.window_records", 0, "learner.window_records 0 must be >= 1"),
        ("learner.update_epochs", 0, "learner.update_epochs 0 must be >= 1"),
        ("learner.num_minibatches", 0, "learner.num_minibatches 0 must be >= 1"),
        ("learner.learning_rate", 0, "learner.learning_rate 0.0 must be > 0"),
        ("learner.clip_coef", -0.2, "learner.clip_coef -0.2 must be > 0"),
        ("learner.max_grad_norm", 0, "learner.max_grad_norm 0.0 must be > 0"),
        ("learner.ent_coef", -1, "learner.ent_coef -1.0 must be >= 0"),
        ("learner.vf_coef", -1, "learner.vf_coef -1.0 must be >= 0"),
        ("gate.real_window", 0, "gate.real_window 0 must be >= 1"),
        ("gate.max_failure_increase", -1, "gate.max_failure_increase -1 must be >= 0"),
        ("gate.real_max_increase", -0.1, "gate.real_max_increase -0.1 must be >= 0"),
        ("gate.slowdown_rfet", 0.5, "gate.slowdown_rfet 0.5 must be >= 1"),
    ],
)
def test_a_value_the_trainer_cannot_run_with_is_a_config_error_naming_the_key(
    key: str, value: float, needle: str
) -> None:
    """A zero window learned from every record ever stored ([-0:] is the whole list), zero
    epochs or mini-batches never updated, a tiny max_model_bytes refused every publish, and
    a long_poll_max_s <= 0 answered each long-poll at once (a node then polls in a tight loop)."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"token": "t", key: value})
    assert str(exc.value) == f"config: {needle}"
    assert load_config(None, {"token": "t"}).learner.window_records == 8192  # defaults load


def test_a_port_in_use_is_a_one_line_error_and_exit_code_2(tmp_path: Path) -> None:
    """As a config error: a traceback buried the reason, and the exit code (1) told a unit's
    restart policy nothing."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tr = TrainerProcess(tmp_path, port, {"learner.enabled": False})
        tr.start(wait=False)
        assert tr.proc is not None and tr.proc.wait(timeout=120) == 2
    err = tr.log.read_text()
    assert "Traceback" not in err, err
    assert f"faasrm: error: port {port} on host '127.0.0.1': Address already in use" in err, err


def test_on_the_loop_validation_gives_the_same_answers(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "data", ingest_workers=0) as srv:
        assert post(srv, batch("n1", 0, [record("n1", i) for i in range(5)]))[0] == 200
        assert post(srv, batch("n1", 0, [record("n1", 0)]))[0] == 200  # duplicate
        st, _, body = post(srv, batch("n1", 1, [record("n1", 0)], schema_version=3))
        assert st == 422 and "schema_version" in js(body)["error"]
        assert post(srv, b"\xc1")[0] == 400
        assert js(http(srv.url + "/healthz", token=None)[2])["records"] == 5


def _validator_pids() -> list[int]:
    """The live validator processes: this process's spawned multiprocessing children."""
    return sorted(
        p.pid
        for p in psutil.Process().children()
        if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    )


def test_batches_are_validated_off_the_loop_and_a_dead_validator_is_replaced(
    tmp_path: Path,
) -> None:
    """By default a batch is decoded in a worker process: a 15,000-record batch holds the GIL
    for about half a second inside msgpack, so on the loop (or in a thread) /healthz and the
    long-polls would wait that long. A worker that dies is replaced; the batch it had is
    answered 503 (nothing stored: the node resends it), later ones go to the new worker."""
    with ServerThread(tmp_path / "data") as srv:
        first = _validator_pids()
        assert len(first) == 1, first
        assert post(srv, batch("n1", 0, [record("n1", 0)]))[0] == 200
        psutil.Process(first[0]).kill()
        st, _, body = post(srv, batch("n1", 1, [record("n1", 1)]))
        assert st == 503 and "resend" in js(body)["error"]
        assert post(srv, batch("n1", 1, [record("n1", 1)]))[0] == 200
        now = _validator_pids()
        assert len(now) == 1 and now != first
        assert js(http(srv.url + "/healthz", token=None)[2])["batches"] == 2
