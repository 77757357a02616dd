"""Run configs (dataclass defaults, YAML presets, --set overrides) and the model registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from affectkit.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_override,
    read_yaml,
)
from affectkit.errors import ConfigError
from affectkit.models import build_model, get_model_entry, model_names
from affectkit.models.mosi_seq import LstmBaseline, MosiSeqConfig
from affectkit.models.registry import model_config
from affectkit.train import resolve_config

# ------------------------------------------------------------------------------ the preset is the recipe


def _resolved(cfg: RunConfig) -> dict:
    """The config as a dict with the task's train defaults and the model's own dataclass defaults filled in."""
    cfg = resolve_config(cfg)[0]
    d = cfg.to_dict()
    d["model"] = {"name": cfg.model_name, **dataclasses.asdict(model_config(cfg.model_name, cfg.model_params))}
    return d


def test_lab_yaml_equals_the_dataclass_defaults(lab_yaml: Path) -> None:
    """`affectkit demo` trains RunConfig() with no preset: it is the lab recipe only if the two agree."""
    preset, defaults = _resolved(load_config(lab_yaml)), _resolved(RunConfig())
    assert preset["name"] == "mosi_lab" and defaults["name"] == "run"
    for d in (preset, defaults):
        del d["name"]
        assert d["data"].pop("path") is None
    assert preset == defaults


def test_every_value_written_in_the_lab_yaml_is_a_default(lab_yaml: Path) -> None:
    raw = yaml.safe_load(lab_yaml.read_text())
    train_defaults = dataclasses.asdict(resolve_config(RunConfig())[0].train)  # with the MOSI task's defaults
    for key, value in raw["train"].items():
        assert train_defaults[key] == value, key
    model_defaults = dataclasses.asdict(MosiSeqConfig())
    for key, value in raw["model"].items():
        if key != "name":
            assert model_defaults[key] == value, key


def test_defaults_follow_the_spec_recipe() -> None:
    """The numbers of shared/spec/mosi_lab.md: MSE, Adam 1e-3, 20 epochs, batch 16, cosine, seed 42, Corr
    (the MOSI task supplies loss, schedule and selection metric)."""
    cfg = resolve_config(RunConfig())[0]
    t = cfg.train
    assert (t.epochs, t.batch_size, t.lr, t.scheduler, t.loss, t.seed, t.select) == (
        20, 16, 1e-3, "cosine", "mse", 42, "Corr")
    assert t.weight_decay == 0.0 and t.grad_clip == 0.0
    assert cfg.data.task == "mosi" and cfg.model_name == "lstm_baseline"
    m = MosiSeqConfig()
    assert (m.hidden, m.num_layers, m.dropout, m.layernorm) == (128, 1, 0.1, True)
    assert m.modalities == ["vision", "text", "audio"]


def test_dump_and_reload_round_trip(lab_yaml: Path) -> None:
    cfg = load_config(lab_yaml, ["train.epochs=3", "model.modalities=[text]", "data.path=x.pkl"])
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_no_preset_gives_the_defaults() -> None:
    assert load_config(None) == RunConfig()
    assert load_config(None, ["train.epochs=2"]).train.epochs == 2


# ------------------------------------------------------------------------------------------ overrides


def test_override_types(lab_yaml: Path) -> None:
    cfg = load_config(lab_yaml, [
        "train.epochs=5", "train.lr=0.01", "train.progress=false", "train.tensorboard=no",
        "model.modalities=[text,audio]", "model.hidden=16", "model.layernorm=false", "name=ablation",
        "out_dir=/tmp/somewhere", "data.path=data/mosi_raw.pkl", "train.weight_decay=0",
    ])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.train.lr == 0.01
    assert cfg.train.progress is False and cfg.train.tensorboard is False
    assert cfg.model["modalities"] == ["text", "audio"]
    assert cfg.model["hidden"] == 16 and cfg.model["layernorm"] is False
    assert cfg.name == "ablation" and cfg.out_dir == "/tmp/somewhere"
    assert cfg.data.path == "data/mosi_raw.pkl"
    # an int given for a float field becomes a float
    assert cfg.train.weight_decay == 0.0 and isinstance(cfg.train.weight_decay, float)
    # untouched values keep the preset's
    assert cfg.train.batch_size == 16 and cfg.model["dropout"] == 0.1


@pytest.mark.parametrize(("text", "value"), [("train.lr=1e-3", 1e-3), ("train.lr=5E-4", 5e-4),
                                             ("train.lr=1.0e-3", 1e-3), ("train.grad_clip=1", 1.0)])
def test_scientific_notation_is_a_number(text: str, value: float) -> None:
    """PyYAML reads ``1e-3`` (no dot) as a string; the recipe writes lr as 1e-3, so it must work as a number."""
    cfg = load_config(None, [text])
    key = text.split("=")[0].split(".")[1]
    assert getattr(cfg.train, key) == pytest.approx(value)
    assert isinstance(getattr(cfg.train, key), float)


def test_parse_override() -> None:
    assert parse_override("train.epochs=5") == (["train", "epochs"], 5)
    assert parse_override("name=a=b") == (["name"], "a=b")
    assert parse_override("data.path=") == (["data", "path"], None)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=5")


def test_apply_overrides_dict_form_does_not_mutate() -> None:
    raw = {"train": {"epochs": 3}}
    out = apply_overrides(raw, {"train.lr": 0.1, "model.name": "lstm_baseline"})
    assert out == {"train": {"epochs": 3, "lr": 0.1}, "model": {"name": "lstm_baseline"}}
    assert raw == {"train": {"epochs": 3}}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides(raw, ["train.epochs.x=1"])


@pytest.mark.parametrize(
    ("override", "section", "valid"),
    [
        ("train.epoch=3", "train.epoch", ["epochs", "batch_size", "lr", "select", "seed"]),
        ("data.file=x", "data.file", ["task", "path"]),
        ("epochs=3", "config.epochs", ["name", "out_dir", "data", "model", "train"]),
    ],
)
def test_unknown_key_lists_valid_keys(lab_yaml: Path, override: str, section: str, valid: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(lab_yaml, [override])
    msg = str(err.value)
    assert f"unknown key {section}" in msg and "\n" not in msg
    for key in valid:
        assert key in msg


def test_unknown_model_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as err:
        model_config("lstm_baseline", {"hiden": 16})
    msg = str(err.value)
    assert "model.hiden" in msg
    for f in dataclasses.fields(MosiSeqConfig):
        assert f.name in msg


@pytest.mark.parametrize(
    "override",
    ["train.epochs=abc", "train.epochs=2.5", "train.epochs=true", "train.epochs=null", "train.lr=fast",
     "train.lr=[1]", "train.progress=maybe", "train.progress=1", "train.batch_size=16.5", "train.seed=null"],
)
def test_wrong_type_is_config_error(lab_yaml: Path, override: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(lab_yaml, [override])
    key = override.split("=")[0]
    assert key in str(err.value) and "\n" not in str(err.value)


def test_integral_float_for_int_field_is_accepted() -> None:
    cfg = load_config(None, ["train.epochs=3.0"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)


@pytest.mark.parametrize(
    "params",
    [{"hidden": "abc"}, {"hidden": 16.5}, {"layernorm": "maybe"}, {"dropout": "high"}, {"modalities": "text"},
     {"num_layers": None}, {"modalities": ["text", "text"]}, {"modalities": ["visual"]}, {"hidden": 0}],
    ids=["hidden_str", "hidden_float", "layernorm_str", "dropout_str", "modalities_str", "layers_null",
         "modalities_repeat", "modalities_unknown", "hidden_zero"],
)
def test_wrong_model_field_is_config_error(params: dict) -> None:
    """Model fields are checked by type too (a string hidden size must not reach torch as a traceback)."""
    with pytest.raises(ConfigError) as err:
        model_config("lstm_baseline", params)
    assert "model" in str(err.value) and "\n" not in str(err.value)


def test_model_field_number_parsing() -> None:
    cfg = model_config("lstm_baseline", {"dropout": "1e-1", "hidden": 8.0})
    assert cfg.dropout == pytest.approx(0.1) and cfg.hidden == 8 and isinstance(cfg.hidden, int)


@pytest.mark.parametrize("bad", ["model=lstm_baseline", "train=5"])
def test_section_must_be_a_mapping(bad: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(None, [bad])


# ----------------------------------------------------------------------------------------- presets


def test_base_inheritance(tmp_path: Path, lab_yaml: Path) -> None:
    (tmp_path / "base.yaml").write_text(lab_yaml.read_text())
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "text_only.yaml").write_text(
        "base: ../base.yaml\nmodel:\n  modalities: [text]\ntrain:\n  epochs: 4\n  loss: l1\n"
    )
    cfg = load_config(sub / "text_only.yaml")
    lab = load_config(lab_yaml)
    assert cfg.model == {**lab.model, "modalities": ["text"]}  # deep merge keeps the base's other model keys
    assert cfg.train == dataclasses.replace(lab.train, epochs=4, loss="l1")
    assert cfg.name == "mosi_lab"  # the base names it; a preset without name gets its file stem
    (sub / "named.yaml").write_text("base: text_only.yaml\nname: text_l1\ntrain:\n  lr: 0.01\n")
    two = load_config(sub / "named.yaml", ["train.epochs=2"])
    assert two.name == "text_l1" and two.train.lr == 0.01 and two.train.epochs == 2
    assert two.train.loss == "l1" and two.model["modalities"] == ["text"]
    assert "base" not in read_yaml(sub / "named.yaml")


def test_preset_without_name_is_named_after_the_file(tmp_path: Path) -> None:
    (tmp_path / "my_run.yaml").write_text("train:\n  epochs: 1\n")
    assert load_config(tmp_path / "my_run.yaml").name == "my_run"


@pytest.mark.parametrize(
    ("content", "match"),
    [("train: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "mapping at the top level"),
     ("base: missing.yaml\n", "not found")],
)
def test_bad_preset(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_missing_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ registry


def test_registry_is_the_list_of_models() -> None:
    names = model_names()
    assert "lstm_baseline" in names and names == sorted(names)
    assert model_names("mosi") == [n for n in names if get_model_entry(n).task == "mosi"]
    assert "lstm_baseline" in model_names("mosi") and "lstm_baseline" not in model_names("conversation")
    entry = get_model_entry("lstm_baseline")
    assert entry.cls is LstmBaseline and entry.config_cls is MosiSeqConfig and entry.task == "mosi"


def test_unknown_model_lists_registered_names() -> None:
    with pytest.raises(ConfigError) as err:
        get_model_entry("lstm")
    msg = str(err.value)
    assert "'lstm'" in msg
    for name in model_names():
        assert name in msg


def test_build_model_from_name_and_info() -> None:
    model = build_model("lstm_baseline", {"modalities": ["audio", "text"], "hidden": 8},
                        {"dims": {"text": 5, "audio": 3}, "seq_len": 4})
    assert isinstance(model, LstmBaseline)
    assert model.modalities == ["text", "audio"]  # canonical order
    assert set(model.proj) == {"text", "audio"} and model.proj["audio"].in_features == 3


def test_build_model_needs_the_modalities_in_the_data() -> None:
    with pytest.raises(ConfigError, match="vision"):
        build_model("lstm_baseline", {}, {"dims": {"text": 5, "audio": 3}})
