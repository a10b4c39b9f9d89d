"""Model loading: validation, refusal keeps the running model, rollback, the rule fallback."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from sidecar_helpers import GRID, onnx_policy, write_policy

from sidecar.core.features import FEATURE_VERSION
from sidecar.core.grid import ResourceGrid
from sidecar.core.policy import fallback_scorer
from sidecar.models import ModelManager, ModelRejected, default_model_path, probe_rows, validate

pytest.importorskip("onnxruntime")


def test_default_model_path_is_in_the_repository() -> None:
    p = default_model_path()
    assert p.name == "default.onnx" and p.parent.name == "models"
    assert (p.parent.parent / "sidecar" / "models.py").exists()


SHIPPED = [
    (ResourceGrid(1.0, 8, 64.0, 8), "default.onnx"),  # 8-core invokers
    (ResourceGrid(0.25, 8, 64.0, 8), "invoker.onnx"),  # 2-core hosts (sidecar/example.toml)
]


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch) -> Path:
    """A models/ folder like the shipped one, with each grid's model on this code's schema."""
    for grid, name in SHIPPED:
        write_policy(tmp_path / name, grid=grid)
    monkeypatch.setattr("sidecar.models.MODELS_DIR", tmp_path)
    return tmp_path


@pytest.mark.parametrize("grid, shipped", SHIPPED)
def test_an_empty_model_path_loads_the_shipped_model_of_the_configured_grid(
    models_dir: Path, grid: ResourceGrid, shipped: str
) -> None:
    mm = ModelManager(grid)
    assert mm.path == models_dir / shipped
    assert mm.load() and mm.current.source == "onnx", mm.last_error
    assert json.loads(mm.current.metadata["grid"]) == dataclasses.asdict(grid)


@pytest.mark.parametrize("grid, shipped", SHIPPED)
def test_the_shipped_models_load_or_are_refused_for_their_feature_schema(
    grid: ResourceGrid, shipped: str
) -> None:
    """The real models/: each is found for its grid, and loads when it was trained on this
    code's feature schema; a model from an older schema is refused with that reason (the rule
    runs instead) until it is retrained."""
    mm = ModelManager(grid)
    assert mm.path.name == shipped and mm.path.parent.name == "models"
    meta = json.loads(Path(str(mm.path) + ".json").read_text())
    if meta["feature_version"] == str(FEATURE_VERSION):
        assert mm.load() and mm.current.source == "onnx", mm.last_error
    else:
        assert mm.load() is False and mm.current.source == "fallback"
        assert "feature_version" in mm.last_error["reason"]


def test_a_grid_no_shipped_model_fits_names_default_and_is_refused_with_the_reason(
    models_dir: Path,
) -> None:
    mm = ModelManager(ResourceGrid(0.5, 4, 128.0, 4))
    assert mm.path == models_dir / "default.onnx"
    assert mm.load() is False and mm.current.source == "fallback"
    assert "trained for grid" in mm.last_error["reason"]


def test_no_model_file_falls_back_to_the_user_size_rule(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("sidecar.models.default_model_path", lambda grid: tmp_path / "default.onnx")
    mm = ModelManager(GRID)
    assert mm.load() is True
    assert mm.current.source == "fallback" and "no model file" in mm.ready_note()
    scorer, model_id = mm.get()
    assert model_id == "fallback" and scorer.scores(probe_rows(GRID)[0]).shape == (GRID.n,)


def test_the_configured_rule_runs_without_a_model_and_is_named(tmp_path: Path) -> None:
    mm = ModelManager(GRID, str(tmp_path / "missing.onnx"), rule="smallest")
    assert mm.load() is False and mm.current is mm.fallback
    rows = probe_rows(GRID)[0]
    np.testing.assert_array_equal(
        mm.get()[0].scores(rows), fallback_scorer("smallest").scores(rows)
    )
    assert mm.status()["rule"] == "smallest" and "'smallest' rule" in mm.ready_note()
    mm.configure(str(tmp_path / "missing.onnx"), "", "user")  # a reload switches the rule
    np.testing.assert_array_equal(mm.get()[0].scores(rows), fallback_scorer("user").scores(rows))
    assert mm.status()["rule"] == "user" and "'user' rule" in mm.ready_note()


def test_a_valid_model_is_swapped_in_and_identified(tmp_path: Path) -> None:
    p = write_policy(tmp_path / "m.onnx")
    mm = ModelManager(GRID, str(p))
    assert mm.load()
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    assert mm.current.id == f"sha256:{sha[:12]}" and mm.current.source == "onnx"
    assert mm.current.metadata["feature_version"] == str(FEATURE_VERSION)
    rows = probe_rows(GRID)[0]
    scores = mm.get()[0].scores(rows)
    assert int(np.argmax(scores)) == 0  # prefers the smallest candidate
    assert mm.load() is True and mm.loads_ok == 1  # unchanged file: no reload


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: d[: len(d) // 2], "onnxruntime cannot load"),
        (lambda d: b"", "onnxruntime cannot load"),
        (lambda d: onnx_policy("nan"), "non-finite"),
        (lambda d: onnx_policy("wrong_shape"), "wrong output shape"),
        (lambda d: onnx_policy(metadata=False), "feature_version"),
        (lambda d: onnx_policy(grid=ResourceGrid()), "trained for grid"),
    ],
    ids=["truncated", "empty", "nan", "wrong_shape", "no_metadata", "other_grid"],
)
def test_bad_models_are_refused_and_the_running_one_kept(
    tmp_path: Path, mutate, reason: str
) -> None:
    good = write_policy(tmp_path / "good.onnx")
    mm = ModelManager(GRID, str(good))
    assert mm.load()
    running = mm.current.id
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(mutate(good.read_bytes()))
    assert mm.load(bad) is False
    assert mm.current.id == running
    assert reason in mm.last_error["reason"] and mm.last_error["path"] == str(bad)
    assert mm.status()["last_error"]["reason"] == mm.last_error["reason"]


def test_sha256_from_config_or_sidecar_json(tmp_path: Path) -> None:
    p = write_policy(tmp_path / "m.onnx")
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    assert ModelManager(GRID, str(p), sha256=sha).load()
    mm = ModelManager(GRID, str(p), sha256="0" * 64)
    assert not mm.load() and "sha256" in mm.last_error["reason"]
    Path(str(p) + ".json").write_text(json.dumps({"sha256": "f" * 64}))
    mm2 = ModelManager(GRID, str(p))
    assert not mm2.load() and "does not match" in mm2.last_error["reason"]
    Path(str(p) + ".json").write_text(json.dumps({"sha256": sha}))
    assert ModelManager(GRID, str(p)).load()


def test_configured_but_missing_model_is_an_error_not_silence(tmp_path: Path) -> None:
    mm = ModelManager(GRID, str(tmp_path / "missing.onnx"))
    assert mm.load() is False
    assert mm.current.source == "fallback" and "cannot read" in mm.last_error["reason"]


def test_rollback_to_previous_then_fallback(tmp_path: Path) -> None:
    a = write_policy(tmp_path / "a.onnx", "harvest")
    b = write_policy(tmp_path / "b.onnx", "user")
    mm = ModelManager(GRID, str(a))
    assert mm.load() and mm.load(b)
    id_a = f"sha256:{hashlib.sha256(a.read_bytes()).hexdigest()[:12]}"
    assert mm.previous is not None and mm.previous.id == id_a
    assert mm.rollback("test") and mm.current.id == id_a
    assert mm.rollback("again") and mm.current.source == "fallback"
    assert mm.rollback("nothing left") is False


def test_validate_direct() -> None:
    _scorer, meta = validate(onnx_policy(), GRID, None)
    assert meta["schema_hash"]
    with pytest.raises(ModelRejected):
        validate(b"not a model", GRID, None)
