"""CORECT: the model learns the planted signal, every switch builds and runs, bad configs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from affectkit.config import load_config
from affectkit.data.conversation import collate_dialogues, load_conversations
from affectkit.data.synthetic_conversation import write_synthetic_conversations
from affectkit.errors import ConfigError, DataError
from affectkit.models import build_model
from affectkit.tasks.conversation import ConversationTask, inverse_frequency_weights
from affectkit.train import train

SMALL = ["model.hidden=24", "model.text_ff=48", "model.text_layers=1", "model.pcm_self_layers=1",
         "model.pcm_layers=1", "model.graph_heads=2", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def conv_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "iemocap4.pkl"
    write_synthetic_conversations(path, preset="iemocap4", seed=3, n_dialogues={"train": 80, "dev": 10, "test": 20},
                                  dims={"text": 64, "audio": 16, "visual": 32})
    return path


@pytest.fixture(scope="module")
def data(conv_file):
    return load_conversations(conv_file)


def _model(data, **params):
    info = ConversationTask().info(data)
    base = {"hidden": 16, "text_ff": 32, "text_layers": 1, "pcm_layers": 1, "pcm_self_layers": 1, "graph_heads": 2}
    return build_model("corect", {**base, **params}, info)


def test_learns_planted_signal(conv_file, tmp_path):
    """The planted signal needs context and several modalities; CORECT must get well above chance."""
    cfg = load_config("configs/corect_iemocap4.yaml",
                      [*SMALL, "train.epochs=10", "train.lr=0.003", "model.dropout=0.1",
                                                               f"out_dir={tmp_path}"])
    result = train(cfg, data_path=conv_file)
    truth = np.array([lab for d in load_conversations(conv_file).splits["train"] for lab in d.labels])
    majority = np.bincount(truth).max() / truth.size
    # nearest-centroid on one utterance, all modalities, reaches about 0.7 on this preset; context adds more
    assert result.test["Acc"] > majority + 0.3, (result.test["Acc"], majority)
    assert result.test["F1_weighted"] > 0.65
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["select"] == "F1_weighted" and 1 <= metrics["best_epoch"] <= 10
    for split in ("dev", "test"):
        assert (result.run_dir / f"confusion_{split}.png").stat().st_size > 0
        rows = (result.run_dir / f"confusion_{split}.csv").read_text().splitlines()
        assert rows[0].split(",")[1:] == ["hap", "sad", "neu", "ang"] and len(rows) == 5
    cm = np.array(metrics["test"]["confusion"])
    assert cm.sum() == sum(len(d) for d in load_conversations(conv_file).splits["test"])


@pytest.mark.parametrize("params", [
    {}, {"use_gnn": False}, {"use_pcm": False}, {"use_speaker": False}, {"use_gnn": False, "use_pcm": False},
    {"wp": 0, "wf": 0}, {"modalities": ["text"]}, {"modalities": ["audio", "visual"]},
    {"causal": True, "wf": 0}, {"causal": True, "wf": 0, "context": 3, "speaker_mode": "per_dialogue"},
])
def test_every_switch_builds_and_trains_a_step(data, params):
    model = _model(data, **params)
    batch = collate_dialogues(data.splits["train"][:3], data.kept)
    logits = model(batch)
    assert logits.shape == (int(batch.lengths.sum()), data.n_classes)
    loss = torch.nn.functional.cross_entropy(logits, batch.labels[batch.mask])
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_subset_model_ignores_other_modalities(data):
    """A text-only model gives the same output whatever the audio/visual features hold."""
    model = _model(data, modalities=["text"]).eval()
    batch = collate_dialogues(data.splits["dev"][:2], data.kept)
    out1 = model(batch)
    batch.features["audio"] = torch.randn_like(batch.features["audio"])
    batch.features.pop("visual")
    assert torch.equal(out1, model(batch))


def test_first_appearance_slots_by_hand():
    """Speakers renumbered per dialogue by order of first appearance; padding gets 0."""
    from affectkit.models.corect import first_appearance_slots

    speakers = torch.tensor([[2, 2, 0, 1, 0, 2], [1, 3, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    want = torch.tensor([[0, 0, 1, 2, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    assert torch.equal(first_appearance_slots(speakers, valid, 4), want)


def test_attention_mask_with_a_window_by_hand():
    from affectkit.models.attention import attention_mask

    valid = torch.tensor([[True, True, True, False]])
    mask = attention_mask(valid, 4, 4, causal=True, context=2)[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]]
    assert attention_mask(None, 3, 3, causal=True, context=None)[0, 0].int().tolist() == \
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # queries 2 and 3 (``offset`` 2) of keys 0..4, window 2: each sees itself and the one before
    assert attention_mask(None, 2, 5, causal=True, offset=2, context=2)[0, 0].int().tolist() == \
        [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]
    # not causal: only padding is hidden, per dialogue
    two = torch.tensor([[True, False], [True, True]])
    assert attention_mask(two, 2, 2, causal=False).int().tolist() == [[[[1, 0]]], [[[1, 1]]]]
    assert attention_mask(None, 2, 2, causal=False) is None


def test_bad_configs_are_refused(data):
    with pytest.raises(ConfigError, match="causal model cannot look at later"):
        _model(data, causal=True, wf=3)
    with pytest.raises(ConfigError, match="subset"):
        _model(data, modalities=["smell"])
    with pytest.raises(ConfigError, match="unknown key model.depth"):
        _model(data, depth=3)
    with pytest.raises(ConfigError, match="not divisible"):
        _model(data, text_heads=5)


def test_modality_missing_from_file_is_an_error(tmp_path):
    import pickle

    path = tmp_path / "text_only.pkl"
    write_synthetic_conversations(path, preset="mosei2", seed=0)
    raw = pickle.loads(path.read_bytes())
    for split in ("train", "dev", "test"):
        for d in raw[split]:
            del d["audio"], d["visual"]
    path.write_bytes(pickle.dumps(raw))
    cfg = load_config("configs/corect_mosei2.yaml", [*SMALL, "train.epochs=1", f"out_dir={tmp_path}"])
    with pytest.raises(DataError, match="modality 'audio', 'visual' not in the file; it holds text"):
        train(cfg, data_path=path)


def test_inverse_frequency_weights_by_hand():
    w = inverse_frequency_weights(np.array([2, 6, 0, 4]))
    # N = 12, C = 4: w_c = 12 / (4 * n_c); absent class -> 0
    assert torch.allclose(w, torch.tensor([1.5, 0.5, 0.0, 0.75]))


def test_checkpoint_from_before_issue_22_loads_as_the_model_it_was(data, tmp_path):
    """A checkpoint written before P-CM followed MulT (no ``model_config``, cross stacks as bare layer lists)
    rebuilds the post-norm, unscaled P-CM it was trained with, and predicts as that model did."""
    from affectkit.checkpoint import FORMAT, load_model
    from affectkit.config import RunConfig

    old = {"pcm_norm": "post", "pcm_scale": False, "pcm_init": "torch"}
    model = _model(data, **old).eval()
    batch = collate_dialogues(data.splits["test"][:3], data.kept)
    want = model(batch)
    state = {k.replace(".layers.", ".", 1) if k.startswith("pcm.cross.") else k: v
             for k, v in model.state_dict().items()}
    assert any(k.startswith("pcm.cross.") and k.split(".")[3].isdigit() for k in state)
    info = ConversationTask().info(data)
    cfg = RunConfig(model={"name": "corect", "hidden": 16, "text_ff": 32, "text_layers": 1, "pcm_layers": 1,
                           "pcm_self_layers": 1, "graph_heads": 2})  # the old preset: no pcm_* keys
    path = tmp_path / "old.pt"
    torch.save({"affectkit_checkpoint": FORMAT, "version": "0.1.0", "config": cfg.to_dict(), "info": info,
                "state_dict": state, "extra": {}}, path)
    loaded, _, _ = load_model(path)
    assert loaded.cfg.pcm_norm == "post" and not loaded.cfg.pcm_scale
    torch.testing.assert_close(loaded(batch), want)


def test_a_dialogues_predictions_do_not_depend_on_its_batch_mates(data):
    """Padding-free: an offline model gives a dialogue the same logits alone and beside longer dialogues."""
    model = _model(data, text_heads=2).eval()
    dialogues = sorted(data.splits["test"][:4], key=len)
    together = torch.split(model(collate_dialogues(dialogues, data.kept)), [len(d) for d in dialogues])
    for d, got in zip(dialogues, together):
        torch.testing.assert_close(got, model(collate_dialogues([d], data.kept)), atol=1e-5, rtol=0)


def _amax(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def test_text_init_follows_nn_transformer_encoder(data):
    """``text_init``: mha draws the text stack's attention as ``nn.MultiheadAttention`` does (q/k/v
    Xavier-uniform as one (3d, d) matrix, zero biases), mha_clone also copies the first layer into every
    other (``nn.TransformerEncoder``); linear (the default) keeps nn.Linear's draws."""
    d = data.dims["text"]
    bound = (6 / (4 * d)) ** 0.5  # Xavier-uniform of the packed (3d, d) projection; nn.Linear's is 1/sqrt(d)
    torch.manual_seed(0)
    plain = _model(data, text_layers=2).text_context.layers
    for layer in plain:
        assert _amax(layer.attn.q.bias) > 0 and _amax(layer.attn.q.weight) <= d ** -0.5
    torch.manual_seed(0)
    mha = _model(data, text_layers=2, text_init="mha").text_context.layers
    for layer in mha:
        for lin in (layer.attn.q, layer.attn.k, layer.attn.v):
            assert 0.95 * bound < _amax(lin.weight) <= bound
            assert not lin.bias.any()
        assert not layer.attn.out.bias.any() and layer.ff[0].bias.any()
    assert not torch.equal(mha[0].attn.q.weight, mha[1].attn.q.weight)
    clone = _model(data, text_layers=2, text_init="mha_clone").text_context.layers
    first, second = clone[0].state_dict(), clone[1].state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert 0.95 * bound < _amax(clone[0].attn.k.weight) <= bound
    with pytest.raises(ConfigError, match="model.text_init must be one of linear, mha, mha_clone"):
        _model(data, text_init="xavier")


def test_pcm_sink_sits_in_pcm_only_and_leaves_a_text_only_model_as_it_was(data):
    """``pcm_sink``: every P-CM layer has a learned key/value and the text stack none (``attention_sink``
    puts one in both); a text-only model has no P-CM, so the switch changes neither its parameters nor,
    from the same seed, its output."""
    def sinks(model: torch.nn.Module) -> set[str]:
        return {name.split(".")[0] for name, _ in model.named_parameters() if name.endswith(".sink")}

    assert sinks(_model(data, pcm_sink=True)) == {"pcm"}
    assert sinks(_model(data, attention_sink=True)) == {"pcm", "text_context"}
    assert sinks(_model(data)) == set()
    batch = collate_dialogues(data.splits["test"][:3], data.kept)
    outs = []
    for pcm_sink in (False, True):
        torch.manual_seed(7)
        model = _model(data, modalities=["text"], pcm_sink=pcm_sink).eval()
        assert sinks(model) == set()
        outs.append(model(batch))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
