"""Causal CORECT never peeks: changing or deleting utterances k.. never changes a prediction before k.

The same check on the offline model (and on each of its three future-reading paths alone) finds the
peeking, so the check can fail.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from affectkit.config import load_config
from affectkit.data.conversation import Dialogue, collate_dialogues
from affectkit.errors import ConfigError
from affectkit.models import build_model
from affectkit.models.corect import CorectConfig
from affectkit.models.registry import model_config

DIMS = {"text": 10, "audio": 6, "visual": 8}
MODS = ("text", "audio", "visual")
INFO = {"dims": DIMS, "n_classes": 4, "label_names": ["a", "b", "c", "d"], "n_speakers": 3,
        "speakers": ["A", "B", "C"]}
SMALL = {"hidden": 8, "text_ff": 16, "text_layers": 2, "text_heads": 2, "pcm_layers": 2, "pcm_heads": 2,
         "pcm_self_layers": 2, "graph_heads": 2}
ATOL = 1e-5


@cache
def _model(causal: bool = True, wp: int = 3, wf: int = 0, modalities: tuple[str, ...] = MODS,
           use_gnn: bool = True, use_pcm: bool = True, context: int | None = None,
           speaker_mode: str = "tags", attention_sink: bool = False) -> torch.nn.Module:
    torch.manual_seed(wp * 7 + wf)
    params = {**SMALL, "causal": causal, "wp": wp, "wf": wf, "modalities": list(modalities),
              "use_gnn": use_gnn, "use_pcm": use_pcm, "context": context, "speaker_mode": speaker_mode,
              "attention_sink": attention_sink}
    model = build_model("corect", params, INFO).eval()
    for name, p in model.named_parameters():  # a trained sink, not the zeros it starts from
        if name.endswith(".sink"):
            p.data.normal_(0.0, 2.0)
    return model


def _dialogue(rng: np.random.Generator, n: int, vid: str) -> Dialogue:
    feats = {m: (rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0)).astype(np.float32)
             for m, d in DIMS.items()}
    return Dialogue(vid, rng.integers(0, 3, n), rng.integers(0, 4, n), feats)


def _edit(rng: np.random.Generator, d: Dialogue, k: int, mode: str) -> Dialogue:
    """Utterances k.. of ``d`` deleted, or replaced by fresh features and speakers."""
    if mode == "delete":
        return Dialogue(d.vid, d.speakers[:k], d.labels[:k], {m: x[:k] for m, x in d.features.items()})
    new = _dialogue(rng, len(d), d.vid)
    feats = {m: np.concatenate([x[:k], new.features[m][k:]]) for m, x in d.features.items()}
    return Dialogue(d.vid, np.concatenate([d.speakers[:k], new.speakers[k:]]), d.labels, feats)


@torch.no_grad()
def peek_gap(model: torch.nn.Module, dialogues: list[Dialogue], ks: list[int], mode: str, seed: int) -> float:
    """Largest change of a logit of an utterance < k_i (per dialogue i) when utterances k_i.. change."""
    rng = np.random.default_rng(seed)
    edited = [_edit(rng, d, k, mode) for d, k in zip(dialogues, ks)]
    before = model(collate_dialogues(dialogues, MODS))
    after = model(collate_dialogues(edited, MODS))
    gap, a, b = 0.0, 0, 0
    for d, e, k in zip(dialogues, edited, ks):
        if k:
            gap = max(gap, float((before[a : a + k] - after[b : b + k]).abs().max()))
        a, b = a + len(d), b + len(e)
    return gap


@st.composite
def dialogues_and_ks(draw: st.DrawFn) -> tuple[list[Dialogue], list[int], int]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lengths = draw(st.lists(st.integers(1, 14), min_size=1, max_size=4))
    dialogues = [_dialogue(rng, n, f"d{i}") for i, n in enumerate(lengths)]
    ks = [draw(st.integers(1, n)) for n in lengths]
    return dialogues, ks, seed


@settings(max_examples=30, deadline=None)
@given(data=dialogues_and_ks(), wp=st.sampled_from([0, 2, 5]), mode=st.sampled_from(["change", "delete"]),
       context=st.sampled_from([None, 1, 3]), speaker_mode=st.sampled_from(["tags", "per_dialogue"]))
def test_causal_model_never_peeks(data, wp, mode, context, speaker_mode):
    """All three modalities, every component on, batches of dialogues of different lengths (padding),
    full or banded attention, speakers by tag or by order of first appearance."""
    dialogues, ks, seed = data
    model = _model(causal=True, wp=wp, context=context, speaker_mode=speaker_mode)
    assert peek_gap(model, dialogues, ks, mode, seed) <= ATOL


def test_causal_model_never_peeks_long_dialogue():
    """A dialogue longer than the graph window; every cut point."""
    rng = np.random.default_rng(0)
    dialogues = [_dialogue(rng, 30, "long"), _dialogue(rng, 7, "short")]
    for k in (1, 6, 13, 29):
        for mode in ("change", "delete"):
            assert peek_gap(_model(causal=True, wp=5), dialogues, [k, min(k, 7)], mode, k) <= ATOL


@pytest.mark.parametrize("mode", ["change", "delete"])
@pytest.mark.parametrize("params", [
    {"causal": False, "wf": 5},  # the offline model
    # the text Transformer alone
    {"causal": False, "wf": 0, "modalities": ("text",), "use_gnn": False, "use_pcm": False},
    {"causal": False, "wf": 2, "modalities": ("audio",), "use_pcm": False},  # graph window
    {"causal": False, "wf": 0, "modalities": ("audio", "visual"), "use_gnn": False},  # P-CM
], ids=["offline", "text-transformer", "graph-future-window", "pcm"])
def test_the_check_catches_an_offline_model(params, mode):
    """Each future-reading path of the offline model alone is caught by the same check."""
    rng = np.random.default_rng(1)
    dialogues = [_dialogue(rng, 9, "a"), _dialogue(rng, 4, "b")]
    assert peek_gap(_model(**params), dialogues, [4, 2], mode, seed=2) > 1e-3


def test_the_same_paths_are_past_only_when_causal():
    rng = np.random.default_rng(1)
    dialogues = [_dialogue(rng, 9, "a"), _dialogue(rng, 4, "b")]
    for params in ({"modalities": ("text",), "use_gnn": False, "use_pcm": False},
                   {"modalities": ("audio",), "use_pcm": False},
                   {"modalities": ("audio", "visual"), "use_gnn": False}):
        for mode in ("change", "delete"):
            assert peek_gap(_model(causal=True, **params), dialogues, [4, 2], mode, seed=2) <= ATOL


def test_causal_with_a_future_window_is_refused():
    with pytest.raises(ConfigError, match="causal model cannot look at later utterances"):
        CorectConfig(causal=True, wf=1).validate()
    with pytest.raises(ConfigError, match="wf=0"):
        model_config("corect", {"causal": True, "wf": 5})
    cfg = load_config("configs/corect_iemocap6_causal.yaml", ["model.wf=2"])
    with pytest.raises(ConfigError, match="causal"):
        model_config(cfg.model_name, cfg.model_params)
    with pytest.raises(ConfigError, match="causal"):
        build_model("corect", {**SMALL, "causal": True, "wf": 1}, INFO)
    with pytest.raises(ConfigError, match="model.context .* needs model.causal: true"):
        CorectConfig(causal=False, context=8).validate()
    for bad in (0, -2, True, 2.5, "16"):
        with pytest.raises(ConfigError, match="model.context must be null or an integer >= 1"):
            CorectConfig(causal=True, wf=0, context=bad).validate()
    with pytest.raises(ConfigError, match="speaker_mode must be one of tags, per_dialogue"):
        model_config("corect", {"speaker_mode": "names"})


@pytest.mark.parametrize("preset", ["corect_iemocap4", "corect_iemocap6", "corect_meld"])
def test_causal_presets_are_the_offline_recipe_made_causal(preset):
    causal = load_config(f"configs/{preset}_causal.yaml")
    offline = load_config(f"configs/{preset}.yaml")
    assert causal.name == f"{preset}_causal"
    assert causal.model["causal"] is True and causal.model["wf"] == 0
    live = {"causal": False, "wf": offline.model["wf"], "context": None, "speaker_mode": "tags"}
    assert {**causal.model, **live} == {**offline.model, "context": None, "speaker_mode": "tags"}
    assert causal.model["context"] == 16 and causal.model["speaker_mode"] == "per_dialogue"  # for live use
    assert causal.train == offline.train and causal.data == offline.data
    model_config(causal.model_name, causal.model_params)  # validates


@pytest.mark.parametrize("speaker_mode, sink", [("tags", False), ("per_dialogue", False), ("per_dialogue", True)])
@torch.no_grad()
def test_stepping_equals_the_batch_model_within_its_window(speaker_mode, sink):
    """The batch model (packed sequences, windowed attention, speakers renumbered per dialogue) and the same
    model stepped one utterance at a time agree on every utterance; the dialogues are longer than the window
    (context 2, wp 2) and their first speaker is not tag 0, so a wrong window or numbering shows.  With
    ``attention_sink`` every attention layer's learned key/value is read on both paths alike."""
    model = _model(causal=True, wp=2, context=2, speaker_mode=speaker_mode, attention_sink=sink)
    rng = np.random.default_rng(5)
    dialogues = []
    for i, tags in enumerate(([2, 0, 2, 1, 0, 0, 2, 1, 2], [1, 1, 2, 1, 2, 1])):
        d = _dialogue(rng, len(tags), f"d{i}")
        dialogues.append(Dialogue(d.vid, np.array(tags), d.labels, d.features))
    whole = model(collate_dialogues(dialogues, MODS))
    at = 0
    for d in dialogues:
        order = list(dict.fromkeys(d.speakers.tolist()))  # the stream's numbering: by first appearance
        rows = np.array([order.index(s) for s in d.speakers]) if speaker_mode == "per_dialogue" else d.speakers
        state = model.init_state(1)
        for t in range(len(d)):
            one = Dialogue(d.vid, rows[t:t + 1], d.labels[t:t + 1], {m: x[t:t + 1] for m, x in d.features.items()})
            step = model(collate_dialogues([one], MODS), state)
            np.testing.assert_allclose(step[0].numpy(), whole[at + t].numpy(), atol=ATOL)
        at += len(d)


@torch.no_grad()
def test_mask_padding_false_attends_to_padding_as_the_reference_does():
    """``mask_padding: false`` (the reference's way): the stacks run on every position of the padded batch, so
    a short dialogue's answers change (its queries read its padding) while a dialogue with no padding answers
    as with masking; one answer per real utterance either way."""
    masked = _model(causal=False, wp=3, wf=2)
    params = {**SMALL, "causal": False, "wp": 3, "wf": 2, "modalities": list(MODS), "use_gnn": True, "use_pcm": True,
              "context": None, "speaker_mode": "tags", "mask_padding": False}
    unmasked = build_model("corect", params, INFO).eval()
    unmasked.load_state_dict(masked.state_dict())
    rng = np.random.default_rng(3)
    dialogues = [_dialogue(rng, 3, "short"), _dialogue(rng, 7, "long")]
    a, b = masked(collate_dialogues(dialogues, MODS)), unmasked(collate_dialogues(dialogues, MODS))
    assert a.shape == b.shape == (10, 4)
    np.testing.assert_allclose(b[3:].numpy(), a[3:].numpy(), atol=ATOL)  # the long dialogue: no padding
    assert float((b[:3] - a[:3]).abs().max()) > 1e-3  # the short one read its 4 padded positions


def test_pad_attention_in_training_reads_padding_while_training_only():
    """``pad_attention_in_training``: in training the short dialogue's answers are those of ``mask_padding:
    false`` (it reads its padding); in eval mode those of the masked model (what it gives alone, whatever its
    batch mates)."""
    base = {**SMALL, "causal": False, "wp": 3, "wf": 2, "modalities": list(MODS), "use_gnn": True, "use_pcm": True,
            "context": None, "speaker_mode": "tags", "dropout": 0.0, "pcm_dropout": 0.0}
    variants = {"masked": {}, "unmasked": {"mask_padding": False}, "train": {"pad_attention_in_training": True}}
    models = {}
    for name, over in variants.items():
        torch.manual_seed(0)
        models[name] = build_model("corect", {**base, **over}, INFO)
    rng = np.random.default_rng(3)
    batch = collate_dialogues([_dialogue(rng, 3, "short"), _dialogue(rng, 7, "long")], MODS)
    with torch.no_grad():  # eval first: a training forward moves BatchNorm's running statistics
        evals = {k: m.eval()(batch) for k, m in models.items()}
        train = {k: m.train()(batch) for k, m in models.items()}
    np.testing.assert_allclose(train["train"].numpy(), train["unmasked"].numpy(), atol=ATOL)
    np.testing.assert_allclose(evals["train"].numpy(), evals["masked"].numpy(), atol=ATOL)
    assert float((evals["unmasked"][:3] - evals["masked"][:3]).abs().max()) > 1e-3  # they differ where padding is
    with pytest.raises(ConfigError, match="model.pad_attention_in_training needs model.mask_padding: true"):
        build_model("corect", {**base, "mask_padding": False, "pad_attention_in_training": True}, INFO)


@torch.no_grad()
def test_the_speaker_embedding_is_added_to_each_encoded_utterance():
    model = _model(causal=True, wp=3, modalities=("audio", "visual"), use_gnn=False, use_pcm=False)
    rng = np.random.default_rng(4)
    batch = collate_dialogues([_dialogue(rng, 5, "d")], ("audio", "visual"))
    with_speakers, _ = model.encode(batch, None, batch.mask)
    weight = model.speaker.weight.detach().clone()
    try:
        model.speaker.weight.zero_()
        without, _ = model.encode(batch, None, batch.mask)
    finally:
        model.speaker.weight.copy_(weight)
    added = weight[batch.speakers[batch.mask]]
    assert float(added.abs().max()) > 0.1
    for w, wo in zip(with_speakers, without):
        np.testing.assert_allclose((w - wo).numpy(), added.numpy(), atol=1e-6)
