"""The trainer on small synthetic MOSI files: run folder, checkpoint, selection on valid only, TensorBoard,
learning the planted signal, modality subsets, determinism and config errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

import affectkit.train as train_mod
from affectkit.checkpoint import load_model
from affectkit.config import RunConfig, config_from_dict, load_config
from affectkit.data.mosi import load_mosi
from affectkit.data.synthetic_mosi import write_synthetic_mosi
from affectkit.errors import ConfigError, DataError
from affectkit.evaluate import evaluate_checkpoint
from affectkit.metrics import REGRESSION_METRICS
from affectkit.models.mosi_seq import LstmBaseline
from affectkit.train import train


@pytest.fixture(scope="module")
def run2(small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path_factory: pytest.TempPathFactory):
    """One 2-epoch run on the small file, shared by the run-folder tests: (config, result)."""
    cfg = fast_cfg("train.epochs=2", f"out_dir={tmp_path_factory.mktemp('runs')}", "name=r2")
    return cfg, train(cfg, data_path=small_mosi)


# ----------------------------------------------------------------------------------------- run folder


def test_run_folder_layout(run2: tuple[RunConfig, Any]) -> None:
    cfg, result = run2
    run_dir = result.run_dir
    assert run_dir.parent == Path(cfg.out_dir) / "r2"  # out_dir/name/timestamp
    assert {"config.yaml", "metrics.json", "best.pt"} <= {p.name for p in run_dir.iterdir()}
    assert config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())) == cfg
    assert load_config(run_dir / "config.yaml") == cfg


def test_metrics_json(run2: tuple[RunConfig, Any], small_mosi: Path) -> None:
    cfg, result = run2
    m = json.loads((result.run_dir / "metrics.json").read_text())
    assert m["best_epoch"] == result.best_epoch and 1 <= m["best_epoch"] <= 2
    assert m["select"] == "Corr" and m["model"] == "lstm_baseline" and m["data"] == str(small_mosi)
    for split in ("valid", "test"):
        assert set(m[split]) == {"loss", *REGRESSION_METRICS}
        assert m[split] == pytest.approx(getattr(result, split))
    assert [row["epoch"] for row in m["history"]] == [1, 2]
    for row in m["history"]:
        assert {"train_loss", "valid_loss", "lr", *(f"valid_{k}" for k in REGRESSION_METRICS)} <= set(row)
        assert not any(k.startswith("test") for k in row)
    assert m["n_params"] == sum(p.numel() for p in load_model(result.run_dir / "best.pt")[0].parameters())


def test_checkpoint_is_plain_data(run2: tuple[RunConfig, Any]) -> None:
    cfg, result = run2
    ckpt = torch.load(result.run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"] == cfg.to_dict()
    assert ckpt["info"] == {"dims": {"vision": 35, "text": 300, "audio": 74}, "seq_len": 50}
    model, cfg2, _ = load_model(result.run_dir / "best.pt")
    assert cfg2 == cfg and not model.training
    assert ckpt["state_dict"].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k])


def test_evaluate_checkpoint_reproduces_the_run(run2: tuple[RunConfig, Any], small_mosi: Path) -> None:
    _, result = run2
    saved = json.loads((result.run_dir / "metrics.json").read_text())
    out = evaluate_checkpoint(result.run_dir / "best.pt", small_mosi)
    assert list(out) == ["train", "valid", "test"]
    for split in ("valid", "test"):
        for k, v in saved[split].items():
            assert out[split][k] == pytest.approx(v, abs=1e-6), (split, k)
    assert list(evaluate_checkpoint(result.run_dir / "best.pt", small_mosi, ["test"])) == ["test"]
    with pytest.raises(ConfigError, match="unknown split"):
        evaluate_checkpoint(result.run_dir / "best.pt", small_mosi, ["dev"])


def test_evaluate_checkpoint_refuses_other_dims(run2: tuple[RunConfig, Any], tmp_path: Path) -> None:
    _, result = run2
    other = write_synthetic_mosi(tmp_path / "other.pkl", seed=1, sizes={"train": 4, "valid": 4, "test": 4},
                                 dims={"vision": 35, "text": 20, "audio": 74}, seq_len=10)
    with pytest.raises(ConfigError, match="text features have dim 20.*300"):
        evaluate_checkpoint(result.run_dir / "best.pt", other)


def test_evaluate_missing_checkpoint(tmp_path: Path, small_mosi: Path) -> None:
    with pytest.raises(DataError, match="checkpoint not found"):
        evaluate_checkpoint(tmp_path / "none.pt", small_mosi)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a loadable checkpoint"):
        evaluate_checkpoint(tmp_path / "junk.pt", small_mosi)


# ---------------------------------------------------------------------------------------- selection


def _scripted_evaluate(monkeypatch: pytest.MonkeyPatch, metric: str, script: list[float]) -> dict[str, list]:
    """Replace the trainer's ``evaluate``: the per-epoch valid ``metric`` follows ``script``; record every call
    (split, and a copy of the weights at each per-epoch validation)."""
    real = train_mod.evaluate
    seen: dict[str, list] = {"splits": [], "weights": []}

    def fake(model, task, data, split, *args, **kwargs):
        res = real(model, task, data, split, *args, **kwargs)
        seen["splits"].append(split)
        if split == "valid" and len(seen["weights"]) < len(script):
            seen["weights"].append({k: v.detach().clone() for k, v in model.state_dict().items()})
            res.metrics[metric] = script[len(seen["weights"]) - 1]
        return res

    monkeypatch.setattr(train_mod, "evaluate", fake)
    return seen


@pytest.mark.parametrize(
    ("metric", "script", "best"),
    [
        ("Corr", [math.nan, 0.4, 0.7, 0.7, 0.2], 3),  # NaN never wins; a tie keeps the first max
        ("Corr", [0.9, 0.1, 0.2, 0.3, 0.4], 1),
        ("MAE", [1.2, 0.9, 1.0, 0.9, 1.5], 2),  # lower is better for MAE
        ("Corr", [math.nan] * 5, 1),  # nothing defined: the first epoch is kept
    ],
)
def test_selection_uses_valid_only(
    monkeypatch: pytest.MonkeyPatch, small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path,
    metric: str, script: list[float], best: int,
) -> None:
    """The epoch with the best scripted valid metric is kept (its weights end up in best.pt); the test split
    is evaluated exactly once, after training, on those weights."""
    seen = _scripted_evaluate(monkeypatch, metric, script)
    cfg = fast_cfg("train.epochs=5", f"train.select={metric}", "model.hidden=8")
    result = train(cfg, data_path=small_mosi, run_dir=tmp_path)
    assert result.best_epoch == best
    assert seen["splits"] == ["valid"] * 5 + ["valid", "test"]
    hist = [row[f"valid_{metric}"] for row in result.history]
    assert hist == pytest.approx(script, nan_ok=True)
    state = torch.load(tmp_path / "best.pt", weights_only=True)["state_dict"]
    for k, v in seen["weights"][best - 1].items():
        assert torch.equal(state[k], v), k
    # the other epochs' weights differ (training moved them), so the check above can fail
    assert any(not torch.equal(state[k], v) for k, v in seen["weights"][best % 5].items())
    assert json.loads((tmp_path / "metrics.json").read_text())["best_epoch"] == best


def test_unknown_select_metric(small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.select 'test_Corr'.*valid: MAE, Corr"):
        train(fast_cfg("train.epochs=1", "train.select=test_Corr"), data_path=small_mosi, run_dir=tmp_path)


# --------------------------------------------------------------------------------------- TensorBoard


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_tensorboard_curves_and_graph(small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = fast_cfg("train.epochs=3", "train.tensorboard=true", "train.graph=true")
    result = train(cfg, data_path=small_mosi, run_dir=tmp_path / "tb_run")
    ea = EventAccumulator(str(tmp_path / "tb_run" / "tb"))
    ea.Reload()
    tags = ea.Tags()
    assert tags["graph"] is True
    assert ea.Graph() is not None
    scalars = set(tags["scalars"])
    expected = {"loss/train", "loss/valid", *(f"valid/{k}" for k in REGRESSION_METRICS)}
    assert expected <= scalars
    for tag in expected:
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag
    for tag, key in [("loss/train", "train_loss"), ("loss/valid", "valid_loss"), ("valid/Corr", "valid_Corr")]:
        logged = [e.value for e in ea.Scalars(tag)]
        assert logged == pytest.approx([row[key] for row in result.history], rel=1e-5), tag
    # TensorBoard and the graph trace must not change the run (the seeded shuffle included)
    plain = train(fast_cfg("train.epochs=3"), data_path=small_mosi, run_dir=tmp_path / "plain")
    assert plain.history == result.history and plain.test == result.test


# ---------------------------------------------------------------------------------------- learning


def test_learns_the_planted_signal(medium_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    """Far better than predicting the training mean: the synthetic labels are a function of the features."""
    data = load_mosi(medium_mosi)
    train_mean = float(data.splits["train"].labels.mean())
    test_labels = data.splits["test"].labels.numpy()
    baseline_mae = float(np.mean(np.abs(test_labels - train_mean)))
    result = train(fast_cfg("train.epochs=5", "model.hidden=32", "train.lr=0.003"), data=data, run_dir=tmp_path)
    assert result.test["Corr"] > 0.5
    assert result.test["MAE"] < 0.8 * baseline_mae
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_modality_subset_never_feeds_other_modalities(
    monkeypatch: pytest.MonkeyPatch, small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    keys: list[frozenset[str]] = []
    real_forward = LstmBaseline.forward

    def spy(self: LstmBaseline, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        keys.append(frozenset(batch))
        return real_forward(self, batch)

    monkeypatch.setattr(LstmBaseline, "forward", spy)
    result = train(fast_cfg("train.epochs=2", "model.modalities=[text]"), data_path=small_mosi, run_dir=tmp_path)
    # 2 epochs x 6 train batches, 2 x 2 valid, then valid 2 + test 3 batches
    assert len(keys) == 2 * 6 + 2 * 2 + 2 + 3
    assert set(keys) == {frozenset({"text", "labels"})}
    model, _, info = load_model(tmp_path / "best.pt")
    assert info["dims"] == {"text": 300}
    assert list(model.proj) == ["text"]
    assert evaluate_checkpoint(tmp_path / "best.pt", small_mosi)["test"]["MAE"] == pytest.approx(result.test["MAE"])


# ----------------------------------------------------------------------------------------- determinism


def test_same_seed_same_metrics(small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    a = train(fast_cfg("train.epochs=2"), data_path=small_mosi, run_dir=tmp_path / "a")
    b = train(fast_cfg("train.epochs=2"), data_path=small_mosi, run_dir=tmp_path / "b")
    c = train(fast_cfg("train.epochs=2", "train.seed=7"), data_path=small_mosi, run_dir=tmp_path / "c")
    assert a.history == b.history and a.test == b.test and a.valid == b.valid
    assert [r["train_loss"] for r in a.history] != [r["train_loss"] for r in c.history]


# ------------------------------------------------------------------------------------------- errors


def test_model_task_mismatch(small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    cfg = load_config(None, ["model.name=corect", "train.progress=false"])
    with pytest.raises(ConfigError, match="model 'corect' is for task 'conversation'.*mosi"):
        train(cfg, data_path=small_mosi, run_dir=tmp_path)
    assert not (tmp_path / "best.pt").exists()


def test_unknown_model(small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model 'lstm'.*lstm_baseline"):
        train(fast_cfg("model.name=lstm"), data_path=small_mosi, run_dir=tmp_path)


def test_missing_data_path(fast_cfg: Callable[..., RunConfig], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no data file"):
        train(fast_cfg(), run_dir=tmp_path)
    with pytest.raises(DataError, match="file not found"):
        train(fast_cfg(f"data.path={tmp_path / 'none.pkl'}"), run_dir=tmp_path)


@pytest.mark.parametrize("override", ["train.epochs=0", "train.batch_size=0", "train.eval_batch_size=-1",
                                      "train.loss=hinge", "train.scheduler=step"])
def test_bad_train_setting_is_config_error(
    small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path, override: str
) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        train(fast_cfg(override), data_path=small_mosi, run_dir=tmp_path)


def test_wrong_model_field_type_is_config_error(
    small_mosi: Path, fast_cfg: Callable[..., RunConfig], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="model.hidden"):
        train(fast_cfg("model.hidden=abc"), data_path=small_mosi, run_dir=tmp_path)
