"""A fine-tuned encoder folder: its content hash, the reference a feature file or checkpoint records,
loading it back with a check that it is the same encoder, and embedding text with it.

The reference is ``{"folder": str, "sha256": hex, "name": str}`` (plus ``"packaged": "mpnet"`` for a packaged
base encoder used frozen, :mod:`affectkit.features.packaged`); the hash covers every file that changes
the vectors (weights, tokenizer, config, input recipe) and leaves out the training summary and the
resumable Trainer checkpoints.  Whoever embeds raw text for a model (``Stream.push_text``, the live
service) calls ``verify_encoder`` (or ``load_reference_encoder``) so vectors of another encoder never
reach a model trained on this one's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.data.provenance import file_sha256 as plain_sha256
from affectkit.errors import DataError
from affectkit.features.inputs import InputRecipe

#: The file that makes a folder an affectkit encoder: input recipe, max length, dim, labels, data hash.
ENCODER_FILE = "affectkit_encoder.json"
SUMMARY_FILE = "training_summary.json"
CHECKPOINTS = "checkpoints"
#: Cross-fitting fold encoders live in ``folds/<f>/`` with the split in ``folds/folds.json``.
FOLDS = "folds"
FOLDS_FILE = "folds.json"
_NOT_HASHED = {SUMMARY_FILE}


#: (path, size, mtime, inode, device) -> sha256 of files whose mtime was at least ``_SETTLED_S`` old when
#: hashed: a 438 MB encoder is hashed once per process, not at every check; a file written since (or within
#: the file system's timestamp step of the hashing, git's "racy" case) is hashed again.
_HASHES: dict[tuple[str, int, int, int, int], str] = {}
_SETTLED_S = 2.0


def file_sha256(path: Path) -> str:
    """sha256 of a file, hex (remembered for an unchanged, settled file)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key in _HASHES:
        return _HASHES[key]
    digest = plain_sha256(path)
    if time.time() - st.st_mtime > _SETTLED_S:
        _HASHES[key] = digest
    return digest


def encoder_files(folder: str | Path) -> list[Path]:
    """The files that define the encoder, sorted by relative path (no summary, checkpoints or folds)."""
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] not in (CHECKPOINTS, FOLDS) and rel.name not in _NOT_HASHED:
            files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def encoder_sha256(folder: str | Path) -> str:
    """Content hash of an encoder folder: sha256 over each defining file's relative path and sha256."""
    folder = Path(folder)
    h = hashlib.sha256()
    for rel in encoder_files(folder):
        h.update(f"{rel.as_posix()}\0{file_sha256(folder / rel)}\n".encode())
    return h.hexdigest()


def read_encoder_info(folder: str | Path) -> dict[str, Any]:
    """The folder's ``affectkit_encoder.json``; DataError if the folder is not a fine-tuned encoder."""
    folder = Path(folder)
    path = folder / ENCODER_FILE
    if not folder.is_dir():
        raise DataError(f"encoder folder {folder} does not exist")
    if not path.is_file():
        raise DataError(f"{folder} is not a fine-tuned encoder (no {ENCODER_FILE}); make one with "
                        "affectkit finetune-text")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(info, dict) or "recipe" not in info or "dim" not in info:
        raise DataError(f"{path}: not an affectkit encoder description")
    return info


def encoder_record(folder: str | Path) -> dict[str, Any]:
    """The reference to store with features or a checkpoint: folder (absolute), content sha256, name."""
    folder = Path(folder).resolve()
    info = read_encoder_info(folder)
    sha = encoder_sha256(folder)
    if info.get("packaged"):  # a packaged base used frozen (affectkit.features.packaged), found again by name
        return {"folder": str(folder), "sha256": sha, "name": str(info.get("base", info["packaged"])),
                "packaged": str(info["packaged"])}
    return {"folder": str(folder), "sha256": sha, "name": f"{info.get('base', 'encoder')}-ft-{sha[:12]}"}


def encoder_reference(data_meta: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The encoder reference a feature file's ``meta`` records, or None for the shipped, frozen encoder."""
    if not data_meta:
        return None
    ref = data_meta.get("encoder_ref")
    if ref is None:
        return None
    if not isinstance(ref, Mapping) or not isinstance(ref.get("folder"), str) or not isinstance(
        ref.get("sha256"), str
    ):
        raise DataError(f"malformed encoder reference {ref!r}: need folder and sha256")
    out = {"folder": ref["folder"], "sha256": ref["sha256"], "name": str(ref.get("name", ""))}
    if ref.get("packaged"):
        out["packaged"] = str(ref["packaged"])
    return out


def verify_encoder(ref: Mapping[str, Any], folder: str | Path | None = None) -> Path:
    """Check that the encoder ``ref`` names is present and unchanged; return its folder.

    ``folder`` overrides the recorded location (the encoder was moved).  A packaged base (``"packaged"`` in
    ``ref``, e.g. the frozen all-mpnet-base-v2) whose recorded folder is absent is taken from this machine's
    cache, assembled there if need be.  Raises a one-line DataError when it is missing or its content hash
    differs from the recorded one.
    """
    where = Path(folder if folder is not None else ref["folder"])
    if folder is None and ref.get("packaged") and not (where / ENCODER_FILE).is_file():
        from affectkit.features.packaged import packaged_dir

        where = packaged_dir(str(ref["packaged"]))
    if not (where / ENCODER_FILE).is_file():
        raise DataError(f"the encoder that built this model's features is missing: {where} "
                        f"(sha256 {str(ref['sha256'])[:12]})")
    actual = encoder_sha256(where)
    if actual != ref["sha256"]:
        raise DataError(f"encoder {where} differs from the one that built this model's features "
                        f"(sha256 {actual[:12]} != {str(ref['sha256'])[:12]})")
    return where


def load_reference_encoder(ref: Mapping[str, Any] | None, cache_dir: str | Path | None = None,
                           folder: str | Path | None = None, **options: Any) -> Any:
    """A ``SentenceEncoder`` for a checkpoint's encoder reference (None = the shipped encoder), verified.

    This is what ``Stream`` and the live service call with ``checkpoint["info"]["encoder"]``; embed a
    dialogue's turns with ``encoder.embed_dialogue(speakers, sentences)`` so the input recipe (past
    context, speaker tags) matches the one the encoder was trained with.  ``options`` go to
    ``SentenceEncoder`` (a live caller passes ``use_cache=False, max_entries=...``: bounded, no file).
    """
    from affectkit.features.text import SentenceEncoder

    if ref is None:
        return SentenceEncoder(cache_dir, **options)
    where = verify_encoder(ref, folder)
    return SentenceEncoder(cache_dir, encoder=where, expected_sha256=str(ref["sha256"]), **options)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' per-load "Loading weights" bar (ours are the bars that matter)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean of the token vectors where ``mask`` is 1 (sentence-transformers' mean pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def hf_tokenizer(folder: str | Path, max_length: int, truncation_side: str = "right",
                 tensors: str = "np") -> Any:
    """The tokenisation of an encoder folder as one call: ``tokenize(texts)`` -> padded ``input_ids`` and
    ``attention_mask`` (``tensors``: "np" or "pt"), truncated to ``max_length`` on ``truncation_side``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"could not load the tokenizer in {folder} ({exc})") from None
    tokenizer.truncation_side = truncation_side

    def tokenize(texts: Sequence[str]) -> Any:
        return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors=tensors)

    return tokenize


class LocalEncoder:
    """A fine-tuned encoder folder loaded with transformers: input text -> unit-norm mean-pooled vectors.

    Same tokenisation as fine-tuning (the folder's tokenizer, its truncation side, ``max_length``), same
    pooling and normalisation as the shipped sentence-transformers pipeline.
    """

    def __init__(self, folder: str | Path, device: str = "cpu") -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoModel

        self.folder = Path(folder)
        self.info = read_encoder_info(self.folder)
        self.recipe = InputRecipe.from_dict(self.info["recipe"])
        self.max_length = int(self.info["max_length"])
        self.device = device
        self.tokenize = hf_tokenizer(self.folder, self.max_length, self.recipe.truncation_side, tensors="pt")
        try:
            with quiet_loading():
                self.model = AutoModel.from_pretrained(self.folder, local_files_only=True).to(device).eval()
        except (OSError, ValueError) as exc:
            raise DataError(f"could not load the encoder in {self.folder} ({exc})") from None

    def encode(self, texts: Sequence[str], batch_size: int = 64, **_: Any) -> np.ndarray:
        """Float32 (N, dim) unit vectors; extra keyword arguments (sentence-transformers') are ignored."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                enc = self.tokenize(texts[start : start + batch_size]).to(self.device)
                hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
                pooled = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, int(self.info["dim"])), np.float32)
