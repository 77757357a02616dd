"""``affectkit import``: tables of utterances (CSV/TSV/JSONL/folder) -> the conversation layout; every bad row
is one line naming file, line and column, and nothing is written."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import wave
from pathlib import Path

import numpy as np
import pytest

from affectkit.cli import main
from affectkit.data.conversation import load_conversations
from affectkit.data.table import read_table
from affectkit.errors import DataError
from affectkit.features.table import import_table

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "synthetic_meetings.csv"
HEADER = "dialogue,order,speaker,text,label\n"


def fake_embed(sentences: list[str], dim: int = 8) -> np.ndarray:
    """Deterministic stand-in for the sentence encoder (the real one is tested in test_import_e2e)."""
    return np.stack([np.random.default_rng(int.from_bytes(hashlib.sha1(s.encode()).digest()[:4], "little"))
                     .standard_normal(dim).astype(np.float32) for s in sentences])


def _rows(n_dialogues: int = 4, n: int = 3) -> str:
    labels = ["happy", "sad", "neutral"]
    return "".join(f"d{k},{i},S{i % 2},sentence {k} {i},{labels[(k + i) % 3]}\n"
                   for k in range(n_dialogues) for i in range(n))


def _write(tmp_path: Path, text: str | bytes, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


def _wav(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), "<i2").tobytes())
    return path


# ------------------------------------------------------------------------------------------ bad inputs

BAD: dict[str, tuple[str, str]] = {
    # kind: (table text after the header, expected message (regex) after "t.csv:LINE: ")
    "missing text": ("d0,0,A,,happy\n", r"t\.csv:2: column 'text': missing text"),
    "empty speaker": ("d0,0,,hello,happy\n", r"t\.csv:2: column 'speaker': empty speaker"),
    "empty dialogue id": (",0,A,hello,happy\n", r"t\.csv:2: column 'dialogue': empty dialogue id"),
    "missing label": ("d0,0,A,hello,\n", r"t\.csv:2: column 'label': missing label"),
    "order gap": ("d0,0,A,a,happy\nd0,1,B,b,sad\nd0,3,A,c,sad\n",
                  r"t\.csv:4: column 'order': dialogue 'd0': position 3 follows 1; a gap \(2 missing\)"),
    "order repeat": ("d0,0,A,a,happy\nd0,1,B,b,sad\nd0,1,A,c,sad\n",
                     r"t\.csv:4: column 'order': dialogue 'd0': position 1 repeats line 3"),
    "order not an integer": ("d0,first,A,a,happy\n", r"t\.csv:2: column 'order': 'first' is not an integer"),
    "ragged row": ("d0,0,A,hello, world,happy\n", r"t\.csv:2: 6 cells but the header has 5 columns"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_rows_are_one_line_errors_and_nothing_is_written(kind, tmp_path, capsys):
    body, expected = BAD[kind]
    table = _write(tmp_path, HEADER + body)
    out = tmp_path / "out.pkl"
    code = main(["import", str(table), str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("affectkit: error: "), err
    assert re.search(expected, lines[0]), (expected, lines[0])
    assert not out.exists() and list(tmp_path.iterdir()) == [table]


def _refused(argv: list[str], capsys, match: str, out: Path) -> str:
    code = main(["import", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("affectkit: error: "), err
    assert re.search(match, err), (match, err)
    assert not out.exists()
    return err


def test_unknown_label_against_declared_classes(tmp_path, capsys):
    t = _write(tmp_path, HEADER + _rows(3) + "d9,0,A,hi,angry\n")
    _refused([str(t), str(tmp_path / "o.pkl"), "--classes", "happy,sad,neutral"], capsys,
             r"t\.csv:11: column 'label': unknown label 'angry'; declared classes: happy, sad, neutral",
             tmp_path / "o.pkl")


def test_missing_column_names_the_mapping_option(tmp_path, capsys):
    t = _write(tmp_path, "conv,speaker,utterance\nd0,A,hi\n")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys,
             r"t\.csv:1: column 'dialogue' \(dialogue\) missing; the table has: conv, speaker, utterance "
             r"\(map yours with --column dialogue=NAME\)", tmp_path / "o.pkl")
    _refused([str(t), str(tmp_path / "o.pkl"), "--column", "dialogue=conv", "--column", "text=utterance",
              "--column", "label=emotion"], capsys,
             r"column 'emotion' \(label\) missing", tmp_path / "o.pkl")


def test_unknown_split_and_a_dialogue_in_two_splits(tmp_path, capsys):
    head = "dialogue,speaker,text,label,split\n"
    t = _write(tmp_path, head + "d0,A,hi,happy,train\nd1,A,yo,sad,holdout\n")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys,
             r"t\.csv:3: column 'split': split 'holdout' is not train, dev \(valid\) or test", tmp_path / "o.pkl")
    t = _write(tmp_path, head + "d0,A,hi,happy,train\nd0,B,yo,sad,test\n")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys,
             r"t\.csv:3: column 'split': dialogue 'd0' is in split train on line 2; a dialogue belongs to one split",
             tmp_path / "o.pkl")


def test_mixed_encodings_and_undefined_bytes(tmp_path, capsys):
    mixed = (HEADER + "d0,0,A,caf\u00e9 is open,happy\n").encode("utf-8") + "d0,1,B,na\u00efve,sad\n".encode("cp1252")
    t = _write(tmp_path, mixed)
    _refused([str(t), str(tmp_path / "o.pkl")], capsys,
             r"t\.csv:3: mixed encodings: this line is not UTF-8 but line 2 is", tmp_path / "o.pkl")
    t = _write(tmp_path, HEADER.encode() + b"d0,0,A,bad \x81 byte and \xe9,happy\n")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys,
             r"t\.csv:2: byte 0x81 is neither UTF-8 nor cp1252", tmp_path / "o.pkl")
    t = _write(tmp_path, HEADER.encode() + "d0,0,A,caf\u00e9,happy\n".encode("cp1252"))
    _refused([str(t), str(tmp_path / "o.pkl"), "--encoding", "utf-8"], capsys,
             r"t\.csv:2: not UTF-8 \(byte 0xe9\)", tmp_path / "o.pkl")


def test_jsonl_bad_lines(tmp_path, capsys):
    good = json.dumps({"dialogue": "d0", "speaker": "A", "text": "hi", "label": "happy"})
    t = _write(tmp_path, good + "\n{not json\n", "t.jsonl")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys, r"t\.jsonl:2: not valid JSON", tmp_path / "o.pkl")
    t = _write(tmp_path, good + "\n" + json.dumps({"dialogue": "d0", "speaker": "A", "text": ["x"],
                                                    "label": "sad"}) + "\n", "t.jsonl")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys,
             r"t\.jsonl:2: column 'text': expected a string, got list", tmp_path / "o.pkl")
    t = _write(tmp_path, good + "\n[1, 2]\n", "t.jsonl")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys, r"t\.jsonl:2: expected a JSON object", tmp_path / "o.pkl")


def test_audio_missing_unreadable_bad_times(tmp_path, capsys):
    head = "dialogue,speaker,text,label,audio,start,end\n"
    _wav(tmp_path / "ok.wav", 1.0)
    (tmp_path / "junk.wav").write_bytes(b"this is not a wav file")
    cases = [
        ("d0,A,hi,happy,ok.wav,0,0.5\nd0,B,yo,sad,gone.wav,,\n",
         r"t\.csv:3: column 'audio': audio file 'gone.wav' not found"),
        ("d0,A,hi,happy,ok.wav,0,0.5\nd0,B,yo,sad,junk.wav,,\n",
         r"t\.csv:3: column 'audio': junk\.wav: not a readable PCM WAV file"),
        ("d0,A,hi,happy,ok.wav,0.5,0.2\n", r"t\.csv:2: column 'end': end 0.2 s is not after start 0.5 s"),
        ("d0,A,hi,happy,ok.wav,0,3.0\n", r"t\.csv:2: column 'end': 3 s is past the end of ok\.wav"),
        ("d0,A,hi,happy,ok.wav,abc,\n", r"t\.csv:2: column 'start': 'abc' is not a number"),
        ("d0,A,hi,happy,ok.wav,,\nd0,B,yo,sad,,,\n", r"t\.csv:3: column 'audio': no audio file here but other rows"),
    ]
    for body, match in cases:
        t = _write(tmp_path, head + body + "d1,A,x,sad,ok.wav,,\nd2,A,y,happy,ok.wav,,\n")
        _refused([str(t), str(tmp_path / "o.pkl")], capsys, match, tmp_path / "o.pkl")


def test_folder_refuses_a_dialogue_in_two_files_and_too_few_dialogues(tmp_path, capsys):
    folder = tmp_path / "tables"
    folder.mkdir()
    _write(folder, HEADER + "d0,0,A,hi,happy\n", "a.csv")
    _write(folder, HEADER + "d0,0,B,yo,sad\n", "b.csv")
    _refused([str(folder), str(tmp_path / "o.pkl")], capsys,
             r"b\.csv:2: column 'dialogue': dialogue 'd0' also appears in .*a\.csv", tmp_path / "o.pkl")
    t = _write(tmp_path, HEADER + _rows(2))
    _refused([str(t), str(tmp_path / "o.pkl")], capsys, r"2 dialogue\(s\); a seeded split needs at least 3",
             tmp_path / "o.pkl")
    t = _write(tmp_path, "dialogue,speaker,speaker,text\n")
    _refused([str(t), str(tmp_path / "o.pkl")], capsys, r"t\.csv:1: column 'speaker' appears twice",
             tmp_path / "o.pkl")


# ------------------------------------------------------------------------------------------ good inputs


def test_example_csv_imports_with_a_seeded_split_by_dialogue(tmp_path):
    out = tmp_path / "ex.pkl"
    s = import_table(EXAMPLE, out, embed=fake_embed, seed=3)
    assert s["dialogues"] == {"train": 10, "dev": 1, "test": 1}
    assert s["classes"] == ["angry", "happy", "neutral", "sad"]
    data = load_conversations(out)
    assert data.label_names == ["angry", "happy", "neutral", "sad"] and data.dims == {"text": 8}
    vids = {split: sorted(d.vid for d in ds) for split, ds in data.splits.items()}
    assert not set(vids["train"]) & (set(vids["dev"]) | set(vids["test"]))  # by dialogue, never by utterance
    # the same seed gives the same split whatever the row order; another seed another one
    lines = EXAMPLE.read_text().splitlines()
    shuffled = _write(tmp_path, "\n".join([lines[0], *reversed(lines[1:])]) + "\n", "rev.csv")
    import_table(shuffled, tmp_path / "rev.pkl", embed=fake_embed, seed=3)
    again = load_conversations(tmp_path / "rev.pkl")
    assert {s: sorted(d.vid for d in ds) for s, ds in again.splits.items()} == vids
    by_vid = {d.vid: d.sentences for ds in data.splits.values() for d in ds}
    assert {d.vid: d.sentences for ds in again.splits.values() for d in ds} == by_vid  # the order column decides
    others = [import_table(EXAMPLE, tmp_path / f"s{k}.pkl", embed=fake_embed, seed=k) for k in range(4)]
    assert len({tuple(d["vid"] for d in pickle.loads((tmp_path / f"s{k}.pkl").read_bytes())["test"])
                for k in range(4)}) > 1
    assert all(o["dialogues"]["train"] == 10 for o in others)
    raw = pickle.loads(out.read_bytes())
    d0 = next(d for split in ("train", "dev", "test") for d in raw[split] if d["vid"] == "synth-meeting-01")
    assert d0["sentence"][0] == "Good morning, let's go through the agenda."
    assert d0["labels"] == [2, 1, 1, 2, 2] and d0["speakers"] == ["Ana", "Ben", "Ana", "Ben", "Ana"]
    np.testing.assert_array_equal(d0["text"], fake_embed(d0["sentence"]))


def test_fractions_declared_classes_and_the_split_column(tmp_path):
    t = _write(tmp_path, HEADER + _rows(10))
    s = import_table(t, tmp_path / "a.pkl", embed=fake_embed, fractions=(0.6, 0.2, 0.2))
    assert s["dialogues"] == {"train": 6, "dev": 2, "test": 2}
    with pytest.raises(DataError, match=r"split fractions must be three numbers >= 0 \(train dev test\)"):
        import_table(t, tmp_path / "e.pkl", embed=fake_embed, fractions=(0.8, -0.1, 0.3))
    assert not (tmp_path / "e.pkl").exists()
    s = import_table(t, tmp_path / "b.pkl", embed=fake_embed, classes=["sad", "neutral", "happy", "angry"])
    assert load_conversations(tmp_path / "b.pkl").label_names == ["sad", "neutral", "happy", "angry"]
    head = "dialogue,speaker,text,label,split\n"
    t = _write(tmp_path, head + "a,A,x,sad,train\nb,A,y,happy,valid\nc,B,z,sad,TEST\nd,B,w,happy,train\n")
    s = import_table(t, tmp_path / "c.pkl", embed=fake_embed)
    assert s["dialogues"] == {"train": 2, "dev": 1, "test": 1}
    with pytest.raises(DataError, match="puts no dialogue in dev"):
        import_table(_write(tmp_path, head + "a,A,x,sad,train\nc,B,z,sad,test\n"), tmp_path / "d.pkl",
                     embed=fake_embed)


def test_column_mapping_tsv_jsonl_and_folders(tmp_path):
    t = _write(tmp_path, "conv\tturn\twho\tutterance\temotion\n" +
               "".join(f"c{k}\t{2 - i}\tP{i}\tline {k} {i}\t{'ab'[i % 2]}\n" for k in range(3) for i in range(3)),
               "x.tsv")
    cols = {"dialogue": "conv", "order": "turn", "speaker": "who", "text": "utterance", "label": "emotion"}
    import_table(t, tmp_path / "tsv.pkl", columns=cols, embed=fake_embed)
    data = load_conversations(tmp_path / "tsv.pkl")
    d = next(d for ds in data.splits.values() for d in ds)
    assert d.sentences == [f"line {d.vid[1]} {i}" for i in (2, 1, 0)]  # sorted by the order column
    rows = [{"dialogue": f"j{k}", "speaker": "A" if i % 2 else 7, "text": f"t{k}{i}", "label": "ab"[i % 2]}
            for k in range(3) for i in range(2)]
    folder = tmp_path / "many"
    folder.mkdir()
    _write(folder, "\n".join(json.dumps(r) for r in rows) + "\n\n", "a.jsonl")
    _write(folder, HEADER + "c9,0,Z,hello,a\n", "b.csv")
    s = import_table(folder, tmp_path / "f.pkl", embed=fake_embed)
    assert sum(s["dialogues"].values()) == 4 and s["classes"] == ["a", "b"]
    assert load_conversations(tmp_path / "f.pkl").speakers == ["7", "A", "Z"]


def test_cp1252_files_and_c1_characters_are_read_as_intended(tmp_path):
    t = _write(tmp_path, HEADER.encode() + "d0,0,A,I\u2019m at the caf\u00e9 \u2013 ok,happy\n".encode("cp1252") +
               b"d1,0,A,plain,sad\nd2,0,B,plain too,sad\n")
    s = import_table(t, tmp_path / "a.pkl", embed=fake_embed)
    assert "read as cp1252" in s["notes"]
    sentences = {d["vid"]: d["sentence"][0] for split in ("train", "dev", "test")
                 for d in pickle.loads((tmp_path / "a.pkl").read_bytes())[split]}
    assert sentences["d0"] == "I\u2019m at the caf\u00e9 \u2013 ok"
    # UTF-8 text holding a C1 control (cp1252 once decoded as latin1): the intended character
    t = _write(tmp_path, HEADER + "d0,0,A,it\x92s fine,happy\nd1,0,A,x,sad\nd2,0,B,y,sad\n")
    table = read_table(t)
    assert table.dialogues[0].sentences == ["it\u2019s fine"]


def test_unlabelled_tables_are_for_prediction_only(tmp_path):
    t = _write(tmp_path, "dialogue,speaker,text\n" + "".join(f"d{k},S,hello {k}\n" for k in range(2)))
    s = import_table(t, tmp_path / "u.pkl", embed=fake_embed)
    assert not s["labelled"] and s["dialogues"] == {"train": 0, "dev": 0, "test": 2}
    with pytest.raises(DataError, match="imported without labels; it can only be predicted on"):
        load_conversations(tmp_path / "u.pkl")
    data = load_conversations(tmp_path / "u.pkl", labelled=False, classes=["x", "y"])
    assert [len(d) for d in data.splits["test"]] == [1, 1] and data.label_names == ["x", "y"]
    assert (data.splits["test"][0].labels == -100).all()
    # --unlabelled ignores a label column, even one with empty cells
    t = _write(tmp_path, HEADER + "d0,0,A,hi,\nd1,0,B,yo,sad\n")
    assert not import_table(t, tmp_path / "v.pkl", embed=fake_embed, labelled=False)["labelled"]


def test_audio_goes_through_the_prosody_hook_or_is_skipped(tmp_path, monkeypatch):
    _wav(tmp_path / "a.wav", 2.0)
    head = "dialogue,speaker,text,label,audio,start,end\n"
    t = _write(tmp_path, head + "".join(f"d{k},A,hi {k},{'xy'[k % 2]},a.wav,{k * 0.1},{k * 0.1 + 0.5}\n"
                                        for k in range(4)))
    calls = []

    def hook(path: Path, start, end) -> np.ndarray:
        calls.append((path.name, start, end))
        return np.full(88, start, np.float32)

    import_table(t, tmp_path / "a.pkl", embed=fake_embed, prosody=hook)
    data = load_conversations(tmp_path / "a.pkl")
    assert data.dims == {"text": 8, "audio": 88} and len(calls) == 4
    assert calls[1] == ("a.wav", 0.1, 0.6)
    import affectkit.features.table as table_mod

    monkeypatch.setattr(table_mod, "prosody_hook", lambda: None)
    s = import_table(t, tmp_path / "b.pkl", embed=fake_embed)
    assert s["modalities"] == ["text"] and "audio column ignored" in s["notes"]
    assert load_conversations(tmp_path / "b.pkl").dims == {"text": 8}
    s = import_table(t, tmp_path / "c.pkl", embed=fake_embed, prosody=hook, audio=False)
    assert s["modalities"] == ["text"]


class _FakeStandardiser:
    """The interface of ``affectkit.audio.prosody.Standardiser`` (issue 19): fit, call, to_meta."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean, self.std = mean, std

    @classmethod
    def fit(cls, rows: np.ndarray) -> _FakeStandardiser:
        return cls(rows.mean(axis=0), rows.std(axis=0) + 1e-6)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        return ((v - self.mean) / self.std).astype(np.float32)

    def to_meta(self) -> dict:
        return {"kind": "eGeMAPSv02-functionals", "mean": self.mean.tolist(), "std": self.std.tolist()}


def test_audio_is_standardised_on_train_when_the_audio_part_is_there(tmp_path, monkeypatch):
    _wav(tmp_path / "a.wav", 2.0)
    t = _write(tmp_path, "dialogue,speaker,text,label,audio,start,end\n" + "".join(
        f"d{k},A,hi {k},{'xy'[k % 2]},a.wav,{k * 0.1},{k * 0.1 + 0.5}\n" for k in range(10)))
    import affectkit.features.table as table_mod

    monkeypatch.setattr(table_mod, "standardiser", lambda: _FakeStandardiser)
    s = import_table(t, tmp_path / "a.pkl", embed=fake_embed, prosody=lambda p, a, b: np.arange(88) * (1 + a))
    assert "audio: standardised with the train split" in s["notes"]
    raw = pickle.loads((tmp_path / "a.pkl").read_bytes())
    train = np.concatenate([d["audio"] for d in raw["train"]])
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-5)
    assert raw["meta"]["audio_features"]["kind"] == "eGeMAPSv02-functionals" and raw["meta"]["labelled"]
    s = import_table(t, tmp_path / "u.pkl", embed=fake_embed, labelled=False, prosody=lambda p, a, b: np.ones(88))
    assert "not standardised (no train split" in s["notes"]
