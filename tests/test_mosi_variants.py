"""The MOSI model's switches: the defaults stay the lab baseline, subsets read only their modalities, the
Transformer's positional encoding matters, padding is ignored, every shipped study variant trains a batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from affectkit.config import config_from_dict, load_config
from affectkit.data.mosi import MODALITIES
from affectkit.errors import ConfigError
from affectkit.models import build_model
from affectkit.studies import load_study
from affectkit.tasks.mosi import regression_loss

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"vision": 35, "text": 300, "audio": 74}
INFO = {"dims": DIMS, "seq_len": 50}
SMALL_INFO = {"dims": {"vision": 5, "text": 7, "audio": 6}, "seq_len": 12}
VARIANTS = [
    {},
    {"encoder": "transformer"},
    {"encoder": "transformer", "pool": "mean", "pos_encoding": "learned"},
    {"fusion": "self_attention", "pool": "mean"},
    {"fusion": "cross_attention"},
    {"encoder": "transformer", "fusion": "cross_attention", "pool": "mean", "head_dropout": 0.1},
]


def _batch(info: dict, n: int = 4, modalities=MODALITIES, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = info["seq_len"]
    return {m: torch.randn(n, t, info["dims"][m], generator=g) for m in modalities}


def test_defaults_are_the_lab_baseline_bit_for_bit():
    """mosi_seq with default switches == lstm_baseline: same parameters, same order, same output."""
    torch.manual_seed(42)
    base = build_model("lstm_baseline", {}, INFO)
    torch.manual_seed(42)
    same = build_model("mosi_seq", {}, INFO)
    names = [n for n, _ in base.named_parameters()]
    assert names == [n for n, _ in same.named_parameters()]
    # the lab's creation order: norms, projections, LSTMs, fusion LSTM, head; modalities vision, text, audio
    order = [n.split(".")[0] for n in names]
    assert order == sorted(order, key=["norms", "proj", "encoders", "fusion", "head"].index)
    assert [n.split(".")[1] for n in names if n.startswith("proj.")] == ["vision", "vision", "text", "text",
                                                                       "audio", "audio"]
    assert list(base.state_dict()) == names  # no buffers: nothing new in a baseline checkpoint
    for (_, a), (_, b) in zip(base.named_parameters(), same.named_parameters()):
        assert torch.equal(a, b)
    x = _batch(INFO)
    assert torch.equal(base(x), same(x))


@pytest.mark.parametrize("params", VARIANTS)
def test_variants_build_and_train_a_batch(params):
    model = build_model("mosi_seq", {"hidden": 16, **params}, SMALL_INFO)
    out = model(_batch(SMALL_INFO))
    assert out.shape == (4,) and bool(((out > -3) & (out < 3)).all())
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class OnlyThese(dict):
    """A batch that fails the test when a model reads a key it was not given."""

    def __getitem__(self, key):
        if key not in self.keys():
            raise AssertionError(f"model read the missing modality {key!r}")
        return super().__getitem__(key)

    def get(self, key, default=None):
        raise AssertionError("models index the batch by their own modalities; no .get() probing")


SUBSETS = [["text"], ["vision"], ["audio"], ["vision", "text"], ["text", "audio"], ["vision", "audio"]]


@pytest.mark.parametrize("mods", SUBSETS)
@pytest.mark.parametrize("params", [VARIANTS[0], VARIANTS[2], VARIANTS[3], VARIANTS[5]])
def test_subset_model_never_touches_missing_modalities(mods, params):
    info = {"dims": {m: SMALL_INFO["dims"][m] for m in mods}, "seq_len": 12}  # the loader loads only these
    model = build_model("mosi_seq", {"hidden": 16, "modalities": mods, **params}, info)
    assert set(model.proj) == set(mods)
    batch = OnlyThese(_batch(SMALL_INFO, modalities=mods))
    model(batch).sum().backward()


def test_the_missing_modality_guard_can_fail():
    """The guard above is live: a three-modality model on a text-only batch trips it."""
    model = build_model("mosi_seq", {"hidden": 16}, SMALL_INFO)
    with pytest.raises(AssertionError, match="missing modality"):
        model(OnlyThese(_batch(SMALL_INFO, modalities=["text"])))


def _permuted_outputs(params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("mosi_seq", {"hidden": 16, "encoder": "transformer", **params}, SMALL_INFO).eval()
    x = _batch(SMALL_INFO, n=3, seed=1)
    perm = torch.randperm(SMALL_INFO["seq_len"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(x), model({m: v[:, perm] for m, v in x.items()})


@pytest.mark.parametrize("pe", ["sinusoidal", "learned"])
def test_positional_encoding_makes_order_matter(pe):
    a, b = _permuted_outputs({"pos_encoding": pe, "pool": "mean"})
    assert (a - b).abs().max() > 1e-4


def test_without_positional_encoding_mean_pooling_ignores_order():
    """The counterpart that shows the test above can fail: no PE + mean pooling is permutation-invariant."""
    a, b = _permuted_outputs({"pos_encoding": "none", "pool": "mean"})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["add", "self_attention", "cross_attention"])
def test_padding_is_ignored(fusion):
    """Masking: left padding (all-zero steps) changes nothing when the model has no positional signal."""
    torch.manual_seed(0)
    params = {"hidden": 16, "encoder": "transformer", "pos_encoding": "none", "pool": "mean", "fusion": fusion}
    model = build_model("mosi_seq", params, SMALL_INFO).eval()
    x = _batch(SMALL_INFO, n=2, seed=3)
    short = {m: torch.cat([torch.zeros(2, 3, v.shape[2]), v[:, 3:]], 1) for m, v in x.items()}
    longer = {m: torch.cat([torch.zeros(2, 4, v.shape[2]), v], 1) for m, v in short.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(short), model(longer), atol=1e-5, rtol=1e-5)


def test_a_clip_without_real_steps_gives_a_finite_output():
    model = build_model("mosi_seq", {"hidden": 16, "fusion": "cross_attention", "pool": "mean"}, SMALL_INFO)
    x = {m: torch.zeros_like(v) for m, v in _batch(SMALL_INFO, n=2).items()}
    assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("bad", [{"encoder": "gru"}, {"fusion": "concat"}, {"pool": "max"},
                                 {"pos_encoding": "rope"}, {"encoder": "transformer", "hidden": 10, "heads": 4}])
def test_bad_switches_are_refused(bad):
    with pytest.raises(ConfigError):
        build_model("mosi_seq", bad, SMALL_INFO)


def _shipped_variants():
    out = []
    for path in sorted((ROOT / "configs" / "studies").glob("*.yaml")):
        study = load_study(path)
        out += [pytest.param(v.raw, id=f"{path.stem}:{name}") for name, v in study.variants.items()
                if config_from_dict(v.raw).data.task == "mosi"]  # other tasks' studies are tested with them
    out.append(pytest.param(load_config(ROOT / "configs" / "mosi_better.yaml").to_dict(), id="mosi_better"))
    return out


@pytest.mark.parametrize("raw", _shipped_variants())
def test_every_shipped_variant_trains_one_batch(raw):
    """Every variant of every study preset (and the better model) builds from its config and takes a step."""
    cfg = config_from_dict(raw)
    params = {**cfg.model_params, "hidden": 16}
    mods = params.get("modalities", list(MODALITIES))
    info = {"dims": {m: SMALL_INFO["dims"][m] for m in mods}, "seq_len": SMALL_INFO["seq_len"]}
    model = build_model(cfg.model_name, params, info)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    out = model(_batch(SMALL_INFO, modalities=mods))
    loss = regression_loss(cfg.train)(out, torch.linspace(-3, 3, 4))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
