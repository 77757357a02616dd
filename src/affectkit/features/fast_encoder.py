"""A faster inference path for the sentence encoders: the same transformer run by ONNX Runtime.

Why: in the live service every new sentence goes through the encoder, and on a CPU that is most of a
turn's cost (all-MiniLM-L6-v2: 11-12 ms per sentence at one thread through sentence-transformers, 70% of
it in linear layers; see bench/README.md).  ONNX Runtime runs the same graph with fused kernels:

- ``onnx``: float32, the same vectors as the torch path (checked on export: max difference <= 1e-4 on
  probe sentences), about twice as fast for one sentence at a time;
- ``onnx-int8``: the linear layers' weights quantised to int8 per output channel, activations quantised
  on the fly (ONNX Runtime's dynamic quantisation); faster again but the vectors move (cosine ~0.99 to
  the float vectors, checked >= :data:`INT8_MIN_COSINE` on export; where quantising every layer falls
  short, as on all-mpnet-base-v2, the feed-forward output layers stay float), so a model trained on float vectors
  sees slightly different inputs: this runtime is part of a live model's identity, and its effect on
  accuracy is measured in bench/README.md ("Fast live encoder").

The graph (transformer + mean pooling + L2 normalisation) is exported once per encoder content, runtime
and export recipe, into ``<cache_dir>/onnx/`` (atomic; a sidecar JSON records the file's sha256 and the
export check), and reused by every later process.  Export needs the ``onnx`` package; both ``onnx`` and
``onnxruntime`` come with the ``[serve]`` extra.  Tokenisation is the encoder's own (the shipped model's
256-token limit, a fine-tuned folder's recipe), shared with :class:`~affectkit.features.encoder_ref.LocalEncoder`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.errors import ConfigError, DataError
from affectkit.features.encoder_ref import file_sha256

log = logging.getLogger("affectkit")

#: Inference paths of a sentence encoder: ``torch`` (sentence-transformers / transformers), ``onnx``
#: (ONNX Runtime, float32) and ``onnx-int8`` (ONNX Runtime, int8 dynamic quantisation).
RUNTIMES = ("torch", "onnx", "onnx-int8")
#: Bumped whenever the exported graph or its check changes: a new key, a new export.
EXPORT_RECIPE = 1
OPSET = 17
#: Export checks on the probe sentences: float32 must equal torch, int8 must stay this close in cosine.
FP32_MAX_DIFF = 1e-4
INT8_MIN_COSINE = 0.95
PROBES = (
    "I can't believe you did that!",
    "okay",
    "Well, I guess we'll have to wait and see what happens next week, won't we?",
    "M: Where were you last night? F: Out with some friends, why do you ask?",
)
INSTALL_HINT = "install with pip install -e '.[serve]'"


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else a one-line ConfigError."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown text encoder runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return runtime


def folder_sha256(folder: Path) -> str:
    """Content hash of the files of a transformers folder that change its vectors (weights, config,
    tokenizer), in name order (for a folder that is no affectkit encoder: the shipped MiniLM)."""
    h = hashlib.sha256()
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
             "model.safetensors", "pytorch_model.bin")
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(f"{name}:{file_sha256(path)}".encode())
    return h.hexdigest()


def _feeds(enc: Any) -> dict[str, np.ndarray]:
    """The exported graph's inputs from a tokenizer's output."""
    return {"input_ids": np.asarray(enc["input_ids"], np.int64),
            "attention_mask": np.asarray(enc["attention_mask"], np.int64)}


def _import_runtime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"the onnx text encoder runtime needs onnxruntime ({exc}); {INSTALL_HINT}") from None
    return onnxruntime


def pooled_module(model: Any) -> Any:
    """torch module of the exported graph: transformer -> mean pooling over real tokens -> unit length."""
    import torch

    from affectkit.features.encoder_ref import mean_pool

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask)[0]
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    return Pooled()


def export_onnx(folder: Path, tokenize: Any, target: Path, runtime: str, source_sha256: str) -> dict[str, Any]:
    """Export the transformer in ``folder`` (+ pooling) to ``target`` for ``runtime``, check it against
    torch on :data:`PROBES`, and write it atomically with a sidecar ``.json`` record naming ``source_sha256``
    (the folder's content hash). Returns the record."""
    import torch
    from transformers import AutoModel

    try:
        import onnx  # noqa: F401  (torch's exporter needs it; checked here so the error names the extra)
    except ImportError as exc:
        raise ConfigError(f"exporting the text encoder to ONNX needs the onnx package ({exc}); {INSTALL_HINT}") \
            from None
    from affectkit.features.encoder_ref import quiet_loading

    with quiet_loading():
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    pooled = pooled_module(model)
    enc = tokenize(list(PROBES))
    ids, mask = torch.as_tensor(enc["input_ids"]), torch.as_tensor(enc["attention_mask"])
    with torch.inference_mode():
        expected = pooled(ids, mask).numpy()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(pooled, (ids, mask), str(fp32), input_names=["input_ids", "attention_mask"],
                              output_names=["vectors"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"},
                                            "vectors": {0: "batch"}})
        feeds = _feeds(enc)
        made, float_layers = fp32, 0
        got = _session(made, 1).run(None, feeds)[0]
        if runtime == "onnx-int8":
            # every linear layer first; where that moves the probes too far (all-mpnet-base-v2: cosine 0.78),
            # the feed-forward output layers (the ones that read GELU's outliers) stay float
            for keep_float in ([], _ffn_output_matmuls(fp32)):
                made = Path(tmp) / f"int8-{len(keep_float)}.onnx"
                _quantize(fp32, made, keep_float)
                got = _session(made, 1).run(None, feeds)[0]
                float_layers = len(keep_float)
                if np.min(np.sum(got * expected, axis=1)) >= INT8_MIN_COSINE:
                    break
        record = {"runtime": runtime, "source_sha256": source_sha256, "recipe": EXPORT_RECIPE,
                  "opset": OPSET, "torch": torch.__version__, "float_layers": float_layers,
                  "max_abs_diff": float(np.abs(got - expected).max()),
                  "min_cosine": float(np.min(np.sum(got * expected, axis=1)))}
        if runtime == "onnx" and record["max_abs_diff"] > FP32_MAX_DIFF:
            raise DataError(f"the ONNX export of {folder.name} differs from torch by {record['max_abs_diff']:.2g} "
                            f"(> {FP32_MAX_DIFF}); use --text-runtime torch")
        if runtime == "onnx-int8" and record["min_cosine"] < INT8_MIN_COSINE:
            raise DataError(f"the int8 encoder of {folder.name} moves vectors too far (cosine "
                            f"{record['min_cosine']:.3f} < {INT8_MIN_COSINE}); use --text-runtime onnx")
        record["sha256"] = file_sha256(made)
        os.replace(made, target)
        side = target.with_suffix(".json")
        side_tmp = Path(tmp) / "record.json"
        side_tmp.write_text(json.dumps(record, indent=1))
        os.replace(side_tmp, side)
    log.info("exported %s for %s to %s (max diff %.2g, min cosine %.4f)", folder.name, runtime, target,
             record["max_abs_diff"], record["min_cosine"])
    return record


def _ffn_output_matmuls(path: Path) -> list[str]:
    """Names of the feed-forward output projections (``.../layer.N/output/dense/MatMul``) in an export."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [n.name for n in graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name
            and "attention" not in n.name]


def _quantize(source: Path, target: Path, keep_float: list[str]) -> None:
    """ONNX Runtime's dynamic quantisation: int8 weights per output channel, ``keep_float`` nodes left alone."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    was = root.disabled
    root.disabled = True  # ONNX Runtime logs a "consider pre-processing" warning on the root logger
    try:
        quantize_dynamic(str(source), str(target), per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_exclude=keep_float)
    finally:
        root.disabled = was


def _session(path: Path, threads: int) -> Any:
    ort = _import_runtime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    # no busy-waiting between runs: in a service the event loop and the other sessions need that core
    # (spinning bought 1.3x at 2 threads for twice the CPU; bench/README.md "Fast live encoder")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """A transformers encoder folder run by ONNX Runtime: text -> unit-norm mean-pooled float32 vectors.

    ``tokenize(texts)`` is the encoder's own tokenizer call (returns numpy ``input_ids``/``attention_mask``);
    ``threads``: ONNX Runtime intra-op threads (default: torch's current setting, so ``--threads`` applies);
    ``name``: the exported file's name stem (default: the folder's name); ``source_sha256``: the folder's
    content hash when the caller has it (an affectkit encoder's reference), else :func:`folder_sha256`.
    The exported graph is found (or made) under ``cache_dir/onnx``, keyed by the folder's content hash.
    """

    def __init__(self, folder: str | Path, tokenize: Any, runtime: str, cache_dir: str | Path,
                 threads: int | None = None, name: str | None = None, source_sha256: str | None = None) -> None:
        if check_runtime(runtime) == "torch":
            raise ConfigError("OnnxEncoder runs the onnx runtimes only")
        _import_runtime()
        self.folder = Path(folder)
        self.runtime = runtime
        self.tokenize = tokenize
        source = source_sha256 or folder_sha256(self.folder)
        key = hashlib.sha256(f"{source}:{runtime}:{EXPORT_RECIPE}:{OPSET}".encode()).hexdigest()[:16]
        self.path = Path(cache_dir) / "onnx" / f"{name or self.folder.name}-{runtime}-{key}.onnx"
        self.record = self._load_record(source)
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        self.session = _session(self.path, threads)

    def _load_record(self, source: str) -> dict[str, Any]:
        side = self.path.with_suffix(".json")
        if self.path.is_file() and side.is_file():
            try:
                record = json.loads(side.read_text())
            except (OSError, ValueError):
                record = {}
            if record.get("source_sha256") == source and record.get("sha256") == file_sha256(self.path):
                return record
            log.warning("the exported encoder %s does not match its record: exporting it again", self.path)
        try:
            return export_onnx(self.folder, self.tokenize, self.path, self.runtime, source)
        except OSError as exc:
            raise ConfigError(f"cannot write the exported encoder to {self.path.parent} ({exc.strerror or exc}); "
                              "set AFFECTKIT_CACHE to a writable folder or use --text-runtime torch") from None

    def encode(self, texts: Sequence[str], batch_size: int = 64, **_: Any) -> np.ndarray:
        """Float32 (N, dim) unit vectors, ``batch_size`` texts per run (sentence-transformers' keyword
        arguments are accepted and ignored, so it stands in for the torch model)."""
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenize(list(texts[start : start + batch_size]))
            out.append(self.session.run(None, _feeds(enc))[0])
        if not out:
            return np.zeros((0, int(self.session.get_outputs()[0].shape[-1] or 0)), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)
