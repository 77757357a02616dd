"""Distilling a fine-tuned encoder into a smaller one: the projection by hand, the student learning the teacher's
vectors, the folder it writes (the teacher's recipe and reference, usable by ``features text``), bad input refused.
A tiny fine-tuned MPNet teaches a tiny BERT on the tiny transcript file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from finetune_helpers import write_tiny_base, write_tiny_iemocap, write_tiny_mpnet
from hypothesis import given, settings
from hypothesis import strategies as st

from affectkit.cli import main
from affectkit.errors import ConfigError
from affectkit.features.encoder_ref import ENCODER_FILE, SUMMARY_FILE, LocalEncoder, encoder_sha256
from affectkit.features.inputs import dialogue_inputs
from affectkit.safe_pickle import safe_load

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from affectkit.features.distil import (  # noqa: E402
    DistilConfig,
    _agreement,
    distil_encoder,
    principal_projection,
    projected_targets,
)
from affectkit.features.finetune import FinetuneConfig, finetune_text  # noqa: E402

FAST = dict(epochs=8, batch_size=8, max_length=32, lr=1e-2, warmup=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distil")
    data = write_tiny_iemocap(root / "data", n_train=30, n_valid=6, n_test=6)
    teacher = root / "teacher"
    finetune_text("iemocap", data, teacher, FinetuneConfig(context=1, speaker=True, dropout=0.0, **FAST),
                  progress=False, base=write_tiny_mpnet(root / "mpnet"), threads=1)
    return {"data": data, "teacher": teacher, "student": write_tiny_base(root / "student", seed=1), "root": root}


@pytest.fixture(scope="module")
def distilled(tiny: dict[str, Path]) -> tuple[Path, dict]:
    out = tiny["root"] / "distilled"
    summary = distil_encoder(tiny["teacher"], "iemocap", tiny["data"], out, DistilConfig(**FAST), progress=False,
                             student=tiny["student"], threads=1, cache_dir=tiny["root"] / "cache")
    return out, summary


def test_principal_projection_by_hand():
    """Points on a line y = 2x (plus the mean (1, 1)): one direction keeps everything, along (1, 2)/sqrt(5)."""
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    pts = np.stack([x, 2 * x], 1) + 1.0
    mean, dirs, kept = principal_projection(pts, 1)
    np.testing.assert_allclose(mean, [1.0, 1.0])
    np.testing.assert_allclose(np.abs(dirs[:, 0]), np.array([1.0, 2.0]) / np.sqrt(5), atol=1e-12)
    assert kept == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs((pts - mean) @ dirs)[:, 0], np.abs(x) * np.sqrt(5), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 6), st.integers(0, 10_000))
def test_principal_projection_is_orthonormal_and_ordered(n, dim, seed):
    pts = np.random.default_rng(seed).normal(size=(n, dim)) * np.arange(1, dim + 1)
    mean, dirs, kept = principal_projection(pts, dim)
    k = min(n, dim)
    assert dirs.shape == (dim, k)
    np.testing.assert_allclose(dirs.T @ dirs, np.eye(k), atol=1e-9)
    proj = (pts - mean) @ dirs
    spread = proj.var(0)
    assert np.all(np.diff(spread) <= 1e-9)  # the first direction keeps the most
    assert kept == pytest.approx(1.0)  # every direction kept: nothing lost


def test_targets_are_fitted_on_train_and_scaled_to_unit_variance():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 6)) * [3.0, 2.0, 1.0, 0.5, 0.1, 0.01] * 0.01 + 5.0
    dev = rng.normal(size=(7, 6)) * 0.01 + 5.0
    targets, kept = projected_targets({"train": train, "dev": dev}, 3)
    assert targets["train"].shape == (40, 3) and targets["dev"].shape == (7, 3)
    assert targets["train"].var(0).mean() == pytest.approx(1.0, rel=1e-5)
    assert np.abs(targets["train"].mean(0)).max() < 1e-5  # centred on train's mean ...
    mean, dirs, _ = principal_projection(train, 3)
    scale = np.sqrt(((train - mean) @ dirs).var(0).mean())
    np.testing.assert_allclose(targets["dev"], (dev - mean) @ dirs / scale, rtol=1e-5)  # ... dev by the same map
    assert 0.95 < kept < 1.0
    with pytest.raises(Exception, match="directions"):
        projected_targets({"train": train[:3]}, 6)


def test_agreement_by_hand():
    target = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert _agreement(target, target) == {"mse": 0.0, "cosine": 1.0, "r2": 1.0}
    got = _agreement(np.array([[1.0, 1.0], [0.0, 1.0]]), target)
    assert got["mse"] == pytest.approx(0.25)  # one coordinate of four off by 1
    assert got["cosine"] == pytest.approx((1 / np.sqrt(2) + 1) / 2)
    assert got["r2"] == pytest.approx(1 - 0.25 / 0.25)  # target variance per coordinate: 0.25


def test_student_learns_the_teachers_vectors_and_writes_an_encoder(distilled, tiny):
    out, summary = distilled
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 9))
    first, best = summary["history"][0], min(summary["history"], key=lambda h: h["dev_mse"])
    assert summary["best_epoch"] == best["epoch"] and summary["dev"]["mse"] == pytest.approx(best["dev_mse"])
    assert best["dev_mse"] < 0.5 * first["dev_mse"]
    assert summary["dev"]["r2"] > 0.5 and summary["test"]["r2"] > 0.5, summary["test"]
    info = json.loads((out / ENCODER_FILE).read_text())
    teacher_info = json.loads((tiny["teacher"] / ENCODER_FILE).read_text())
    assert info["recipe"] == teacher_info["recipe"] and info["dim"] == 16
    assert info["distilled_from"]["sha256"] == encoder_sha256(tiny["teacher"])
    assert summary["encoder_sha256"] == encoder_sha256(out) and (out / SUMMARY_FILE).is_file()
    assert not (out / "head.safetensors").exists()


def test_features_from_the_student_follow_the_teachers_recipe(distilled, tiny, tmp_path):
    from affectkit.features.text import build_text_features

    out, _ = distilled
    build_text_features("iemocap", tiny["data"], tmp_path / "f.pkl", cache_dir=tmp_path / "c", progress=False,
                        encoder=out)
    layout = safe_load(tmp_path / "f.pkl")
    d = layout["test"][0]
    recipe_inputs = dialogue_inputs(d["speakers"], d["sentence"], LocalEncoder(out).recipe)
    assert any(":" in t for t in recipe_inputs)  # the teacher's speaker tags and past turn
    np.testing.assert_allclose(d["text"], LocalEncoder(out).encode(recipe_inputs), atol=1e-5)
    assert layout["meta"]["encoder_ref"]["sha256"] == encoder_sha256(out)


def test_a_frozen_base_or_a_plain_folder_is_refused_as_teacher(tiny, tmp_path):
    with pytest.raises(Exception, match="not a fine-tuned encoder"):
        distil_encoder(tiny["student"], "iemocap", tiny["data"], tmp_path / "o", progress=False)
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    (frozen / ENCODER_FILE).write_text(json.dumps({"packaged": "mpnet", "base": "all-mpnet-base-v2", "dim": 16,
                                                   "recipe": {"context": 0, "speaker": False}, "max_length": 32}))
    with pytest.raises(ConfigError, match="frozen base encoder"):
        distil_encoder(frozen, "iemocap", tiny["data"], tmp_path / "o", progress=False)
    with pytest.raises(ConfigError, match="epochs"):
        DistilConfig(epochs=0)


@pytest.mark.parametrize(("extra", "message"), [(["--epochs", "0"], "epochs"),
                                                 (["--teacher", "nowhere"], "does not exist")])
def test_cli_distil_rejects_bad_input_in_one_line(tiny, tmp_path, capsys, extra, message):
    args = ["distil-text", "--teacher", str(tiny["teacher"]), "--dataset", "iemocap", "--source", str(tiny["data"]),
            str(tmp_path / "o"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "o").exists()


def test_cli_distil_writes_an_encoder_and_says_how_close_it_is(tiny, tmp_path, capsys):
    out = tmp_path / "student"
    rc = main(["-q", "distil-text", "--teacher", str(tiny["teacher"]), "--dataset", "iemocap", "--source",
               str(tiny["data"]), str(out), "--epochs", "1", "--batch-size", "16", "--max-length", "16",
               "--lr", "1e-2", "--threads", "1", "--student", str(tiny["student"])])
    said = capsys.readouterr().out
    assert rc == 0 and "wrote encoder" in said and "distilled from" in said and "test R^2" in said
    assert json.loads((out / ENCODER_FILE).read_text())["distilled_from"]["sha256"] == encoder_sha256(tiny["teacher"])
