"""Distil a fine-tuned sentence encoder (the teacher: a ``finetune-text`` folder, e.g. all-mpnet-base-v2 at 110M
parameters) into the shipped all-MiniLM-L6-v2 (the student, 22M), so the live service embeds at MiniLM's speed
with what the teacher learnt (issue 24: mpnet's p99 per utterance is over the live budget even in int8).

Targets: the teacher's vectors of every utterance input (its own input recipe, embedded through the usual
cache), centred and projected on their top principal components fitted on the train split (as many as the
student's width), scaled to unit variance per coordinate on average (:func:`projected_targets`), so the
student keeps its plain mean-pooled output and every loader, runtime (ONNX, int8) and
the service use it unchanged.  Loss: mean squared error per coordinate; the epoch is chosen on the dev loss
(the transformers ``Trainer``, resumable per epoch, as ``finetune-text``).  The output folder is an encoder
like ``finetune-text``'s (no classifier head), whose ``affectkit_encoder.json`` names the teacher
(``distilled_from``: folder, content sha256, name) and carries the teacher's input recipe.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affectkit.data.cosmic import SPLITS, load_cosmic
from affectkit.errors import ConfigError, DataError
from affectkit.features.encoder_ref import (
    CHECKPOINTS,
    SUMMARY_FILE,
    encoder_record,
    encoder_sha256,
    mean_pool,
)
from affectkit.features.finetune import (
    _prepare_out,
    _write_encoder,
    base_name,
    check_training_ranges,
    data_sha256,
    epoch_timings,
    load_transformer,
    make_trainer,
    shipped_encoder_dir,
    split_inputs,
    start_training,
)


@dataclass(frozen=True)
class DistilConfig:
    """Distillation settings; everything that changes the result is here (and in the run record)."""

    epochs: int = 3
    seed: int = 0
    max_length: int = 128
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1

    def __post_init__(self) -> None:
        check_training_ranges("distil", self)


class EncoderRegressor(nn.Module):
    """Transformer encoder -> mean pooling; ``labels`` (B, dim) targets give the mean squared error."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pooled = mean_pool(self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0], attention_mask)
        out = {"logits": pooled}
        if labels is not None:
            out["loss"] = nn.functional.mse_loss(pooled, labels.to(pooled.dtype))
        return out


class TargetDataset(torch.utils.data.Dataset):
    """Tokenised inputs of one split and their target vectors (one item per utterance)."""

    def __init__(self, encodings: dict[str, list[list[int]]], targets: np.ndarray) -> None:
        self.input_ids = encodings["input_ids"]
        self.attention_mask = encodings["attention_mask"]
        self.targets = targets.astype(np.float32)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "labels": self.targets[i].tolist()}


def principal_projection(train: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean (dim,), the top ``width`` principal directions (dim, width) of ``train`` (N, dim) vectors, and the
    share of their variance those directions keep.  ``width`` >= dim keeps every direction (a rotation)."""
    if train.ndim != 2 or train.shape[0] < 2:
        raise DataError(f"need at least two train vectors to fit the projection, got shape {train.shape}")
    mean = train.mean(0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    k = min(width, vt.shape[0])
    var = s ** 2
    return mean, vt[:k].T.copy(), float(var[:k].sum() / max(var.sum(), 1e-30))


def projected_targets(vectors: dict[str, np.ndarray], width: int) -> tuple[dict[str, np.ndarray], float]:
    """Each split's teacher vectors centred and projected on the top ``width`` principal directions of the train
    split's, then scaled so the train targets' mean variance per coordinate is 1 (unit-norm teacher vectors
    give coordinates of about 1/sqrt(dim): a loss that small barely moves the student); the mean, directions
    and scale come from train alone.  Returns the targets and the share of the teacher's variance kept."""
    mean, directions, kept = principal_projection(vectors["train"], width)
    if directions.shape[1] < width:
        raise DataError(f"the teacher's vectors have {directions.shape[1]} directions; the student needs {width}")
    train = (vectors["train"] - mean) @ directions
    scale = float(np.sqrt(max(train.var(0).mean(), 1e-30)))
    return {split: ((v - mean) @ directions / scale).astype(np.float32) for split, v in vectors.items()}, kept


def _agreement(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean squared error, mean cosine, and R^2 (share of the targets' variance explained) of predictions."""
    err = float(((pred - target) ** 2).mean())
    cos = (pred * target).sum(1) / np.maximum(np.linalg.norm(pred, axis=1) * np.linalg.norm(target, axis=1), 1e-12)
    var = float(((target - target.mean(0)) ** 2).mean())
    return {"mse": err, "cosine": float(cos.mean()), "r2": 1.0 - err / max(var, 1e-30)}


def distil_encoder(
    teacher: str | Path,
    dataset: str,
    source: str | Path,
    out_dir: str | Path,
    cfg: DistilConfig | None = None,
    progress: bool = True,
    student: str | Path | None = None,
    threads: int | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``student`` (default: the shipped all-MiniLM-L6-v2) to give ``teacher``'s vectors of ``dataset``'s
    utterances (projected to the student's width) and write the encoder ``out_dir``.

    ``teacher`` is an encoder folder (``finetune-text``); its input recipe becomes the student's.  The epoch
    with the lowest dev loss is kept; dev and test agreement with the teacher (mse, cosine, R^2) and the
    timings go to ``training_summary.json`` (also returned).  Rerunning the same command resumes.
    """
    from affectkit.features.encoder_ref import read_encoder_info
    from affectkit.features.inputs import InputRecipe
    from affectkit.features.text import SentenceEncoder

    cfg = cfg or DistilConfig()
    set_seed = start_training("distillation", threads)
    start = time.perf_counter()
    out = Path(out_dir)
    teacher_info = read_encoder_info(teacher)
    teacher_ref = encoder_record(teacher)
    if teacher_info.get("packaged"):
        raise ConfigError(f"{teacher} is a frozen base encoder; distil a fine-tuned one (affectkit finetune-text)")
    recipe = InputRecipe.from_dict(teacher_info["recipe"])
    student = Path(student) if student is not None else shipped_encoder_dir()
    data = load_cosmic(dataset, source)
    data_hash = data_sha256(dataset, source)
    record = {"dataset": data.dataset, "data_sha256": data_hash, "base_sha256": encoder_sha256(student),
              "teacher_sha256": teacher_ref["sha256"], "config": asdict(cfg)}
    resume = _prepare_out(out, record)
    ckpt_dir = out / CHECKPOINTS

    tokenizer, encoder = load_transformer(student, "student", recipe.truncation_side)
    width = int(encoder.config.hidden_size)

    inputs = {split: split_inputs(data, split, recipe)[0] for split in SPLITS}
    for split, texts in inputs.items():
        if not texts:
            raise DataError(f"{dataset}: the {split} split is empty; distillation needs train, dev and test")
    teacher_enc = SentenceEncoder(cache_dir, encoder=teacher, expected_sha256=teacher_ref["sha256"])
    vectors = {split: teacher_enc.embed(texts, progress=progress) for split, texts in inputs.items()}
    targets, kept = projected_targets(vectors, width)
    sets = {split: TargetDataset(tokenizer(inputs[split], truncation=True, max_length=cfg.max_length), targets[split])
            for split in SPLITS}

    set_seed(cfg.seed)
    model = EncoderRegressor(encoder)

    def compute_metrics(pred: Any) -> dict[str, float]:
        return _agreement(np.asarray(pred.predictions), np.asarray(pred.label_ids))

    trainer = make_trainer(model, tokenizer, sets, ckpt_dir, cfg, progress, compute_metrics, "mse", False)
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)

    scores = {split: _agreement(np.asarray((p := trainer.predict(sets[split])).predictions), np.asarray(p.label_ids))
              for split in ("dev", "test")}
    history = [{"epoch": round(e["epoch"]), "dev_mse": e["eval_mse"], "dev_cosine": e["eval_cosine"]}
               for e in trainer.state.log_history if "eval_mse" in e]
    info = {
        "format": 1, "base": base_name(student), "dim": width, "max_length": cfg.max_length,
        "recipe": recipe.to_dict(), "dataset": data.dataset, "label_names": list(data.label_names),
        "data_sha256": data_hash, "config": asdict(cfg), "held_out_train": [],
        "distilled_from": {k: teacher_ref[k] for k in ("folder", "sha256", "name")},
    }
    _write_encoder(out, model, tokenizer, student, info, cfg.max_length)
    summary = {
        **info, "encoder_sha256": encoder_sha256(out),
        "best_epoch": min(history, key=lambda h: h["dev_mse"])["epoch"] if history else None,
        "history": history, "dev": scores["dev"], "test": scores["test"],
        "teacher_variance_kept": kept, "utterances": {s: len(sets[s]) for s in SPLITS},
        **epoch_timings(ckpt_dir, len(sets["train"])),
        "seconds": time.perf_counter() - start, "resumed": resume is not None, "threads": torch.get_num_threads(),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary
