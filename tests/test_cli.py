"""The command line, in-process: make-synthetic, train, eval, demo, and one-line errors (exit code 2)."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
from pathlib import Path

import pytest

import affectkit.data.synthetic_mosi as synthetic_mosi
from affectkit.cli import main
from affectkit.config import RunConfig, load_config
from affectkit.data.mosi import load_mosi
from affectkit.metrics import REGRESSION_METRICS
from affectkit.train import resolve_config

FAST_SET = ["--set", "train.progress=false", "--set", "train.tensorboard=false", "--set", "model.hidden=16"]


def _run(argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with stdout captured (for module-scoped fixtures, where capsys is not available)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def _run_folder(out: str) -> Path:
    match = re.search(r"^run folder: (.+?)  \(tensorboard --logdir ", out, re.M)
    assert match, out
    return Path(match.group(1))


def _table(out: str) -> tuple[list[str], dict[str, list[str]]]:
    """The metric table printed by the CLI: (column names, {metric: cells})."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["metric"])
    columns = lines[start].split()[1:]
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != len(columns) + 1:
            break
        rows[cells[0]] = cells[1:]
    return columns, rows


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory, lab_yaml: Path) -> dict:
    """``make-synthetic mosi --small`` then ``train configs/mosi_lab.yaml`` for one epoch, through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "mosi.pkl"
    assert _run(["make-synthetic", "mosi", str(data), "--small", "--seed", "1"])[0] == 0
    code, out = _run(["train", str(lab_yaml), "--data", str(data), "--set", "train.epochs=1",
                      "--set", f"out_dir={root / 'runs'}", *FAST_SET])
    assert code == 0, out
    return {"root": root, "data": data, "out": out, "run": _run_folder(out)}


# -------------------------------------------------------------------------------------- happy paths


def test_make_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "mosi.pkl"
    assert main(["make-synthetic", "mosi", str(out), "--small", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    data = load_mosi(out)
    assert {s: len(p) for s, p in data.splits.items()} == {"train": 240, "valid": 60, "test": 120}
    assert data.dims == {"vision": 35, "text": 300, "audio": 74} and data.seq_len == 50
    # --seed is the generator's seed
    expected = synthetic_mosi.make_synthetic_mosi(1, sizes={"train": 240, "valid": 60, "test": 120})
    got = pickle.loads(out.read_bytes())
    assert (got["test"]["labels"] == expected["test"]["labels"]).all()


def test_train_prints_table_and_run_folder(cli_run: dict) -> None:
    out, run = cli_run["out"], cli_run["run"]
    columns, rows = _table(out)
    assert columns == ["valid", "test"]
    assert list(rows) == ["loss", *REGRESSION_METRICS]
    saved = json.loads((run / "metrics.json").read_text())
    for split, col in (("valid", 0), ("test", 1)):
        for name in rows:
            assert rows[name][col] == f"{saved[split][name]:.4f}", (split, name)
    assert "selected epoch 1 of 1 on valid Corr" in out
    assert run.is_dir() and run.parent == cli_run["root"] / "runs" / "mosi_lab"
    assert (run / "best.pt").is_file()
    cfg = load_config(run / "config.yaml")
    assert cfg.train.epochs == 1 and cfg.model["hidden"] == 16 and cfg.train.progress is False


def test_eval_prints_table(cli_run: dict, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = cli_run["run"]
    js = tmp_path / "eval.json"
    assert main(["eval", str(run / "best.pt"), str(cli_run["data"]), "--json", str(js)]) == 0
    columns, rows = _table(capsys.readouterr().out)
    assert columns == ["train", "valid", "test"]
    assert list(rows) == ["loss", *REGRESSION_METRICS]
    saved = json.loads((run / "metrics.json").read_text())
    for name in rows:
        assert rows[name][2] == f"{saved['test'][name]:.4f}", name
    written = json.loads(js.read_text())
    assert written["test"] == pytest.approx(saved["test"], abs=1e-6)
    assert main(["eval", str(run / "best.pt"), str(cli_run["data"]), "--split", "test"]) == 0
    assert _table(capsys.readouterr().out)[0] == ["test"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_demo_plumbing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo trains the dataclass defaults (the recipe) on the file it writes; here the file is small."""
    real = synthetic_mosi.write_synthetic_mosi
    calls: list[Path] = []

    def small(path, seed=0, **kwargs):
        calls.append(Path(path))
        return real(path, seed=seed, sizes={"train": 48, "valid": 16, "test": 16})

    monkeypatch.setattr(synthetic_mosi, "write_synthetic_mosi", small)
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert calls == [out_dir / "synthetic_mosi.pkl"]
    assert "writing a synthetic MOSI file" in out
    assert list(_table(out)[1]) == ["loss", *REGRESSION_METRICS]
    run = _run_folder(out)
    assert run.parent == out_dir / "runs" / "demo"
    cfg = load_config(run / "config.yaml")
    expected = RunConfig()
    expected.name, expected.out_dir, expected.train.epochs = "demo", str(out_dir / "runs"), 1
    assert cfg == resolve_config(expected)[0]  # the saved config is resolved: the task defaults filled in
    # a second demo reuses the data file
    assert main(["demo", "--out", str(out_dir), "--epochs", "1"]) == 0
    assert "writing" not in capsys.readouterr().out and len(calls) == 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_demo_real_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real demo: a synthetic file with the real MOSI shapes, the lab baseline, one epoch."""
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    data = load_mosi(tmp_path / "synthetic_mosi.pkl")
    assert {s: len(p) for s, p in data.splits.items()} == {"train": 1284, "valid": 229, "test": 686}
    _, rows = _table(out)
    assert float(rows["Corr"][1]) > 0.5  # the planted signal is found in one epoch at full size
    assert (_run_folder(out) / "tb").is_dir()


# ------------------------------------------------------------------------------------------- errors


def _error_cases(lab: str, data: str, ckpt: str, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """{case: (argv, text the error line must hold)}; reads ``tmp/evil.pkl`` and ``tmp/corrupt.pkl``."""
    evil, corrupt = tmp / "evil.pkl", tmp / "corrupt.pkl"
    train = ["train", lab, "--set", f"out_dir={tmp / 'runs'}", *FAST_SET]
    return {
        "missing_data_file": ([*train, "--data", str(tmp / "none.pkl")], f"{tmp / 'none.pkl'}: file not found"),
        "no_data": (train, "no data file"),
        "unknown_set_key": ([*train, "--data", data, "--set", "train.epoch=1"], "unknown key train.epoch"),
        "unknown_top_key": ([*train, "--data", data, "--set", "epochs=1"], "unknown key config.epochs"),
        "unknown_model_key": ([*train, "--data", data, "--set", "model.hiden=3"], "unknown key model.hiden"),
        "unknown_model": ([*train, "--data", data, "--set", "model.name=nope"], "unknown model 'nope'"),
        "bad_type": ([*train, "--data", data, "--set", "train.epochs=abc"], "train.epochs must be a number"),
        "bad_model_type": ([*train, "--data", data, "--set", "model.hidden=abc"], "model.hidden"),
        "bad_override": ([*train, "--data", data, "--set", "train.epochs"], "key=value"),
        "missing_preset": (["train", str(tmp / "none.yaml")], "config file not found"),
        "evil_pickle": ([*train, "--data", str(evil)], "refused to load class posix.system"),
        "corrupt_pickle": ([*train, "--data", str(corrupt)], "not a readable pickle"),
        "missing_checkpoint": (["eval", str(tmp / "none.pt"), data], "checkpoint not found"),
        "eval_missing_data": (["eval", ckpt, str(tmp / "none.pkl")], "file not found"),
        "eval_bad_split": (["eval", ckpt, data, "--split", "dev"], "unknown split 'dev'"),
    }


_CASES = list(_error_cases("L", "D", "C", Path("T")))


@pytest.mark.parametrize("case", _CASES)
def test_error_is_one_line_and_exit_2(
    case: str, cli_run: dict, lab_yaml: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    # a protocol-0 pickle that calls os.system (posix.system) when loaded by plain pickle.load
    (tmp_path / "evil.pkl").write_bytes(b"cposix\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    (tmp_path / "corrupt.pkl").write_bytes(b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\xff")
    argv, expected = _error_cases(str(lab_yaml), str(cli_run["data"]), str(cli_run["run"] / "best.pt"),
                                  tmp_path)[case]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err_lines) == 1, captured.err
    assert err_lines[0].startswith("affectkit: error: ")
    assert expected in err_lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert captured.out == ""
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "runs").exists()  # nothing is written for a run that cannot start
