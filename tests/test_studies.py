"""Studies: a run per (variant, seed) with the one trainer, resume without retraining, failures isolated,
the summary's statistics checked on a hand-made results.csv, plots written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import affectkit.train
from affectkit.cli import main
from affectkit.data.synthetic_mosi import write_synthetic_mosi
from affectkit.errors import ConfigError
from affectkit.studies import (
    load_study,
    mean_std,
    paired_difference,
    read_results_csv,
    run_study,
    summary_markdown,
    t975,
    write_plots,
)

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "configs" / "mosi_lab.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synth_tiny_seed3.pkl"
    return write_synthetic_mosi(path, seed=3, sizes={"train": 64, "valid": 24, "test": 32},
                                dims={"vision": 5, "text": 8, "audio": 6}, seq_len=10)


def _study(tmp_path: Path, variants: dict, seeds=(1, 2), **extra) -> Path:
    path = tmp_path / "study.yaml"
    spec = {"name": "tiny", "base": str(LAB), "seeds": list(seeds), "variants": variants,
            "common": {"model.hidden": 16, "train.epochs": 1, "train.tensorboard": False}, **extra}
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def count_runs(monkeypatch) -> list[tuple[str, int]]:
    """Every call of the one trainer, as (run folder name, seed)."""
    calls: list[tuple[str, int]] = []
    real = affectkit.train.train

    def counting(cfg, *args, **kwargs):
        calls.append((Path(kwargs["run_dir"]).parent.name, cfg.train.seed))
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(affectkit.train, "train", counting)
    return calls


def test_study_runs_every_pair_then_resumes_only_the_missing_one(tmp_path, data_file, count_runs, capsys):
    study = _study(tmp_path, {"baseline": {}, "no_ln": {"model.layernorm": False}})
    out = tmp_path / "out"
    assert main(["-q", "study", str(study), "--data", str(data_file), "--out", str(out)]) == 0
    assert sorted(count_runs) == [("baseline", 1), ("baseline", 2), ("no_ln", 1), ("no_ln", 2)]
    assert "4 runs: 0 already done, 4 trained now, 0 failed" in capsys.readouterr().out
    for v in ("baseline", "no_ln"):
        for s in (1, 2):
            assert (out / "runs" / v / f"seed{s}" / "metrics.json").is_file()

    # interrupted study: one run lost; the rerun trains only that one
    import shutil

    shutil.rmtree(out / "runs" / "no_ln" / "seed1")
    count_runs.clear()
    result = run_study(study, data=data_file, out=out, progress=False, threads=1)
    assert count_runs == [("no_ln", 1)]
    assert (result.skipped, len(result.ran), result.total) == (3, 1, 4)

    rows = read_results_csv(out / "results.csv")
    assert [(r["variant"], r["seed"]) for r in rows] == [("baseline", 1), ("baseline", 2), ("no_ln", 1),
                                                         ("no_ln", 2)]
    assert {"best_epoch", "valid_Corr", "test_Corr", "test_MAE", "test_Acc7", "train_seconds",
            "n_params"} <= set(rows[0])
    summary = (out / "summary.md").read_text()
    assert "synth_tiny_seed3.pkl" in summary and "generator seed 3" in summary and "SYNTHETIC" in summary
    assert f"affectkit study {study}" in summary
    assert summary.index("**baseline**") < summary.index("| no_ln |")
    for name in ("metrics.png", "differences.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_a_changed_config_reruns_and_nothing_else(tmp_path, data_file, count_runs):
    out = tmp_path / "out"
    run_study(_study(tmp_path, {"baseline": {}}, seeds=(1,)), data=data_file, out=out, progress=False, threads=1)
    count_runs.clear()
    run_study(_study(tmp_path, {"baseline": {"train.lr": 0.01}}, seeds=(1,)), data=data_file, out=out,
              progress=False, threads=1)
    assert count_runs == [("baseline", 1)]


def test_a_failing_run_is_reported_and_the_others_finish(tmp_path, data_file):
    # train.select names no metric: the trainer raises after the first epoch of that variant only
    study = _study(tmp_path, {"baseline": {}, "broken": {"train.select": "NoSuchMetric"}}, seeds=(1,))
    result = run_study(study, data=data_file, out=tmp_path / "out", progress=False, threads=1)
    assert [(f.variant, f.seed) for f in result.failures] == [("broken", 1)]
    assert "NoSuchMetric" in result.failures[0].error
    assert (tmp_path / "out" / "runs" / "broken" / "seed1" / "error.txt").is_file()
    assert [r["variant"] for r in result.rows] == ["baseline"]
    assert "Not finished (yet): broken/seed1" in (tmp_path / "out" / "summary.md").read_text()


def test_parallel_workers_give_the_same_results(tmp_path, data_file):
    """Two spawned worker processes, one thread each; seeded runs equal the in-process ones at one thread."""
    study = _study(tmp_path, {"baseline": {}, "l1": {"train.loss": "l1"}}, seeds=(1,))
    a = run_study(study, data=data_file, out=tmp_path / "par", workers=2, progress=False, threads=1)
    b = run_study(study, data=data_file, out=tmp_path / "seq", workers=1, progress=False, threads=1)
    assert not a.failures and len(a.ran) == 2
    key = ("variant", "best_epoch", "test_MAE", "test_Corr", "valid_Corr")
    assert [[r[k] for k in key] for r in a.rows] == [[r[k] for k in key] for r in b.rows]
    assert [r["variant"] for r in a.rows] == ["baseline", "l1"]


def test_study_files_are_checked_when_loaded(tmp_path):
    with pytest.raises(ConfigError, match="variant 'oops'.*model.no_such_switch"):
        load_study(_study(tmp_path, {"baseline": {}, "oops": {"model.no_such_switch": 1}}))
    with pytest.raises(ConfigError, match="baseline 'nope'"):
        load_study(_study(tmp_path, {"a": {}}, baseline="nope"))
    with pytest.raises(ConfigError, match="folder name"):
        load_study(_study(tmp_path, {"a/b": {}}))
    nested = load_study(_study(tmp_path, {"base_line": {}, "x": {"model": {"layernorm": False}}}), seeds=[7])
    assert nested.variants["x"].overrides == {"model.layernorm": False}
    assert nested.variants["x"].raw["model"]["layernorm"] is False and nested.seeds == [7]
    assert nested.baseline == "base_line"  # the first variant unless named


def test_shipped_presets_load():
    ab = load_study(ROOT / "configs" / "studies" / "ablations.yaml")
    assert ab.baseline == "baseline" and len(ab.seeds) == 5
    for name in ("transformer", "no_layernorm", "text", "vision", "audio", "text_vision", "text_audio",
                 "vision_audio", "l1", "huber", "self_attention", "cross_attention"):
        assert name in ab.variants
    assert ab.variants["text"].raw["model"]["modalities"] == ["text"]
    better = load_study(ROOT / "configs" / "studies" / "better.yaml")
    assert better.variants["better"].raw["model"]["name"] == "mosi_seq"


# ----------------------------------------------------------------------------- the summary's statistics

HAND_CSV = """variant,seed,best_epoch,valid_Corr,test_MAE,test_Corr,train_seconds,n_params
baseline,1,3,0.50,1.00,0.50,10.0,100
baseline,2,4,0.60,1.10,0.60,12.0,100
baseline,3,5,0.70,1.20,0.70,14.0,100
better,1,2,0.55,0.90,0.55,20.0,200
better,2,2,0.65,1.00,0.70,20.0,200
better,3,2,0.75,1.15,0.72,20.0,200
single,2,1,0.1,2.00,0.10,1.0,50
"""


def test_summary_statistics_on_a_hand_made_results_csv(tmp_path):
    (tmp_path / "results.csv").write_text(HAND_CSV)
    rows = read_results_csv(tmp_path / "results.csv")

    # baseline test Corr 0.5, 0.6, 0.7: mean 0.6, sample std 0.1
    mean, std, n = mean_std(r["test_Corr"] for r in rows if r["variant"] == "baseline")
    assert (round(mean, 10), round(std, 10), n) == (0.6, 0.1, 3)

    # paired differences of Corr, by seed: 0.05, 0.10, 0.02 -> mean 0.17/3; sd by hand; t(0.975, 2) = 4.303
    d = [0.05, 0.10, 0.02]
    m = sum(d) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    half = 4.303 * sd / math.sqrt(3)
    p = paired_difference({1: 0.5, 2: 0.6, 3: 0.7}, {1: 0.55, 2: 0.70, 3: 0.72})
    assert p.n == 3 and p.mean == pytest.approx(m)
    assert (p.lo, p.hi) == (pytest.approx(m - half, abs=1e-4), pytest.approx(m + half, abs=1e-4))
    assert (round(p.mean, 4), round(p.lo, 4), round(p.hi, 4)) == (0.0567, -0.0437, 0.1571)
    assert not p.excludes_zero

    text = summary_markdown(rows, "baseline", "`hand.csv`", "affectkit study x.yaml", "hand")
    assert "| **baseline** | 3 | 1.1000 ± 0.1000 | 0.6000 ± 0.1000 | 0.6000 ± 0.1000 |" in text
    # MAE: differences -0.10, -0.10, -0.05 -> mean -0.0833, sd 0.028868, half 4.303 * sd / sqrt(3) = 0.0717,
    # interval [-0.15504, -0.01162]: excludes 0 (marked *)
    assert "| better | 3 | -0.0833 [-0.1550, -0.0116]\\* | +0.0567 [-0.0437, +0.1571] |" in text
    # one seed in common: the difference alone, no interval
    assert "| single | 1 | +0.9000 | -0.5000 |" in text
    assert text.index("**baseline**") < text.index("| better |")
    assert text.count("| better |") == 2 and text.count("| single |") == 2  # one row per table
    assert "MAE ↓" in text and "`hand.csv`" in text and "affectkit study x.yaml" in text


def test_pairing_uses_only_shared_seeds():
    p = paired_difference({1: 1.0, 2: 2.0, 3: 3.0}, {2: 2.5, 3: 3.5, 4: 9.0})
    assert (p.n, p.mean) == (2, 0.5)
    assert p.lo == p.hi == 0.5  # identical differences: zero-width interval


def test_t_table():
    assert t975(2) == pytest.approx(4.303, abs=1e-3)
    assert t975(1) == pytest.approx(12.706, abs=1e-3)
    assert t975(30) == pytest.approx(2.042, abs=1e-3)
    assert t975(60) == pytest.approx(2.000, abs=2e-3) and t975(1000) == pytest.approx(1.962, abs=1e-3)
    assert all(t975(k) > t975(k + 1) for k in range(1, 80))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=2, max_size=12), st.floats(-1, 1))
def test_paired_interval_is_a_shift_of_the_differences(diffs, shift):
    base = {i: float(i) for i in range(len(diffs))}
    p = paired_difference(base, {i: base[i] + x for i, x in enumerate(diffs)})
    q = paired_difference(base, {i: base[i] + x + shift for i, x in enumerate(diffs)})
    assert p.lo <= p.mean + 1e-9 and p.mean <= p.hi + 1e-9
    assert q.mean - p.mean == pytest.approx(shift, abs=1e-6)
    assert q.hi - q.lo == pytest.approx(p.hi - p.lo, abs=1e-6)


def test_plots_are_png_files(tmp_path):
    (tmp_path / "results.csv").write_text(HAND_CSV)
    rows = read_results_csv(tmp_path / "results.csv")
    written = write_plots(rows, "baseline", tmp_path)
    assert [w.name for w in written] == ["metrics.png", "differences.png", "curves.png"]
    assert all(w.read_bytes()[:8] == PNG for w in written)


def test_one_device_per_worker_and_the_device_does_not_rerun(tmp_path, data_file):
    study = _study(tmp_path, {"baseline": {}})
    res = run_study(study, data=data_file, out=tmp_path / "out", workers=2, devices=["cpu", "cpu"], progress=False,
                    threads=1)
    assert not res.failures and len(res.ran) == 2
    for s in (1, 2):
        stored = yaml.safe_load((tmp_path / "out" / "runs" / "baseline" / f"seed{s}" / "config.yaml").read_text())
        assert stored["train"]["device"] == "cpu"  # the worker's device, not the config's auto
    again = run_study(study, data=data_file, out=tmp_path / "out", progress=False, threads=1)
    assert (again.skipped, len(again.ran)) == (2, 0)  # where a run ran is not a reason to rerun it


def test_engine_options_are_checked(tmp_path, data_file, capsys):
    study = _study(tmp_path, {"baseline": {}})
    with pytest.raises(ConfigError, match="one per worker"):
        run_study(study, data=data_file, out=tmp_path / "o", workers=2, devices=["cpu"], progress=False)
    with pytest.raises(ConfigError, match="--address is for --engine ray"):
        run_study(study, data=data_file, out=tmp_path / "o", address="auto", progress=False)
    with pytest.raises(ConfigError, match="unknown engine 'spark'"):
        run_study(study, data=data_file, out=tmp_path / "o", engine="spark", progress=False)
    assert main(["study", str(study), "--data", str(data_file), "--engine", "local", "--address", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--address is for --engine ray" in err


def test_resume_compares_resolved_configs(tmp_path, count_runs):
    """A preset that leaves select/loss/scheduler to the task: the saved config has them filled in, and a
    rerun must still see the finished runs as done (not as 'changed' from None to the task's default)."""
    from affectkit.data.synthetic_conversation import write_synthetic_conversations

    data = tmp_path / "conv.pkl"
    write_synthetic_conversations(data, preset="iemocap4", seed=0, n_dialogues={"train": 8, "dev": 3, "test": 3},
                                  dims={"text": 6, "audio": 3, "visual": 4})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "conv", "base": str(ROOT / "configs" / "utterance_mlp.yaml"),
                                     "seeds": [1], "variants": {"mlp": {}},
                                     "common": {"train.epochs": 1, "train.tensorboard": False,
                                                "model.hidden": 8}}))
    assert load_study(study).variants["mlp"].raw["train"].get("select") is None
    out = tmp_path / "out"
    run_study(study, data=data, out=out, progress=False, threads=1)
    assert count_runs == [("mlp", 1)]
    saved = yaml.safe_load((out / "runs" / "mlp" / "seed1" / "config.yaml").read_text())
    assert saved["train"]["select"] == "F1_weighted"
    count_runs.clear()
    result = run_study(study, data=data, out=out, progress=False, threads=1)
    assert count_runs == [] and result.skipped == 1
