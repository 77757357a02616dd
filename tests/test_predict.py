"""``affectkit predict``: labels and probabilities for every utterance, labels not needed; causal checkpoints
answer as the live engine does, others as the batch model (the one ``eval`` scores)."""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_import import EXAMPLE, fake_embed

from affectkit.checkpoint import load_model
from affectkit.cli import main
from affectkit.config import load_config
from affectkit.data.conversation import collate_dialogues, load_conversations
from affectkit.errors import ConfigError, DataError
from affectkit.features.table import import_table
from affectkit.models.registry import model_config
from affectkit.predict import format_predictions, predict_checkpoint
from affectkit.stream import Stream
from affectkit.tasks import get_task
from affectkit.train import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden=8", "model.text_ff=16", "model.text_layers=1", "model.graph_heads=1", "model.pcm_heads=1",
        "train.epochs=2", "train.progress=false", "train.tensorboard=false", "train.num_threads=1"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """The example CSV imported (8-d stand-in text vectors), a causal custom-preset checkpoint trained on it,
    and an offline (non-causal, speaker tags) one."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "ex.pkl"
    import_table(EXAMPLE, data, embed=fake_embed)
    causal = train(load_config(ROOT / "configs" / "corect_custom.yaml", [*TINY, f"out_dir={root / 'c'}"]),
                   data_path=data).run_dir / "best.pt"
    offline = train(load_config(ROOT / "configs" / "corect_custom.yaml", [
        *TINY, "model.causal=false", "model.wf=2", "model.context=null", "model.speaker_mode=tags",
        f"out_dir={root / 'o'}"]), data_path=data).run_dir / "best.pt"
    per_dialogue = train(load_config(ROOT / "configs" / "corect_custom.yaml", [
        *TINY, "model.causal=false", "model.wf=2", "model.context=null", f"out_dir={root / 'p'}"]),
        data_path=data).run_dir / "best.pt"
    return {"root": root, "data": data, "causal": causal, "offline": offline, "per_dialogue": per_dialogue}


def test_causal_predictions_equal_live_sessions_and_the_causal_batch_model(imported):
    names, rows = predict_checkpoint(imported["causal"], imported["data"], device="cpu")
    data = load_conversations(imported["data"])
    assert names == data.label_names and len(rows) == sum(len(d) for ds in data.splits.values() for d in ds)
    model, _, info = load_model(imported["causal"])
    session = Stream((model, info))
    by_key = {(r.dialogue, r.position): r for r in rows}
    for split, dialogues in data.splits.items():
        for d in dialogues:
            session.reset()
            live = [session.push(data.speakers[int(s)], text=d.features["text"][t])
                    for t, s in enumerate(d.speakers)]
            with torch.no_grad():
                batch = torch.softmax(model(collate_dialogues([d], ["text"])).double(), -1).numpy()
            for t, want in enumerate(live):
                got = by_key[(d.vid, t)]
                assert got.split == split and got.speaker == data.speakers[int(d.speakers[t])]
                assert got.text == d.sentences[t] and got.label == want.label
                np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)  # batched sessions: float32 sums
                np.testing.assert_allclose(got.probs, batch[t], atol=1e-5)


def test_offline_predictions_are_what_eval_scores(imported):
    names, rows = predict_checkpoint(imported["offline"], imported["data"], ["test", "train"], device="cpu")
    assert {r.split for r in rows} == {"test", "train"}
    model, cfg, info = load_model(imported["offline"])
    task = get_task("conversation")
    data = task.load_for_checkpoint(imported["data"], model_config(cfg.model_name, cfg.model_params), info)
    for split in ("train", "test"):
        res = evaluate(model, task, data, split, 4, lambda out, batch: torch.tensor(0.0), info)
        mine = [names.index(r.label) for r in rows if r.split == split]
        assert mine == res.pred.tolist()
        np.testing.assert_allclose([sum(r.probs) for r in rows], 1.0, atol=1e-9)


def test_unlabelled_conversations_with_new_speakers(imported, tmp_path):
    table = tmp_path / "new.csv"
    table.write_text("dialogue,speaker,text\n" + "".join(
        f"call{k},{who},utterance {k} {i}\n" for k in range(3) for i, who in enumerate(["Zoe", "Yan", "Zoe"])))
    data = tmp_path / "new.pkl"
    import_table(table, data, embed=fake_embed)
    names, rows = predict_checkpoint(imported["causal"], data, device="cpu")  # per_dialogue: any names
    assert len(rows) == 9 and {r.speaker for r in rows} == {"Zoe", "Yan"} and all(r.split == "test" for r in rows)
    assert all(r.label in names for r in rows)
    with pytest.raises(DataError, match="dialogue 'call0': unknown speaker tag 'Zoe'; the model knows"):
        predict_checkpoint(imported["offline"], data, device="cpu")  # speaker tags: the training file's only


def test_features_the_checkpoint_was_not_trained_on_are_refused(imported, tmp_path):
    raw = pickle.loads(imported["data"].read_bytes())
    for split in ("train", "dev", "test"):
        for d in raw[split]:
            d["text"] = np.zeros((len(d["sentence"]), 5), np.float32)
    (tmp_path / "dim.pkl").write_bytes(pickle.dumps(raw))
    with pytest.raises(ConfigError, match="text features have dim 5, the checkpoint was trained on 8"):
        predict_checkpoint(imported["causal"], tmp_path / "dim.pkl", device="cpu")
    raw = pickle.loads(imported["data"].read_bytes())
    raw["meta"]["encoder_ref"] = {"folder": "elsewhere", "sha256": "ab" * 32, "name": "tuned"}
    (tmp_path / "enc.pkl").write_bytes(pickle.dumps(raw))
    with pytest.raises(ConfigError, match="text vectors come from tuned, the checkpoint was trained on vectors of "
                                          "the shipped"):
        predict_checkpoint(imported["causal"], tmp_path / "enc.pkl", device="cpu")


def test_cli_predict_writes_csv_and_jsonl(imported, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", str(imported["causal"]), str(imported["data"]), "--out", str(out), "--device", "cpu"]) == 0
    table = list(csv.DictReader(out.open()))
    names, rows = predict_checkpoint(imported["causal"], imported["data"], device="cpu")
    assert list(table[0]) == ["split", "dialogue", "position", "speaker", "text", "label", "prob",
                              *(f"p_{n}" for n in names)]
    assert len(table) == len(rows) and table[3]["label"] == rows[3].label
    assert float(table[3][f"p_{names[1]}"]) == pytest.approx(rows[3].probs[1], abs=1e-6)
    assert main(["predict", str(imported["causal"]), str(imported["data"]), "--out", str(tmp_path / "p.jsonl"),
                 "--split", "dev"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert {x["split"] for x in lines} == {"dev"} and set(lines[0]["probs"]) == set(names)
    capsys.readouterr()
    assert main(["predict", str(imported["causal"]), str(imported["data"]), "--split", "test"]) == 0
    printed = capsys.readouterr().out
    assert printed == format_predictions(names, [r for r in rows if r.split == "test"])
    assert list(csv.reader(io.StringIO(printed)))[1][0] == "test"
    assert main(["predict", str(imported["causal"]), str(imported["data"]), "--out", str(tmp_path / "p.txt")]) == 2
    assert "use a .csv or .jsonl file" in capsys.readouterr().err


def test_offline_per_dialogue_speakers_take_any_names(imported, tmp_path):
    """An offline model with per-dialogue speakers: predictions equal eval's on the training file, do not
    change when a dialogue's speakers are renamed, and more speakers than slots is one line."""
    names, rows = predict_checkpoint(imported["per_dialogue"], imported["data"], ["train"], device="cpu")
    model, cfg, info = load_model(imported["per_dialogue"])
    task = get_task("conversation")
    data = task.load_for_checkpoint(imported["data"], model_config(cfg.model_name, cfg.model_params), info)
    res = evaluate(model, task, data, "train", 4, lambda out, batch: torch.tensor(0.0), info)
    assert [names.index(r.label) for r in rows] == res.pred.tolist()
    lines = EXAMPLE.read_text().splitlines()
    renamed = [lines[0]] + [line.replace(",Ana,", ",Someone,").replace(",Ben,", ",Another,") for line in lines[1:]]
    (tmp_path / "renamed.csv").write_text("\n".join(renamed) + "\n")
    import_table(tmp_path / "renamed.csv", tmp_path / "renamed.pkl", embed=fake_embed)
    again = {(r.dialogue, r.position): r for r in predict_checkpoint(imported["per_dialogue"], tmp_path / "renamed.pkl",
                                                                     device="cpu")[1]}
    for r in predict_checkpoint(imported["per_dialogue"], imported["data"], device="cpu")[1]:
        assert again[(r.dialogue, r.position)].probs == pytest.approx(r.probs, abs=1e-6)
    crowd = tmp_path / "crowd.csv"
    crowd.write_text("dialogue,speaker,text\n" + "".join(f"big,P{i},line {i}\n" for i in range(30)))
    import_table(crowd, tmp_path / "crowd.pkl", embed=fake_embed)
    with pytest.raises(DataError, match="dialogue 'big' has 30 speakers; this model has 24 speaker slots"):
        predict_checkpoint(imported["per_dialogue"], tmp_path / "crowd.pkl", device="cpu")


def test_raw_prosody_gets_the_checkpoints_standardiser(imported, tmp_path):
    """An unlabelled import keeps raw prosody (no train split to fit on): predict applies the checkpoint's
    standardiser, as live audio does, and refuses a file standardised with other statistics."""
    pytest.importorskip("opensmile")
    from affectkit.audio.prosody import DIM, Standardiser

    raw = pickle.loads(imported["data"].read_bytes())
    rng = np.random.default_rng(0)
    for split in ("train", "dev", "test"):
        for d in raw[split]:
            d["audio"] = (rng.standard_normal((len(d["sentence"]), DIM)) * 50 + 100).astype(np.float32)
    train_rows = np.concatenate([d["audio"] for d in raw["train"]])
    norm = Standardiser.fit(train_rows)
    standardised = pickle.loads(pickle.dumps(raw))
    for split in ("train", "dev", "test"):
        for d in standardised[split]:
            d["audio"] = norm(d["audio"])
    standardised["meta"]["audio_features"] = norm.to_meta()
    (tmp_path / "std.pkl").write_bytes(pickle.dumps(standardised))
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(raw))  # no meta audio_features: raw numbers
    ckpt = train(load_config(ROOT / "configs" / "corect_custom.yaml", [
        *TINY, "model.modalities=[text,audio]", f"out_dir={tmp_path / 'a'}"]),
        data_path=tmp_path / "std.pkl").run_dir / "best.pt"
    assert load_model(ckpt)[2]["audio_features"] == norm.to_meta()
    _, want = predict_checkpoint(ckpt, tmp_path / "std.pkl", device="cpu")
    _, got = predict_checkpoint(ckpt, tmp_path / "raw.pkl", device="cpu")
    assert [r.label for r in got] == [r.label for r in want]
    np.testing.assert_allclose([r.probs for r in got], [r.probs for r in want], atol=1e-5)
    other = pickle.loads(pickle.dumps(standardised))
    other["meta"]["audio_features"] = Standardiser.fit(train_rows[:5]).to_meta()
    (tmp_path / "other.pkl").write_bytes(pickle.dumps(other))
    with pytest.raises(DataError, match="standardised with other statistics than the checkpoint's"):
        predict_checkpoint(ckpt, tmp_path / "other.pkl", device="cpu")
