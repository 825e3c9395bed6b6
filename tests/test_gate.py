"""The eval gate end to end: real CBMC cells, real sandbox, real registry and MLflow.

One lineage is trained for real (tiny base -> v2 -> v3 ...) and each version is gated:
the first fine-tune of a base that cannot classify is judged against the logistic-regression
baseline and rejected; a longer fine-tune of it beats it and is promoted; a version whose
weights equal its parent's, and a deliberately wrecked one, are rejected. The refusals and
the concurrency test use stand-in eval jobs (committed to a scratch repository) so that each
runs in the real sandbox in about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    GATE_HELD_OUT,
    assert_on_server,
    cbmc_split,
    count_rows,
    operator_conf,
    stand_in_candidate,
    stand_in_gate_repo,
)

from runner.api import evaluate_candidate, train_model_version
from runner.errors import EvaluationFailed, ForgeError, GateRefused
from runner.registry import catalog, db, ledger, recovery, schema

SHORT = ["training.batch_size=32", "training.max_seq_len=33", "training.log_every_n_steps=5",
         "training.early_stopping_patience=0"]


def _train(parent: str, *extra: str) -> dict:
    return train_model_version(parent, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                               vram_cap_gb=1, overrides=[*SHORT, *extra], allow_dirty=True)


def _gate(candidate: str, **kw) -> dict:
    return evaluate_candidate(candidate, AGENT, allow_dirty=True, **kw)


def _rows(table: sa.Table, **where) -> list[dict]:
    with db.transaction() as conn:
        query = sa.select(table)
        for key, value in where.items():
            query = query.where(table.c[key] == value)
        return [dict(r) for r in conn.execute(query).mappings()]


def _mlflow():
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking

    return tracking.client(to_plain(compose_config())["tracking"]["tracking_uri"])


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_a_lineage_is_gated_on_evidence(sqlite_registry, tracking_store, committed_code, tmp_path,
                                        monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    client = _mlflow()
    if tracking_store.server:
        assert client.tracking_uri == tracking_store.server.url

    # v2: a few steps from a base with no cell-type head. Nothing in the lineage classifies,
    # so the baseline refitted on the same split is the comparator, and it wins.
    v2 = _train(BASE_ID, "training.max_epochs=1", "training.limit_train_batches=4")
    dry = _gate(v2["artifact_id"], dry_run=True)
    assert dry["would_launch"] and dry["comparators"] == {"parent": BASE_ID}
    assert dry["rules"]["n_resamples"] == 1000 and not _rows(schema.evaluations)
    rejected = _gate(v2["artifact_id"])
    assert rejected["decision"] == "rejected" and rejected["lifecycle_state"] == "rejected"
    (vs_baseline,) = rejected["comparisons"]
    assert vs_baseline["comparator_role"] == "baseline" and vs_baseline["delta"] < 0
    assert vs_baseline["n_cells"] == 862 and vs_baseline["n_resamples"] == 1000
    assert vs_baseline["ci_low"] <= vs_baseline["delta"] <= vs_baseline["ci_high"]
    # The eval job predicted the candidate's own held-out cells as its training run did: one
    # metric, one number.
    assert vs_baseline["candidate_value"] == pytest.approx(
        v2["eval_metrics"]["test_macro_f1"], abs=1e-6)
    alloc = ledger.get_allocation(rejected["allocation_id"])
    assert alloc["purpose"] == "evaluation" and alloc["status"] == "settled"
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert catalog.get_artifact(BASE_ID)["is_latest"] is True  # nothing moved

    # v3: longer from v2. v2 can classify now, so it is the comparator; v3 beats it. v2 is
    # rejected: the operator lets rejected versions be fine-tuned here (policy.parent_states).
    operator_conf(tmp_path, monkeypatch, tracking_store.operator_yaml +
                  "policy:\n  parent_states: [active, candidate, rejected]\n")
    v3 = _train(v2["artifact_id"], "training.max_epochs=3")
    promoted = _gate(v3["artifact_id"])
    assert promoted["decision"] == "promoted", promoted["notes"]
    (vs_parent,) = promoted["comparisons"]
    assert vs_parent["comparator_role"] == "parent"
    assert vs_parent["comparator_artifact_id"] == v2["artifact_id"]
    assert vs_parent["delta"] > 0 and vs_parent["ci_low"] > 0
    art = catalog.get_model_version(v3["artifact_id"])
    assert art["is_latest"] is True and art["lifecycle_state"] == "active"
    assert art["version"]["promotion_state"] == "promoted"
    base = catalog.get_model_version(BASE_ID)  # the old champion
    assert base["is_latest"] is False and base["lifecycle_state"] == "superseded"
    assert base["superseded_by"] == v3["artifact_id"]
    history = _rows(schema.artifact_lifecycle_history, artifact_id=v3["artifact_id"])
    assert [(h["old_state"], h["new_state"]) for h in history] == [("candidate", "active")]
    events = [e["type"] for e in _rows(schema.events)]
    assert events.count("model_version_promoted") == 1
    assert events.count("model_version_rejected") == 1
    wmi = _rows(schema.world_model_improvements, target_artifact_id=v3["artifact_id"])
    assert {w["event_type"] for w in wmi} == {"model_version_trained", "model_version_promoted"}
    promoted_row = next(w for w in wmi if w["event_type"] == "model_version_promoted")
    assert promoted_row["magnitude"] == pytest.approx(vs_parent["delta"])
    assert promoted_row["detection_metadata"]["bucket"] in ("low", "medium", "high", "very_high")

    # MLflow: the alias, the tags, the report on the candidate's run.
    name, version = promoted["mlflow"]["model_uri"].removeprefix("models:/").rsplit("/", 1)
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    tags = client.get_model_version(name, version).tags
    assert tags["forge.lifecycle_state"] == "active" and tags["forge.gate_decision"] == "promoted"
    files = {f.path for f in client.list_artifacts(promoted["mlflow"]["run_id"], "gate/default")}
    assert files == {"gate/default/report.json", "gate/default/bootstrap.png",
                     "gate/default/per_class_f1.png"}
    if tracking_store.server:  # the report went up through the server, into its artifacts
        assert_on_server(tracking_store, client, promoted["mlflow"]["run_id"], files=tuple(files))
    assert promoted["warnings"] == []

    # The champion alias loads the promoted version as a model that predicts cell types and
    # reproduces the test accuracy it was registered with (a model that predicts several
    # classes, unlike the one-class tiny fine-tunes).
    import mlflow
    import numpy as np
    import pandas as pd

    from runner.jobs.datasets import fetch
    from trainers.data.load import load, split_cells

    data = load(fetch("cbmc"), "cbmc_mat")
    split = split_cells(data.n_cells, data.labels, 0.1, 0.1, 0)
    cells = pd.DataFrame(data.rows(split.test).astype("float32"), columns=data.genes)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    predicted = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(cells)["cell_type"]
    truth = np.asarray(data.label_names)[data.labels[split.test]]
    assert predicted.nunique() > 1, predicted.value_counts()
    assert float(np.mean(predicted.to_numpy() == truth)) == pytest.approx(
        v3["eval_metrics"]["test_accuracy"], abs=0.005)

    if tracking_store.server:
        # What the server adds is checked: every run, report, tag, alias and the champion's
        # load went through it. The rest (a recorded decision, v4 and v5) is the gate's own
        # logic, the same whatever the store: the local twin checks it (2 jobs and 2 gates).
        name, version = v2["mlflow"]["registered_model"], v2["mlflow"]["version"]
        assert client.get_model_version(name, version).tags["forge.gate_decision"] == "rejected"
        return

    # The same gate again: the recorded decision, nothing debited, nothing written but the
    # tool call. Under other rules: refused.
    before = count_rows(sqlite_registry)
    again = _gate(v3["artifact_id"])
    assert again["recorded"] and again["decision"] == "promoted"
    assert again["comparisons"] == promoted["comparisons"]
    after = count_rows(sqlite_registry)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"tool_calls": 1}
    conf = operator_conf(tmp_path, monkeypatch, tracking_store.operator_yaml)
    (conf / "gate" / "strict.yaml").write_text("min_delta: 0.05\n")
    with pytest.raises(GateRefused) as refused:
        _gate(v3["artifact_id"], gate="strict")
    assert refused.value.reason == "already_gated"

    # v4: weights equal to its parent's for every prediction (lr 1e-12): delta 0, CI [0, 0].
    v4 = _train(v3["artifact_id"], "training.max_epochs=1", "training.limit_train_batches=1",
                "training.lr=1e-12", "training.warmup_steps=0")
    same = _gate(v4["artifact_id"])
    assert same["decision"] == "rejected"
    (vs_v3,) = same["comparisons"]
    assert vs_v3["comparator_artifact_id"] == v3["artifact_id"]
    assert vs_v3["delta"] == 0 and vs_v3["ci_low"] == 0 == vs_v3["ci_high"]
    assert "contains 0" in same["notes"]

    # v5: wrecked on purpose (a huge learning rate): worse than the champion, rejected.
    v5 = _train(v3["artifact_id"], "training.max_epochs=1", "training.limit_train_batches=20",
                "training.lr=0.5", "training.warmup_steps=0", "training.grad_clip=null")
    worse = _gate(v5["artifact_id"])
    assert worse["decision"] == "rejected" and worse["comparisons"][0]["delta"] < 0, worse
    assert worse["comparisons"][0]["ci_high"] < 0
    assert catalog.get_artifact(v3["artifact_id"])["is_latest"] is True
    assert recovery.check() == []
    # Every version and its gate decision in the one store the operator chose.
    assert _mlflow().tracking_uri == client.tracking_uri
    for trained, gated in ((v2, rejected), (v4, same), (v5, worse)):
        name, version = trained["mlflow"]["registered_model"], trained["mlflow"]["version"]
        tags = client.get_model_version(name, version).tags
        assert tags["forge.gate_decision"] == gated["decision"] == "rejected"
    assert str(client.get_model_version_by_alias(name, "champion").version) == \
        v3["mlflow"]["version"]


def test_the_base_and_unknown_ids_are_refused_before_any_debit(sqlite_registry):
    with pytest.raises(GateRefused) as base:
        _gate(BASE_ID)
    assert base.value.reason == "not_a_candidate"
    with pytest.raises(ForgeError) as missing:
        _gate("model-nobody")
    assert missing.value.reason == "not_found"
    with pytest.raises(ForgeError) as bad_gate:
        _gate(BASE_ID, gate="../../etc/passwd")
    assert bad_gate.value.field == "gate"
    assert all(a["purpose"] == "training" for a in _rows(schema.resource_allocations))


# --- stand-in eval jobs: the refusals and the races, in seconds ---------------------------------

REPO = Path(__file__).resolve().parents[1]


def _stand_in_repo(tmp_path: Path, body: str, entrypoint: str | None = None) -> Path:
    return stand_in_gate_repo(tmp_path / "gate-code", body, entrypoint)


# A stand-in job's start: the real held-out cells of its manifest and their labels.
HELD_OUT = GATE_HELD_OUT

# Predicts every held-out cell right with the candidate and wrong with everything else.
PERFECT_CANDIDATE = HELD_OUT + """
    pred = {name: (true if name == "candidate" else [(t + 1) % k for t in true])
            for name in m["models"]}
    write_predictions(out, cells, pred, data.label_names)
    json.dump({"status": "ok", "reason": "ok"}, open(out / "result.json", "w"))
"""


@pytest.mark.sandbox
def test_missing_predictions_fail_typed_and_settled(sqlite_registry, tmp_path, monkeypatch):
    repo = _stand_in_repo(tmp_path, "import json, sys; m = json.load(open(sys.argv[1])); "
                          "json.dump({'status': 'ok'}, open(m['output_dir'] + '/result.json', "
                          "'w'))")
    monkeypatch.setenv("FORGE_CODE_REPO", str(repo))
    cand = stand_in_candidate(BASE_ID, "model-standin-nopred")
    with pytest.raises(EvaluationFailed) as failed:
        _gate(cand)
    assert failed.value.reason == "missing_predictions"
    (alloc,) = [a for a in _rows(schema.resource_allocations) if a["purpose"] == "evaluation"]
    assert alloc["status"] == "failed" and alloc["debited"] == alloc["actual_cost"] + \
        alloc["refunded"]
    assert catalog.get_model_version(cand)["version"]["promotion_state"] == "candidate"
    assert not _rows(schema.evaluations) and recovery.check() == []


def test_a_split_that_does_not_rebuild_is_refused(sqlite_registry, tmp_path, monkeypatch):
    """A candidate whose recorded test digest is not what its seed and fractions rebuild on
    the host: refused as split_mismatch before any debit."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(REPO))
    split = cbmc_split()
    split["sha256"]["test"] = "a" * 64
    cand = stand_in_candidate(BASE_ID, "model-standin-split", split)
    with pytest.raises(GateRefused) as refused:
        _gate(cand)
    assert refused.value.reason == "split_mismatch", refused.value
    assert not [a for a in _rows(schema.resource_allocations) if a["purpose"] == "evaluation"]
    assert catalog.get_model_version(cand)["version"]["promotion_state"] == "candidate"


@pytest.mark.sandbox
def test_concurrent_promotions_never_make_two_latest(registry, tmp_path, monkeypatch):
    """Two candidates of one parent that both beat it, gated at once: one is promoted, the
    other is refused (champion_changed, settled) and, gated again, is judged against the new
    champion."""
    # two jobs at once: their memory caps must fit this host's (policy.max_host_memory_gb)
    operator_conf(tmp_path, monkeypatch, "sandbox:\n  max_memory_gb: 2\n")
    monkeypatch.setenv("FORGE_CODE_REPO", str(_stand_in_repo(tmp_path, PERFECT_CANDIDATE)))
    ids = [stand_in_candidate(BASE_ID, f"model-standin-{i}") for i in range(2)]
    outcomes: dict[str, object] = {}
    start = threading.Barrier(2)

    def gate(cand: str) -> None:
        start.wait()
        try:
            outcomes[cand] = _gate(cand)
        except ForgeError as exc:
            outcomes[cand] = exc

    threads = [threading.Thread(target=gate, args=(c,)) for c in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [c for c in ids if isinstance(outcomes[c], dict)]
    lost = [c for c in ids if isinstance(outcomes[c], GateRefused)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert outcomes[won[0]]["decision"] == "promoted"
    assert outcomes[lost[0]].reason == "champion_changed"
    latest = [a["id"] for a in _rows(schema.artifacts) if a["is_latest"] and
              a["artifact_type"] == "model"]
    assert latest == won
    assert catalog.get_model_version(lost[0])["version"]["promotion_state"] == "candidate"

    again = _gate(lost[0])  # now judged against the winner, the new champion
    assert {c["comparator_role"]: c["comparator_artifact_id"] for c in again["comparisons"]} \
        == {"parent": BASE_ID, "champion": won[0]}
    latest = [a["id"] for a in _rows(schema.artifacts) if a["is_latest"] and
              a["artifact_type"] == "model"]
    assert len(latest) == 1
    assert recovery.check() == []


def test_gate_rules_come_from_conf_only(sqlite_registry, tmp_path, monkeypatch):
    """A caller names a gate; it never edits one. A broken gate file is a typed error."""
    from runner.config.gate import load_gate

    conf = operator_conf(tmp_path, monkeypatch, "")
    (conf / "gate" / "broken.yaml").write_text("confidence: 1.5\n")
    (conf / "gate" / "typo.yaml").write_text("n_resampels: 10\n")
    assert load_gate("default").n_resamples == 1000
    for name, field in (("broken", "gate.confidence"), ("typo", "gate")):
        with pytest.raises(ForgeError) as bad:
            load_gate(name)
        assert bad.value.field == field
    for name in ("default.yaml", "../gate/default", "", None):
        with pytest.raises(ForgeError):
            load_gate(name)
    shutil.rmtree(conf / "gate")
    with pytest.raises(ForgeError):
        load_gate("default")


# A stand-in trainer: the real held-out cells predicted right, a checkpoint, its claims.
STAND_IN_WITH_SPLIT = HELD_OUT + """
    write_predictions(out, cells, {"candidate": true}, data.label_names)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "best_model.pt").write_bytes(json.dumps(m["training"]).encode())
    json.dump({"status": "ok", "metrics": {"test_macro_f1": 1.0, "test_accuracy": 1.0},
               "checkpoint": {"dir": "checkpoint"}, "split": split.summary()},
              open(out / "result.json", "w"))
"""


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


@pytest.mark.sandbox
@pytest.mark.train
def test_forge_train_chains_the_gate_and_forge_gate_reads_it(sqlite_registry, tmp_path):
    """`forge-train ... gate=default` trains, then gates the new version and prints both;
    `forge gate ID` afterwards prints the recorded decision. An unknown gate fails before
    the training's debit. Its stdout is the JSON alone: a library's log line goes to stderr
    (matplotlib's, as it builds its font cache on a new machine, once landed in stdout)."""
    repo = _stand_in_repo(tmp_path, PERFECT_CANDIDATE, entrypoint=STAND_IN_WITH_SPLIT)
    env = {"FORGE_CODE_REPO": str(repo), "MPLCONFIGDIR": str(tmp_path / "new-matplotlib")}
    train = ["-c", "from runner.train_app import main; main()", f"parent_artifact_id={BASE_ID}",
             f"agent_id={AGENT}", "allow_dirty=true", "wall_time_cap_min=5", "vram_cap_gb=1"]

    before = count_rows(sqlite_registry)
    unknown = _cli(*train, "gate=nope", env=env)
    assert unknown.returncode == 2 and "gate 'nope'" in unknown.stderr, unknown.stderr[-2000:]
    after = count_rows(sqlite_registry)
    assert {k for k in after if after[k] != before[k]} <= {"tool_calls"}  # nothing debited

    chained = _cli(*train, "gate=default", env=env)
    assert chained.returncode == 0, chained.stderr[-3000:]
    result = json.loads(chained.stdout)
    assert result["lifecycle_state"] == "candidate"  # what training returned
    assert result["gate"]["decision"] == "promoted"
    assert result["gate"]["candidate_artifact_id"] == result["artifact_id"]
    assert catalog.get_artifact(result["artifact_id"])["is_latest"] is True

    shown = _cli("-m", "runner.cli", "gate", result["artifact_id"], "--agent", AGENT,
                 "--allow-dirty", env=env)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"{result['artifact_id']}: PROMOTED by gate 'default' (recorded earlier)" in shown.stdout
    assert "95% CI [" in shown.stdout
    refused = _cli("-m", "runner.cli", "gate", BASE_ID, "--agent", AGENT, env=env)
    assert refused.returncode == 2 and "GateRefused" in refused.stderr


# The candidate predicts like the comparators except on `WORSE` cells, where it is wrong.
def _tied_candidate(worse: int) -> str:
    return HELD_OUT + f"""
    other = [t if i % 4 else (t + 1) % k for i, t in enumerate(true)]
    mine = [(t + 1) % k if i < {worse} else o for i, (t, o) in enumerate(zip(true, other))]
    pred = {{name: other for name in m["models"]}}
    pred["candidate"] = mine
    write_predictions(out, cells, pred, data.label_names)
    json.dump({{"status": "ok", "reason": "ok"}}, open(out / "result.json", "w"))
"""


@pytest.mark.parametrize("allow, worse, justification, decision", [
    (False, 0, "faster at inference", "rejected"),  # the gate takes no justification
    (True, 0, None, "rejected"),  # a tie, and nothing said
    (True, 0, "faster at inference", "promoted"),  # a tie, justified
    (True, 80, "faster at inference", "rejected"),  # a guard broken: no justification helps
])
@pytest.mark.sandbox
def test_a_tradeoff_is_promoted_only_where_the_gate_allows_it(
        sqlite_registry, tmp_path, monkeypatch, allow, worse, justification, decision):
    monkeypatch.setenv("FORGE_CODE_REPO", str(_stand_in_repo(tmp_path, _tied_candidate(worse))))
    conf = operator_conf(tmp_path, monkeypatch, "")
    (conf / "gate" / "lenient.yaml").write_text(f"allow_tradeoff: {str(allow).lower()}\n")
    cand = stand_in_candidate(BASE_ID, "model-standin-tradeoff")
    result = _gate(cand, gate="lenient", justification=justification)
    assert result["decision"] == decision, result["notes"]
    if decision == "promoted":
        assert "tradeoff justification: faster at inference" in result["notes"]
    if worse:
        assert "guard test_accuracy drops" in result["notes"]
    if justification and not allow:
        assert "this gate accepts none" in result["notes"]


def test_the_gates_dry_run_never_imports_torch_lightning_or_mlflow(sqlite_registry, tmp_path):
    """Like training's: the estimate, the comparators and the rules, nothing heavy, nothing
    written but the audit row."""
    cand = stand_in_candidate(BASE_ID, "model-standin-dry")
    code = (
        "import sys, json\n"
        "from runner.api import evaluate_candidate\n"
        f"r = evaluate_candidate({cand!r}, {AGENT!r}, dry_run=True, allow_dirty=True)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'lightning', 'pytorch_lightning', 'mlflow', 'matplotlib'))\n"
        "print(json.dumps({'would_launch': r['would_launch'], 'heavy': heavy, "
        "'estimate': r['estimate']['amount'], 'comparators': r['comparators']}, default=str))\n")
    before = count_rows(sqlite_registry)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"would_launch": True, "heavy": [], "estimate": "0.083334",
                      "comparators": {"parent": BASE_ID}}  # 10 min at 0.50/h
    after = count_rows(sqlite_registry)
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {"tool_calls": 1}
