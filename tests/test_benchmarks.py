"""Benchmarks across families (runner/registry/benchmarks.py): the gate records each decided
version's benchmark; the leaderboard (`forge benchmarks`, /benchmarks in `forge serve`) is
read from what the gates recorded; `benchmark_best` (conf/gate/benchmark.yaml) makes a
candidate beat the best version of any family on its benchmark.

The gates run for real (real CBMC held-out cells rebuilt on the host, the real sandbox) with
a stand-in eval job that judges each model by its stand-in weights; the CLI and the pages
read decisions written by `promotion.record_decision`, in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    GATE_HELD_OUT,
    register_by_hand,
    serving,
    stand_in_candidate,
    stand_in_gate_repo,
)

from runner.api import evaluate_candidate
from runner.errors import ForgeError
from runner.registry import benchmarks, catalog, ledger, promotion

LINEAR_BASE = "model-linear-base"

# A stand-in eval job: a model whose weights read "<family> <fraction>" is a classifier of that
# family, which gets that fraction of the held-out cells right (the first ones); it predicts
# only when the manifest names the same family for it (each model by its own family).
JUDGED_BY_WEIGHTS = GATE_HELD_OUT + """
    pred = {}
    for name, folder in m["models"].items():
        f = pathlib.Path(folder) / "best_model.pt"
        words = f.read_bytes().decode(errors="replace").split() if f.is_file() else []
        if len(words) != 2 or words[0] != m["families"].get(name):
            continue  # not a classifier (a pretrained base), or evaluated by another family
        right = int(round(float(words[1]) * len(true)))
        pred[name] = [t if i < right else (t + 1) % k for i, t in enumerate(true)]
    write_predictions(out, cells, pred, data.label_names)
    json.dump({"status": "ok", "reason": "ok"}, open(out / "result.json", "w"))
"""


def _candidate(parent: str, artifact_id: str, family: str, right: float) -> str:
    return stand_in_candidate(parent, artifact_id, family=family,
                              weights_file=f"{family} {right}".encode())


def _linear_base(tmp_path: Path) -> str:
    """A second lineage: a linear base registered by hand (not a classifier)."""
    folder = tmp_path / "linear-base"
    folder.mkdir()
    (folder / "model.json").write_text("{}")
    register_by_hand(LINEAR_BASE, folder, family="linear", title="linear base")
    return LINEAR_BASE


def _gate(candidate: str, gate: str = "default") -> dict:
    return evaluate_candidate(candidate, AGENT, gate, allow_dirty=True)


def _two_gated(tmp_path: Path, monkeypatch) -> tuple[str, str]:
    """scGPT's A (80% of the cells right) and linear's B (95%), in two lineages, each gated
    by the default gate."""
    monkeypatch.setenv("FORGE_CODE_REPO",
                       str(stand_in_gate_repo(tmp_path / "gate-code", JUDGED_BY_WEIGHTS)))
    a = _candidate(BASE_ID, "model-bench-scgpt-a", "scgpt", 0.80)
    b = _candidate(_linear_base(tmp_path), "model-bench-linear-b", "linear", 0.95)
    _gate(a)
    _gate(b)
    return a, b


def _evaluations(candidate: str) -> list[dict]:
    return promotion.recorded(candidate)


@pytest.mark.sandbox
def test_gates_record_the_benchmark_and_the_leaderboard_ranks_every_family(
        registry, tmp_path, monkeypatch):
    a, b = _two_gated(tmp_path, monkeypatch)
    split = catalog.get_artifact(a)["metadata"]["split"]["sha256"]["test"]
    bench = f"bench-{DATASET_ID}-finetune_celltype-test_macro_f1-{split[:12]}"
    assert benchmarks.benchmark_id(DATASET_ID, "finetune_celltype", "test_macro_f1",
                                   split) == bench
    for version in (a, b):  # recorded with the decision
        assert catalog.get_model_version(version)["version"]["benchmark_id"] == bench

    board = benchmarks.leaderboard(bench)
    assert (board["dataset"], board["task"], board["metric"], board["split_sha256"]) == \
        (DATASET_ID, "finetune_celltype", "test_macro_f1", split)
    versions = [e for e in board["entries"] if e["kind"] == "version"]
    assert [(e["id"], e["family"]) for e in versions] == [(b, "linear"), (a, "scgpt")]
    assert board["best"]["id"] == b
    # the values are what each gate measured of its candidate, and of the baseline
    (row_a,), (row_b,) = _evaluations(a), _evaluations(b)
    assert versions[0]["value"] == row_b["candidate_value"]
    assert versions[1]["value"] == row_a["candidate_value"] < row_b["candidate_value"]
    (base,) = [e for e in board["entries"] if e["kind"] == "baseline"]
    assert base["value"] == row_b["baseline_value"] == row_a["baseline_value"]
    assert row_a["comparator_role"] == "baseline"  # no comparator of A could classify
    values = [e["value"] for e in board["entries"]]
    assert values == sorted(values, reverse=True)
    # A and B never met in a gate: no CI between them; B met the baseline only
    assert versions[1]["vs_best"] is None
    assert base["vs_best"] == {"delta": -row_b["delta"], "ci_low": -row_b["ci_high"],
                               "ci_high": -row_b["ci_low"], "confidence": 0.95}
    (listed,) = benchmarks.list_benchmarks()
    assert (listed["id"], listed["versions"], listed["best"]["id"]) == (bench, 2, b)

    with pytest.raises(ForgeError) as unknown:
        benchmarks.leaderboard("bench-nothing")
    assert unknown.value.reason == "not_found"


@pytest.mark.sandbox
def test_benchmark_best_is_the_best_of_any_family_and_the_gate_compares_against_it(
        sqlite_registry, tmp_path, monkeypatch):
    """C (scGPT, child of A) under conf/gate/benchmark.yaml: its parent A, and B (linear, the
    benchmark's best, another lineage) evaluated in the sandbox by its own family."""
    a, b = _two_gated(tmp_path, monkeypatch)
    c = _candidate(a, "model-bench-scgpt-c", "scgpt", 0.99)
    dry = evaluate_candidate(c, AGENT, "benchmark", dry_run=True, allow_dirty=True)
    assert dry["comparators"]["benchmark_best"] == b
    assert evaluate_candidate(c, AGENT, "default", dry_run=True,
                              allow_dirty=True)["comparators"].get("benchmark_best") is None

    result = _gate(c, "benchmark")
    got = {x["comparator_role"]: x["comparator_artifact_id"] for x in result["comparisons"]}
    assert got["parent"] == a and got["benchmark_best"] == b, result
    assert result["decision"] == "promoted", result["notes"]
    vs_b = next(x for x in result["comparisons"] if x["comparator_role"] == "benchmark_best")
    assert vs_b["delta"] > 0 and vs_b["ci_low"] > 0
    assert catalog.get_artifact(b)["lifecycle_state"] != "superseded"  # another lineage

    board = benchmarks.leaderboard(catalog.get_model_version(c)["version"]["benchmark_id"])
    versions = [e for e in board["entries"] if e["kind"] == "version"]
    assert [e["id"] for e in versions] == [c, b, a]
    assert versions[1]["vs_best"]["delta"] == -vs_b["delta"]  # from C's gate, turned round
    assert versions[1]["vs_best"]["ci_high"] == -vs_b["ci_low"] < 0


def test_benchmark_best_needs_a_recorded_benchmark(sqlite_registry, tmp_path, monkeypatch):
    """The first version on a benchmark has no best to meet: the gate runs without one."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(REPO))
    a = _candidate(BASE_ID, "model-bench-first", "scgpt", 0.8)
    dry = evaluate_candidate(a, AGENT, "benchmark", dry_run=True, allow_dirty=True)
    assert dry["comparators"] == {"parent": BASE_ID}


def test_benchmark_ids_are_readable_deterministic_and_valid():
    digest = "0123456789ab" + "c" * 52
    assert benchmarks.benchmark_id("dataset-x", "finetune_celltype", "test_accuracy",
                                   digest) == \
        "bench-dataset-x-finetune_celltype-test_accuracy-0123456789ab"
    long_a, long_b = "d" * 120 + "a", "d" * 120 + "b"
    ids = {benchmarks.benchmark_id(d, "finetune_celltype", "test_macro_f1", digest)
           for d in (long_a, long_b)}
    assert len(ids) == 2 and all(len(i) <= 128 for i in ids)
    for bad in ("a" * 63, "A" * 64, None):
        with pytest.raises(ForgeError):
            benchmarks.benchmark_id("dataset-x", "finetune_celltype", "test_accuracy", bad)


# --- the leaderboard as the CLI and the pages show it: decisions written directly -------------

REPO = Path(__file__).resolve().parents[1]
SPLIT = {"seed": 0, "counts": {"test": 100}, "sha256": {"test": "f" * 64}}
BENCH = f"bench-{DATASET_ID}-finetune_celltype-test_macro_f1-{'f' * 12}"
EVIL = "<img src=x onerror=alert(1)>"


def _decide(candidate: str, value: float, decision: str, comparisons: list[tuple]) -> None:
    alloc = ledger.reserve(AGENT, "0.01", f"gate-{candidate}", wall_time_cap_min=1,
                           vram_cap_gb=1, price_per_hour="0.5", purpose="evaluation")
    root = promotion.lineage_root(catalog.get_model_version(candidate))
    champion = promotion.champion(root)
    promotion.record_decision(
        candidate_id=candidate, champion_id=champion["id"] if champion else None,
        decision=decision, notes=f"{decision} by gate", gate_name="default", gate_config={},
        gate_sha256="0" * 64, agent_id=AGENT, allocation_id=alloc["id"], actual_seconds=1.0,
        magnitude=None, detection={}, benchmark_id=BENCH,
        rows=[dict(comparator_artifact_id=other, comparator_role=role, metric="test_macro_f1",
                   candidate_value=value, comparator_value=theirs, delta=value - theirs,
                   ci_low=value - theirs - 0.01, ci_high=value - theirs + 0.01,
                   confidence=0.95, n_resamples=1000, n_cells=100, seed=0, reasons=None,
                   baseline_value=0.85) for role, other, theirs in comparisons])


@pytest.fixture
def board(db_url, tmp_path):
    """On BENCH: scGPT's v2 (0.70, rejected against the baseline 0.85), linear's v2 (0.90,
    promoted against the baseline), scGPT's v3 (0.92, child of scGPT's v2, met linear's)."""
    from runner.jobs.datasets import builtin_citation

    catalog.register_dataset(DATASET_ID, "CBMC CITE-seq", builtin_citation("cbmc"))
    ledger.grant(AGENT, "10")
    register_by_hand(BASE_ID, _folder(tmp_path / "s"), family="scgpt")
    register_by_hand(LINEAR_BASE, _folder(tmp_path / "l"), family="linear")
    s2 = stand_in_candidate(BASE_ID, "model-s2", SPLIT, family="scgpt")
    l2 = stand_in_candidate(LINEAR_BASE, "model-l2", SPLIT, family="linear")
    s3 = stand_in_candidate(s2, "model-s3", SPLIT, family="scgpt")
    _decide(s2, 0.70, "rejected", [("baseline", None, 0.85)])
    _decide(l2, 0.90, "promoted", [("baseline", None, 0.85)])
    _decide(s3, 0.92, "promoted", [("parent", s2, 0.70), ("benchmark_best", l2, 0.90)])
    return {"s2": s2, "l2": l2, "s3": s3}


def _folder(path: Path) -> Path:
    path.mkdir()
    (path / "weights.bin").write_bytes(b"w")
    return path


def _forge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))


def test_forge_benchmarks_show_and_list_print_plain_lines(board):
    shown = _forge("benchmarks", "show", BENCH)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == f"benchmark {BENCH}"
    assert lines[1] == (f"dataset {DATASET_ID}, task finetune_celltype, metric test_macro_f1, "
                        f"held-out split sha256 {'f' * 64}")
    table = [line.split() for line in lines[2:]]
    assert table[0] == ["rank", "family", "version", "number", "test_macro_f1", "vs", "best",
                        "state"]
    # best first, one line each (never wrapped in a pipe), the baseline placed by its value
    assert table[1] == ["1", "scgpt", board["s3"], "v3", "0.9200", "best", "active"]
    assert table[2] == ["2", "linear", board["l2"], "v2", "0.9000", "-0.0200", "95%", "CI",
                        "[-0.0300,", "-0.0100]", "active"]
    assert table[3] == ["-", "baseline", "logistic-regression", "baseline", "-", "0.8500",
                        "not", "compared", "-"]  # no gate of s3 met the baseline
    assert table[4] == ["3", "scgpt", board["s2"], "v2", "0.7000", "-0.2200", "95%", "CI",
                        "[-0.2300,", "-0.2100]", "rejected"]  # s3 met its parent
    assert lines[7] == f"next: forge models show {board['s3']}"  # the best version
    assert len(lines) == 8

    listed = _forge("benchmarks", "list")
    assert listed.returncode == 0, listed.stderr
    header, row, next_line = listed.stdout.splitlines()
    assert next_line == f"next: forge benchmarks show {BENCH}"
    assert header.split() == ["benchmark", "dataset", "task", "metric", "versions", "best"]
    assert row.split() == [BENCH, DATASET_ID, "finetune_celltype", "test_macro_f1", "3",
                           board["s3"], "(0.9200)"]

    missing = _forge("benchmarks", "show", "bench-nothing")
    assert missing.returncode == 2 and "NotFound" in missing.stderr


def test_the_benchmark_pages_and_the_version_link(board):
    import urllib.error
    import urllib.request

    from runner.web.app import create_app

    def get(url: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with serving(create_app()) as web:
        status, html = get(f"{web}/benchmarks/{BENCH}")
        assert status == 200, html
        rows = html.split('<tr class="')[1:]
        assert [r.split('"')[0] for r in rows] == ["entry", "entry", "baseline", "entry"]
        assert f'href="/artifacts/{board["s3"]}"' in rows[0] and ">best<" in rows[0]
        assert "-0.0200" in rows[1] and "[-0.0300, -0.0100]" in rows[1]
        assert "logistic-regression baseline" in rows[2] and "0.8500" in rows[2]

        status, html = get(f"{web}/benchmarks")
        assert status == 200 and f'href="/benchmarks/{BENCH}"' in html

        status, html = get(f"{web}/artifacts/{board['l2']}")
        assert status == 200 and f'<a class="benchmark" href="/benchmarks/{BENCH}">' in html

        status, html = get(f"{web}/benchmarks/bench-nothing")
        assert status == 404 and "no version was gated on benchmark" in html
        status, html = get(f"{web}/benchmarks/{urllib.request.quote(EVIL, safe='')}")
        assert status == 404 and EVIL not in html and "&lt;img src=x" in html, html

