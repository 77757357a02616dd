"""Tiny fixtures for fine-tuning tests: a 1-layer BERT with a word-level vocabulary, and a tiny IEMOCAP pickle."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any

WORDS = ["happy", "glad", "great", "sad", "miss", "cry", "okay", "fine", "so", "very", "i", "am", "you",
         "are", "angry", "hate", "stop", "wow", "today", "it", "is", "m", "f", ":"]
#: Which words carry which IEMOCAP-6 label (0 hap, 1 sad, 2 neu, 3 ang, 4 exc, 5 fru).
CUES = {0: ["happy", "glad"], 1: ["sad", "cry"], 2: ["okay", "fine"], 3: ["angry", "hate"], 4: ["wow", "great"],
        5: ["stop", "miss"]}


def write_tiny_base(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 1-layer, 16-wide BERT plus tokenizer, saved like a sentence-transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    return _write_tiny(folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], BertTokenizerFast, {},
                       BertConfig, BertModel, 64, seed)


def write_tiny_mpnet(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised 1-layer, 16-wide MPNet plus tokenizer, in sentence-transformers' folder layout
    (a stand-in for all-mpnet-base-v2: same architecture and files, 27 words)."""
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizerFast

    return _write_tiny(folder, ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>"], MPNetTokenizerFast,
                       {"unk_token": "[UNK]"}, MPNetConfig, MPNetModel, 66, seed)


def _write_tiny(folder: Path, specials: list[str], tokenizer_cls: Any, tokenizer_kw: dict[str, Any],
                config_cls: Any, model_cls: Any, max_positions: int, seed: int) -> Path:
    """One tiny transformers folder: ``specials`` + :data:`WORDS` as a word-level vocabulary, a 1-layer,
    16-wide model of ``model_cls`` initialised from ``seed``, and sentence-transformers' module files."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*specials, *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer_cls(vocab={w: i for i, w in enumerate(vocab)}, **tokenizer_kw).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=max_positions)
    model_cls(cfg).save_pretrained(folder)
    _write_st_files(folder, 16)
    return folder


def _write_st_files(folder: Path, dim: int) -> None:
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))


def tiny_iemocap(n_train: int = 8, n_valid: int = 2, n_test: int = 2, turns: int = 5, seed: int = 0) -> list:
    """An IEMOCAP COSMIC-layout list whose sentences hold a cue word of their label."""
    rng = random.Random(seed)
    speakers, labels, sentences = {}, {}, {}
    vids = [f"Ses0{1 + i % 4}_d{i}" for i in range(n_train + n_valid)] + [f"Ses05_d{i}" for i in range(n_test)]
    for vid in vids:
        lab = [rng.randrange(6) for _ in range(turns)]
        labels[vid] = lab
        speakers[vid] = [rng.choice("MF") for _ in range(turns)]
        sentences[vid] = [f"i am {rng.choice(CUES[c])} {rng.choice(['so', 'very', 'today'])}" for c in lab]
    return [speakers, labels, sentences, vids[:n_train], vids[n_train + n_valid:], vids[n_train:n_train + n_valid]]


def write_tiny_iemocap(root: Path, **kw: int) -> Path:
    """Write ``tiny_iemocap`` as ``root/iemocap_cosmic/iemocap.pkl`` (protocol 2, like the real file)."""
    path = root / "iemocap_cosmic" / "iemocap.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(tiny_iemocap(**kw), protocol=2))
    return root
