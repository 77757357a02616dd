"""Train and evaluate anything, anywhere: devices, task-owned defaults, declared classes, faithful eval,
early stopping. Device tests run on every device this machine has (the CPU here; CUDA/MPS where present)."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from affectkit.checkpoint import load_model, read_checkpoint
from affectkit.cli import main
from affectkit.config import load_config
from affectkit.data.conversation import load_conversations
from affectkit.data.synthetic_conversation import write_synthetic_conversations
from affectkit.device import resolve_device
from affectkit.errors import ConfigError, DataError
from affectkit.evaluate import evaluate_checkpoint
from affectkit.train import resolve_config, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden=16", "model.text_ff=32", "model.text_layers=1", "model.pcm_self_layers=1",
         "model.pcm_layers=1", "model.graph_heads=2", "train.progress=false", "train.tensorboard=false"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (
    ["mps"] if torch.backends.mps.is_available() else [])
SIZES = {"train": 12, "dev": 4, "test": 4}
DIMS = {"text": 8, "audio": 4, "visual": 6}


def _preset(name: str) -> str:
    return str(ROOT / "configs" / name)


def _synthetic(path: Path, preset: str = "iemocap4", seed: int = 1) -> Path:
    write_synthetic_conversations(path, preset=preset, seed=seed, n_dialogues=SIZES, dims=DIMS)
    return path


@pytest.fixture(scope="module")
def conv4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("c") / "iemocap4.pkl")


@pytest.fixture(scope="module")
def raw4_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _synthetic(tmp_path_factory.mktemp("r") / "raw.pkl", seed=2).read_bytes()


@pytest.fixture
def raw4(raw4_bytes: bytes) -> dict:
    """A fresh copy of a small synthetic IEMOCAP-4 file's dict (our own file: plain pickle is fine) to break."""
    return pickle.loads(raw4_bytes)


def _write(tmp_path: Path, raw: dict, name: str = "data.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(raw, protocol=4))
    return path


# ------------------------------------------------------------------------------------------------ devices


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ConfigError, match="'gpu' is not one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_absent_device_refused_before_training(conv4: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = load_config(_preset("corect_iemocap4.yaml"), [*SMALL, "train.device=cuda", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="train.device|no CUDA device"):
        train(cfg, data_path=conv4)
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("device", DEVICES)
def test_train_and_eval_on_each_device(device: str, conv4: Path, tmp_path: Path) -> None:
    """Model and batches on ``device``; the checkpoint holds CPU tensors and loads anywhere, same metrics."""
    cfg = load_config(_preset("corect_iemocap4.yaml"), [*SMALL, "train.epochs=2", f"train.device={device}",
                                                        f"out_dir={tmp_path}"])
    result = train(cfg, data_path=conv4, run_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["device"].startswith(device)
    ckpt = read_checkpoint(tmp_path / "run" / "best.pt")
    assert all(t.device.type == "cpu" for t in ckpt["state_dict"].values())
    for target in DEVICES:
        model, _, _ = load_model(tmp_path / "run" / "best.pt", target)
        assert {p.device.type for p in model.parameters()} == {torch.device(target).type}
        again = evaluate_checkpoint(tmp_path / "run" / "best.pt", conv4, ["test"], device=target)
        assert again["test"]["F1_weighted"] == pytest.approx(result.test["F1_weighted"], abs=1e-6)


# --------------------------------------------------------------------------------------- task defaults


def test_conversation_config_without_select_trains(conv4: Path, tmp_path: Path) -> None:
    """No select/loss/scheduler in the config: the conversation task supplies F1_weighted, ce, plateau."""
    cfg = load_config(None, [*SMALL, "data.task=conversation", "model.name=corect", "train.epochs=1",
                             f"out_dir={tmp_path}"])
    assert (cfg.train.select, cfg.train.loss, cfg.train.scheduler) == (None, None, None)
    result = train(cfg, data_path=conv4, run_dir=tmp_path / "run")
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.train.select, saved.train.loss, saved.train.scheduler) == ("F1_weighted", "ce", "plateau")
    assert result.select == "F1_weighted" and "F1_weighted" in result.valid


@pytest.mark.parametrize("override, match", [
    ("train.select=Corr", "train.select 'Corr' is not a metric for task 'conversation'; valid: Acc, F1_weighted"),
    ("train.select=test_F1_weighted", "train.select 'test_F1_weighted' is not a metric"),
    ("train.loss=mse", "train.loss 'mse' is not valid for task 'conversation'; valid: ce"),
    ("train.scheduler=step", "train.scheduler 'step' is not valid .*valid: cosine, plateau, none"),
    ("train.patience=-1", "train.patience must be >= 0"),
])
def test_bad_choice_refused_before_any_training(override: str, match: str, tmp_path: Path) -> None:
    """Refused from the config alone: the data path does not even exist, and no run folder is made."""
    cfg = load_config(_preset("corect_iemocap4.yaml"), [*SMALL, override, f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=match):
        train(cfg, data_path=tmp_path / "absent.pkl")
    assert not any(tmp_path.iterdir())


def test_presets_compose_from_one_base() -> None:
    """The four CORECT presets share model and train; they differ only in data (and MELD's modalities)."""
    cfgs = {n: resolve_config(load_config(_preset(f"corect_{n}.yaml")))[0]
            for n in ("iemocap6", "iemocap4", "meld", "mosei2")}
    train_sections = {n: c.train for n, c in cfgs.items()}
    assert len({repr(t) for t in train_sections.values()}) == 1
    models = {n: {k: v for k, v in c.model.items() if k != "modalities"} for n, c in cfgs.items()}
    assert len({repr(m) for m in models.values()}) == 1
    assert cfgs["iemocap6"].data.classes == ["hap", "sad", "neu", "ang", "exc", "fru"]
    assert cfgs["iemocap4"].data.classes == ["hap", "sad", "neu", "ang"]
    assert cfgs["meld"].data.classes == ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
    assert cfgs["mosei2"].data.classes == ["negative", "positive"]
    causal = load_config(_preset("corect_meld_causal.yaml"))
    assert causal.model["causal"] is True and causal.model["wf"] == 0
    assert causal.data.classes == cfgs["meld"].data.classes


# ---------------------------------------------------------------------------------------- declared classes


def test_label_outside_the_class_list_is_refused(tmp_path: Path, raw4: dict) -> None:
    del raw4["label_names"]  # a file without names: only the preset's list can catch a stray label
    raw4["dev"][1]["labels"][2] = 17
    path = _write(tmp_path, raw4)
    vid = raw4["dev"][1]["vid"]
    with pytest.raises(DataError, match=rf"\[dev\] dialogue '{vid}': label 17 at utterance 2 outside \[0, 4\) "
                                        r"\(the expected classes: hap, sad, neu, ang\)"):
        load_conversations(path, classes=["hap", "sad", "neu", "ang"])
    cfg = load_config(_preset("corect_iemocap4.yaml"), [*SMALL, f"out_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match="label 17 at utterance 2"):
        train(cfg, data_path=path)
    assert load_conversations(path).n_classes == 18  # without a class list the file alone decides


def test_label_names_that_disagree_are_refused(tmp_path: Path, raw4: dict) -> None:
    raw4["label_names"] = ["happy", "sad", "neutral", "angry"]
    path = _write(tmp_path, raw4)
    with pytest.raises(DataError, match=r"label_names \['happy', 'sad', 'neutral', 'angry'\] differ from "
                                        r"the expected classes \['hap', 'sad', 'neu', 'ang'\]"):
        load_conversations(path, classes=["hap", "sad", "neu", "ang"])
    six = load_config(_preset("corect_iemocap6.yaml"), [*SMALL, f"out_dir={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match="differ from the expected classes"):
        train(six, data_path=_synthetic(tmp_path / "four.pkl"))


def test_class_without_training_example_warns(tmp_path: Path, raw4: dict, caplog: pytest.LogCaptureFixture) -> None:
    for d in raw4["train"]:
        d["labels"] = [0 if lab == 3 else lab for lab in d["labels"]]
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        data = load_conversations(_write(tmp_path, raw4), classes=["hap", "sad", "neu", "ang"])
    assert data.n_classes == 4
    assert any("no training example of class ang" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ faithful eval


@pytest.fixture(scope="module")
def trained(conv4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(_preset("corect_iemocap4.yaml"), [*SMALL, "train.epochs=1", f"out_dir={out}"])
    train(cfg, data_path=conv4, run_dir=out / "run")
    return out / "run" / "best.pt"


def test_eval_uses_the_checkpoints_speaker_slots(trained: Path, tmp_path: Path, raw4: dict,
                                                  raw4_bytes: bytes) -> None:
    """A file with the speakers in another order (or a subset) maps tags through the checkpoint's slots."""
    info = read_checkpoint(trained)["info"]
    raw4["speakers"] = list(reversed(raw4["speakers"]))  # the file declares another order
    path = _write(tmp_path, raw4)
    base = evaluate_checkpoint(trained, _write(tmp_path, pickle.loads(raw4_bytes), "same.pkl"), ["test"])
    again = evaluate_checkpoint(trained, path, ["test"])
    assert again["test"]["F1_weighted"] == pytest.approx(base["test"]["F1_weighted"])
    assert load_conversations(path).speakers != info["speakers"]  # re-deriving would have shuffled slots


def test_eval_unknown_speaker_is_one_line(trained: Path, tmp_path: Path, raw4: dict,
                                          capsys: pytest.CaptureFixture) -> None:
    raw4["test"][0]["speakers"][1] = "Z"
    del raw4["speakers"]
    path = _write(tmp_path, raw4)
    known = read_checkpoint(trained)["info"]["speakers"]
    with pytest.raises(DataError, match=rf"unknown speaker tag 'Z'; the model knows {known!r}".replace("[", r"\[")):
        evaluate_checkpoint(trained, path)
    assert main(["eval", str(trained), str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("affectkit: error:") and "'Z'" in err and len(err.splitlines()) == 1


def test_eval_refuses_another_label_set(trained: Path, tmp_path: Path, raw4: dict) -> None:
    six = _synthetic(tmp_path / "six.pkl", preset="iemocap6")
    with pytest.raises(DataError, match="differ from the expected classes"):
        evaluate_checkpoint(trained, six)
    del raw4["label_names"]
    raw4["test"][0]["labels"][0] = 5
    with pytest.raises(DataError, match="label 5 at utterance 0 outside"):
        evaluate_checkpoint(trained, _write(tmp_path, raw4))


# ---------------------------------------------------------------------------------------- early stopping


def test_early_stopping_ends_the_run_and_says_so(small_mosi: Path, fast_cfg, tmp_path: Path) -> None:
    """lr 0 never improves after epoch 1: with patience 2 the run stops after epoch 3, keeping epoch 1."""
    result = train(fast_cfg("train.epochs=10", "train.patience=2", "train.lr=0"), data_path=small_mosi,
                   run_dir=tmp_path)
    assert (result.best_epoch, result.epochs_run, result.max_epochs, result.stopped_early) == (1, 3, 10, True)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (saved["epochs_run"], saved["max_epochs"], saved["patience"]) == (3, 10, 2)
    assert len(saved["history"]) == 3
    full = train(fast_cfg("train.epochs=3", "train.lr=0"), data_path=small_mosi, run_dir=tmp_path / "b")
    assert (full.epochs_run, full.stopped_early) == (3, False)
    np.testing.assert_allclose(full.test["MAE"], result.test["MAE"])
