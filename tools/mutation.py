"""Mutation testing of the modules that carry the README's promises (mutmut 3; `pip install -e ".[dev]"`).

    python tools/mutation.py [--only metrics,graph] [--budget-min 90] [--max-children 1]

Each target (a module, or the named functions of one) runs in its own scratch copy under
``.cache/mutation/<target>/`` (source, tests and configs copied; mutmut's ``mutants/`` lives there, so a rerun
re-tests only what changed, and every mutant no test killed before), with only the test files that exercise
it. Mutants named in ``tools/mutation_equivalent.yaml`` (with the reason each cannot change behaviour) leave
the denominator; every other mutant that no test kills counts against the score ("no tests" included). The
per-target table and the list of survivors go to ``results/mutation/summary.md`` (raw counts in
``results.json``) and between the markers in ``TESTING.md``. Not part of the default test run: it takes tens
of minutes on two cores.

Why mutmut: it mutates per function (a target can be "the causal parts" of a module by naming functions), it
runs only the tests that cover the mutated function, and it resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = ROOT / ".cache" / "mutation"
OUT = ROOT / "results" / "mutation"
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.yaml"
MARK_START, MARK_END = "<!-- mutation:start -->", "<!-- mutation:end -->"


@dataclass(frozen=True)
class Target:
    """A module (``functions`` empty: all of it) or the named functions of it, with the tests that check it."""

    name: str
    module: str  # dotted, e.g. affectkit.models.steps
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()  # mutmut names: "x_func" for functions, "xǁClassǁmethod" for methods
    select: str = ""  # pytest -k expression, to leave out slow tests that do not check this code

    @property
    def path(self) -> str:
        return "src/" + self.module.replace(".", "/") + ".py"

    def patterns(self) -> list[str]:
        if not self.functions:
            return [f"{self.module}.*"]
        return [f"{self.module}.{f}__mutmut_*" for f in self.functions]


TARGETS: tuple[Target, ...] = (
    Target("metrics", "affectkit.metrics", ("tests/test_metrics.py", "tests/test_selection.py")),
    Target("selection", "affectkit.selection", ("tests/test_selection.py",)),
    Target("safe_pickle", "affectkit.safe_pickle", ("tests/test_safe_loading.py",)),
    Target("graph", "affectkit.graph", ("tests/test_graph.py",)),
    # steps.py in two: the bookkeeping between steps (stack/split/take, shift, rewinds, chunks) with every test
    # that uses it, and the per-step path (begin, write, window_rows, in_window, ...), which every streaming
    # test runs, so a surviving mutant of it costs the whole list: there the three slowest tests are left out
    # (the CLI in a subprocess, the real sentence encoder, and the 34 s sweep of windows and rewinds, whose
    # cases the other stream/prefill equalities cover).
    Target("steps", "affectkit.models.steps",
           ("tests/test_steps.py", "tests/test_stream.py", "tests/test_causal.py", "tests/test_prefill.py"),
           ("x__grown", "x__pad_rows", "xǁRingǁ_begin_chunk", "xǁRingǁholds", "xǁRingǁneeded", "xǁRingǁshift",
            "xǁRingǁstack", "xǁRingǁtake", "xǁStepStateǁcan_rewind", "xǁStepStateǁshift", "xǁStepStateǁsplit",
            "xǁStepStateǁstack")),
    Target("steps_core", "affectkit.models.steps",
           ("tests/test_steps.py", "tests/test_causal.py", "tests/test_prefill.py", "tests/test_stream.py"),
           ("x_in_window", "xǁRingǁ__init__", "xǁRingǁbegin", "xǁRingǁend", "xǁRingǁ_resize", "xǁRingǁwrite",
            "xǁRingǁmask", "xǁRingǁwindow_rows", "xǁRingǁnbytes", "xǁStepStateǁ__init__", "xǁStepStateǁbegin",
            "xǁStepStateǁadvance", "xǁStepStateǁnbytes"),
           select="not cli_stream and not real_sentence_encoder and not any_window_any_rewinds"),
    # The model-level checks of the causal parts (stepping equals the batch model, prefill equals stepping, the
    # masks by hand); tests/test_stream.py (the serving engine on top, 2 min a run on this machine) is left out.
    Target("corect_causal", "affectkit.models.corect",
           ("tests/test_steps.py", "tests/test_causal.py", "tests/test_prefill.py", "tests/test_corect.py"),
           ("x_first_appearance_slots", "xǁPairwiseCrossModalǁforward", "x__newest_edges", "xǁCorectǁencode",
            "xǁCorectǁforward", "xǁCorectǁinit_state", "xǁCorectǁstate_reach", "xǁCorectǁ_check_step"),
           select="not learns_planted_signal"),
    Target("attention_causal", "affectkit.models.attention",
           ("tests/test_steps.py", "tests/test_causal.py", "tests/test_prefill.py", "tests/test_corect.py"),
           ("x_attention_mask", "x_with_sink", "xǁRaggedǁ__init__", "xǁRaggedǁpad", "xǁRaggedǁattend",
            "xǁKVCacheǁ__init__",
            "xǁKVCacheǁupdate", "xǁKVCacheǁmask", "xǁMultiHeadAttentionǁforward", "xǁTransformerStackǁforward"),
           select="not learns_planted_signal"),
    Target("inputs", "affectkit.features.inputs", ("tests/test_inputs.py", "tests/test_finetune.py"),
           select="utterance_input or recipe or future or truncated or past_only or range or last_utterance"),
    Target("store", "affectkit.serve.store.sqlite", ("tests/test_store.py", "tests/test_serve.py",
                                                      "tests/test_serve_exposure.py")),
    Target("store_postgres", "affectkit.serve.store.postgres", ("tests/test_store.py",
                                                                "tests/test_serve_replicas.py"),
           select="not failover_through_haproxy"),  # an end-to-end run (processes, haproxy): minutes a mutant
    Target("access", "affectkit.serve.access", ("tests/test_access.py", "tests/test_serve_exposure.py",
                                                 "tests/test_serve.py")),
    Target("resume", "affectkit.studies.run", ("tests/test_resume.py",), ("x_is_done",)),
)

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def prepare(t: Target) -> Path:
    """The scratch copy for ``t``: fresh source/tests/configs (mutmut keeps its results beside them).  When
    the tests changed since the last run, mutmut's record of which tests cover which function is dropped
    (it keeps it otherwise, so a test written since would never be run against a mutant)."""
    work = SCRATCH / t.name
    work.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for path in sorted((ROOT / "tests").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    seen = work / "tests.sha256"
    if not seen.is_file() or seen.read_text() != digest.hexdigest():
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        seen.write_text(digest.hexdigest())
    for folder in ("src", "tests", "configs"):
        dest = work / folder
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ROOT / folder, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pyproject = (ROOT / "pyproject.toml").read_text().split("[tool.mutmut]")[0]
    args = ["-p", "no:cacheprovider", "-x", "-q", *(["-k", t.select] if t.select else [])]
    section = {"source_paths": ["src/affectkit"], "only_mutate": [t.path], "also_copy": ["configs/"],
               "pytest_add_cli_args_test_selection": list(t.tests), "pytest_add_cli_args": args}
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in section.items()]
    (work / "pyproject.toml").write_text(pyproject + "\n".join(lines) + "\n")
    return work


def retest_survivors(t: Target) -> int:
    """Forget the verdicts of the target's mutants that no test killed, so a rerun tries them against the
    tests as they are now (mutmut keeps a verdict until the mutated function changes, even when new tests
    were written for it); killed ones stay killed.  Returns how many were reset."""
    import fnmatch

    meta = SCRATCH / t.name / "mutants" / (t.path + ".meta")
    if not meta.is_file():
        return 0
    data = json.loads(meta.read_text())
    codes = data["exit_code_by_key"]
    reset = [k for k, v in codes.items() if v is not None and STATUS.get(v) != "killed"
             and any(fnmatch.fnmatchcase(k, p) for p in t.patterns())]
    for k in reset:
        codes[k] = None
    meta.write_text(json.dumps(data))
    return len(reset)


def run(t: Target, max_children: int, deadline: float) -> None:
    work = prepare(t)
    again = retest_survivors(t)
    if again:
        print(f"[{t.name}] {again} mutant(s) no test killed before are tried again", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    left = max(60.0, deadline - time.time())
    log = (SCRATCH / f"{t.name}.log").open("w")
    cmd = ["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children),
           *t.patterns()]
    print(f"[{t.name}] {' '.join(cmd[3:])} (up to {left / 60:.0f} min)", flush=True)
    server = None
    if "postgres" in t.module:  # one throw-away server for every run of the tests, not an initdb per mutant
        sys.path.insert(0, str(ROOT / "src"))
        from affectkit.serve.throwaway import LocalPostgres, postgres_missing

        if not postgres_missing():
            server = LocalPostgres(fsync=False)
            env["AFFECTKIT_TEST_POSTGRES_PORT"] = str(server.port)
    try:
        subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=left, check=False)
    except subprocess.TimeoutExpired:
        print(f"[{t.name}] stopped at the time budget; a rerun resumes", flush=True)
    finally:
        if server is not None:
            server.stop()


def collect(t: Target, equivalent: dict[str, str]) -> dict[str, object]:
    """Counts per status for the target's mutants, from mutmut's ``.meta`` file."""
    import fnmatch

    meta = SCRATCH / t.name / "mutants" / (t.path + ".meta")
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
    ours = {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, p) for p in t.patterns())}
    counts: dict[str, int] = {}
    survivors, equiv = [], []
    for key, code in sorted(ours.items()):
        status = STATUS.get(code, "suspicious")
        if status == "survived" and key not in equivalent and sql_case_only(t, key):
            equivalent[key] = "an SQL statement in other letter case: SQL keywords and identifiers ignore case"
        if key in equivalent and status != "killed":
            equiv.append(key)
            status = "equivalent"
        elif status in ("survived", "no tests", "suspicious"):
            survivors.append(key)
        counts[status] = counts.get(status, 0) + 1
    scored = sum(v for k, v in counts.items() if k not in ("equivalent", "skipped", "not checked"))
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    return {"target": t.name, "module": t.module, "functions": list(t.functions) or "all", "mutants": len(ours),
            "counts": counts, "killed": killed, "scored": scored, "score": killed / scored if scored else None,
            "survivors": survivors, "equivalent": equiv, "unchecked": counts.get("not checked", 0)}


SQL_WORDS = ("SELECT", "INSERT", "DELETE", "UPDATE", "BEGIN", "COMMIT", "ROLLBACK", "PRAGMA", "CREATE", "ALTER",
             "FROM", "WHERE", "ORDER")


def sql_case_only(t: Target, key: str) -> bool:
    """Whether mutant ``key`` only changes the letter case of an SQL statement (its lines against the
    original's, read from mutmut's mutated copy of the module)."""
    old, new = mutant_diff(t, key)
    return (len(old) == len(new) >= 1 and all(a != b and a.lower() == b.lower() for a, b in zip(old, new))
            and any(w in a.upper() for a in old for w in SQL_WORDS))


_SOURCES: dict[str, dict[str, str]] = {}


def mutant_diff(t: Target, key: str) -> tuple[list[str], list[str]]:
    """The lines mutant ``key`` removes and adds (what ``mutmut show`` prints, without a process per mutant)."""
    import ast
    import difflib

    path = SCRATCH / t.name / "mutants" / t.path
    if str(path) not in _SOURCES:
        src = path.read_text() if path.is_file() else ""
        lines = src.splitlines()
        _SOURCES[str(path)] = {n.name: "\n".join(lines[n.lineno - 1:n.end_lineno]) for n in ast.walk(ast.parse(src))
                               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    funcs = _SOURCES[str(path)]
    name = key.rsplit(".", 1)[1]
    orig, mutant = funcs.get(name.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", ""), funcs.get(name, "")
    diff = list(difflib.unified_diff(orig.splitlines()[1:], mutant.splitlines()[1:], lineterm="", n=0))
    return ([ln[1:] for ln in diff if ln.startswith("-") and not ln.startswith("---")],
            [ln[1:] for ln in diff if ln.startswith("+") and not ln.startswith("+++")])


def report(rows: list[dict[str, object]], equivalent: dict[str, str]) -> str:
    lines = [f"Mutation score per target (`python tools/mutation.py`, mutmut {mutmut_version()}, {date.today()}):",
             "", "| target | module (functions) | mutants | killed | equivalent | not killed | not checked | score |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    tot_k = tot_s = 0
    for r in rows:
        fn = "" if r["functions"] == "all" else " (" + ", ".join(str(f) for f in r["functions"]) + ")"
        score = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}%"
        lines.append(f"| {r['target']} | `{r['module']}`{fn} | {r['mutants']} | {r['killed']} | "
                     f"{len(r['equivalent'])} | {len(r['survivors'])} | {r['unchecked']} | {score} |")
        tot_k += int(r["killed"])
        tot_s += int(r["scored"])
    lines.append(f"| **all** | | | {tot_k} | | {tot_s - tot_k} | | "
                 f"**{100 * tot_k / max(tot_s, 1):.1f}%** |")
    lines += ["", "Not killed (each needs a test, or a reason in `tools/mutation_equivalent.yaml`):", ""]
    for r in rows:
        for key in r["survivors"]:
            lines.append(f"- `{key}`")
    if not any(r["survivors"] for r in rows):
        lines.append("- none")
    lines += ["", "Equivalent (cannot change behaviour; reasons from `tools/mutation_equivalent.yaml`):", ""]
    for r in rows:
        for key in r["equivalent"]:
            lines.append(f"- `{key}`: {equivalent[key]}")
    return "\n".join(lines) + "\n"


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated target names (default: all)")
    ap.add_argument("--budget-min", type=float, default=120.0, help="stop all runs after this many minutes")
    ap.add_argument("--max-children", type=int, default=1, help="mutmut worker processes")
    ap.add_argument("--report-only", action="store_true", help="only collect the results already there")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {t.name for t in TARGETS})
    if unknown:
        ap.error(f"unknown target(s) {unknown}; choose from {[t.name for t in TARGETS]}")
    targets = [t for t in TARGETS if not names or t.name in names]
    equivalent = yaml.safe_load(EQUIVALENT.read_text()) or {}
    deadline = time.time() + 60 * args.budget_min
    if not args.report_only:
        for t in targets:
            if time.time() < deadline:
                run(t, args.max_children, deadline)
    rows = [collect(t, equivalent) for t in TARGETS if (SCRATCH / t.name / "mutants").is_dir()]
    text = report(rows, equivalent)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.md").write_text(text)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    testing = ROOT / "TESTING.md"
    if testing.is_file() and MARK_START in testing.read_text():
        head, rest = testing.read_text().split(MARK_START, 1)
        testing.write_text(head + MARK_START + "\n" + text + MARK_END + rest.split(MARK_END, 1)[1])
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
