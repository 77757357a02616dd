"""Resume by hash (``studies.run.is_done``) on hand-made run folders: a run counts as done only with readable
metrics, the same data (sha256) and the same effective config; what changed is logged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from affectkit.config import dump_yaml, load_config
from affectkit.studies.run import is_done

ROOT = Path(__file__).resolve().parents[1]
SHA = "ab" * 32
OTHER = "cd" * 32


def _cfg(*overrides: str):
    return load_config(ROOT / "configs" / "mosi_lab.yaml", list(overrides))


def _folder(tmp_path: Path, cfg, sha: str | None = SHA, metrics: str = '{"test": {}}') -> Path:
    folder = tmp_path / "run"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    (folder / "metrics.json").write_text(metrics)
    if sha is not None:
        (folder / "provenance.json").write_text(json.dumps({"data_sha256": sha}))
    return folder


def test_same_config_same_data_is_done(tmp_path):
    cfg = _cfg()
    folder = _folder(tmp_path, cfg)
    assert is_done(folder, cfg, SHA) is True
    assert is_done(folder, cfg) is True  # no sha asked: not checked


def test_settings_without_effect_do_not_rerun(tmp_path):
    folder = _folder(tmp_path, _cfg("train.progress=true", "train.num_threads=1"))
    assert is_done(folder, _cfg("train.progress=false", "train.num_threads=2", "train.tensorboard=false"), SHA)


def test_unfinished_or_unreadable_runs_are_not_done(tmp_path):
    cfg = _cfg()
    folder = _folder(tmp_path, cfg, metrics="{not json")
    assert is_done(folder, cfg, SHA) is False
    (folder / "metrics.json").unlink()
    assert is_done(folder, cfg, SHA) is False
    folder = _folder(tmp_path, cfg)
    (folder / "config.yaml").write_text("train: [unclosed")
    assert is_done(folder, cfg, SHA) is False
    (folder / "config.yaml").write_text("train:\n  no_such_key: 1\n")  # a config that no longer loads
    assert is_done(folder, cfg, SHA) is False


def test_other_data_reruns_and_says_so(tmp_path, caplog):
    cfg = _cfg()
    folder = _folder(tmp_path, cfg, sha=OTHER)
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        assert is_done(folder, cfg, SHA) is False
    assert caplog.messages == [f"{folder}: trained on other data (sha256 {OTHER[:12]}, now {SHA[:12]}); "
                               "running it again"]
    caplog.clear()
    folder = _folder(tmp_path / "b", cfg, sha=None)
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        assert is_done(folder, cfg, SHA) is False
    assert caplog.messages == [f"{folder}: trained on other data (sha256 not recorded, now {SHA[:12]}); "
                               "running it again"]


def test_a_changed_setting_reruns_and_names_it(tmp_path, caplog):
    folder = _folder(tmp_path, _cfg("train.lr=0.001", "train.epochs=3"))
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        assert is_done(folder, _cfg("train.lr=0.002", "train.epochs=4"), SHA) is False
    assert caplog.messages == [f"{folder}: config changed since it ran (train.epochs, train.lr); running it again"]


def test_task_defaults_are_filled_on_both_sides(tmp_path):
    """A stored config with the task's defaults written out equals a new one that leaves them unset."""
    cfg = _cfg()
    from affectkit.train import resolve_config

    folder = _folder(tmp_path, resolve_config(cfg)[0])
    assert is_done(folder, cfg, SHA) is True
    assert is_done(folder, _cfg("train.select=MAE"), SHA) is False


@pytest.mark.parametrize("key", ["metrics.json", "config.yaml"])
def test_a_missing_file_is_not_done(tmp_path, key):
    cfg = _cfg()
    folder = _folder(tmp_path, cfg)
    (folder / key).unlink()
    assert is_done(folder, cfg, SHA) is False


def test_another_model_is_not_done(tmp_path):
    """Runs of two models share only some keys (each model has its own): a different model reruns."""
    folder = _folder(tmp_path, _cfg())
    assert is_done(folder, load_config(ROOT / "configs" / "mosi_lab.yaml", ["model.name=mosi_seq"]), SHA) is False
    assert is_done(folder, load_config(ROOT / "configs" / "corect_iemocap4.yaml"), SHA) is False  # other keys


def _corect(*overrides: str):
    return load_config(ROOT / "configs" / "corect_iemocap6.yaml", list(overrides))


def _corect_folder(tmp_path: Path, stored, model_config: dict | None) -> Path:
    folder = _folder(tmp_path, stored)
    prov = {"data_sha256": SHA}
    if model_config is not None:
        prov["model_config"] = model_config
    (folder / "provenance.json").write_text(json.dumps(prov))
    return folder


def test_a_default_that_changed_since_the_run_reruns_it(tmp_path, caplog):
    """A CORECT run from before its P-CM defaults changed (provenance without the model's every field, so the
    defaults of that time apply) is not counted as done, and the log names what changed; the same run with
    the model as built recorded is done, even when its config.yaml spells out a default the new one leaves out."""
    from affectkit.studies.run import full_model_config

    cfg = _corect()
    old = _corect_folder(tmp_path / "old", cfg, None)
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        assert is_done(old, cfg, SHA) is False
    assert "model.pcm_norm" in caplog.text and "model.pcm_scale" in caplog.text
    spelled = _corect("model.pcm_norm=pre")  # the current default, written out only on the stored side
    recorded = _corect_folder(tmp_path / "new", spelled, full_model_config(cfg))
    assert is_done(recorded, cfg, SHA) is True
    other = full_model_config(_corect("model.pcm_scale=false"))
    assert is_done(_corect_folder(tmp_path / "other", cfg, other), cfg, SHA) is False


def test_an_old_run_is_done_when_its_defaults_of_then_are_the_model_now(tmp_path):
    """No model config in provenance (an older run): its fields take the defaults of their time, and a run whose
    config spells out exactly those is done; the model is built from the stored config, not from defaults."""
    cfg = _corect("model.pcm_norm=post", "model.pcm_scale=false", "model.pcm_init=torch")
    assert is_done(_corect_folder(tmp_path / "old", cfg, None), cfg, SHA) is True


def test_a_model_field_added_since_the_run_takes_its_legacy_value(tmp_path, caplog, monkeypatch):
    """A run whose recorded model config lacks a field added since had that field's legacy value
    (``LEGACY_DEFAULTS``): equal to today's default, the run is done (a new switch does not rerun every
    study); a legacy value that differs from today's, or a field with no legacy value declared, reruns it."""
    from affectkit.models.corect import CorectConfig
    from affectkit.studies.run import full_model_config

    cfg = _corect()
    recorded = {k: v for k, v in full_model_config(cfg).items() if k not in ("text_init", "pcm_sink")}
    assert CorectConfig.LEGACY_DEFAULTS["text_init"] == CorectConfig().text_init  # "linear" then and now
    assert is_done(_corect_folder(tmp_path / "run", cfg, recorded), cfg, SHA) is True
    pre = {k: v for k, v in full_model_config(cfg).items() if k != "pcm_norm"}  # legacy "post", now "pre"
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        assert is_done(_corect_folder(tmp_path / "pre", cfg, pre), cfg, SHA) is False
    assert "model.pcm_norm" in caplog.text
    monkeypatch.setattr(CorectConfig, "LEGACY_DEFAULTS",
                        {k: v for k, v in CorectConfig.LEGACY_DEFAULTS.items() if k != "text_init"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        assert is_done(_corect_folder(tmp_path / "undeclared", cfg, recorded), cfg, SHA) is False
    assert "model.text_init" in caplog.text


def test_a_changed_field_that_does_nothing_in_this_model_keeps_the_run(tmp_path, caplog):
    """A text-only CORECT has no P-CM: a run recorded with the old P-CM defaults (post-norm, no scaling) is the
    same model as today's and stays done; with three modalities the same difference reruns it."""
    from affectkit.studies.run import full_model_config

    for modalities, done in (("[text]", True), ("[text,audio,visual]", False)):
        cfg = _corect(f"model.modalities={modalities}")
        recorded = {**full_model_config(cfg), "pcm_norm": "post", "pcm_scale": False, "pcm_sink": True}
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="affectkit"):
            assert is_done(_corect_folder(tmp_path / modalities, cfg, recorded), cfg, SHA) is done
        assert ("model.pcm_norm" in caplog.text) is not done
    text_only = _corect("model.modalities=[text]")
    other_text = {**full_model_config(text_only), "text_layers": 3}  # the text stack is there: a real change
    assert is_done(_corect_folder(tmp_path / "text", text_only, other_text), text_only, SHA) is False
