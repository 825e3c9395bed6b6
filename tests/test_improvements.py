"""Improvements that are safe to pay out (issue 25, parts 2 and 3).

A magnitude compares like with like (the same metric, task, dataset and held-out cells, every
one of them scored) or is null with a reason; its bucket follows the gain's sign and the
metric's direction; only a promotion with a gain > 0 is left `pending` for SciDEX's payout
driver; every row names the agent, the allocation and its settled cost.

Real registry on SQLite and PostgreSQL: versions registered by the real hook with real
allocations; decisions by the real gate, its eval jobs stand-ins in the real sandbox.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import sqlalchemy as sa
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    GATE_HELD_OUT,
    operator_conf,
    stand_in_candidate,
    stand_in_gate_repo,
)

from runner.api import evaluate_candidate
from runner.jobs.hook import RunRecord, bucket, improvement, register_model_version
from runner.registry import catalog, db, ledger, schema

FINETUNE, PRETRAIN = "finetune_celltype", "pretrain_mgm"
SPLIT = {"seed": 0, "counts": {"test": 100}, "sha256": {"test": "a" * 64}}
OTHER_SPLIT = {"seed": 1, "counts": {"test": 100}, "sha256": {"test": "b" * 64}}
NO_DIGEST = {"seed": 0, "counts": {"test": 100}}  # two of these once compared (None == None)


def _trained(artifact_id: str, parent_id: str, metrics: dict, *, primary: str = "test_macro_f1",
             task: str = FINETUNE, split: dict | None = SPLIT, test_cells: int | None = 100
             ) -> dict:
    """A version as a finished job registers it (hook, a real allocation, settled with it);
    returns its allocation."""
    alloc = ledger.reserve(AGENT, "0.5", f"imp-{artifact_id}", wall_time_cap_min=60,
                           vram_cap_gb=1, price_per_hour="0.5")
    meta = {"family": "scgpt", "framework": "scgpt", "task": task, "split": split,
            "test_cells": test_cells}
    now = datetime.now(UTC)
    register_model_version(parent_id, RunRecord(
        artifact_id=artifact_id, title=artifact_id,
        metadata={k: v for k, v in meta.items() if v is not None},
        dataset_artifact_id=DATASET_ID, agent_id=AGENT, allocation_id=alloc["id"],
        actual_seconds=36.0, code_repo_url="file:///stand-in", code_commit_sha="0" * 40,
        code_entrypoint="trainers.entrypoint", training_started_at=now,
        training_completed_at=now, training_params={"training": {"lr": 1e-4}},
        eval_metrics=metrics, primary_metric=primary, content_hash="b" * 64,
        mlflow_run_id=uuid.uuid4().hex, mlflow_model_uri=None, changelog=None))
    return ledger.get_allocation(alloc["id"])


def _improvements(**where) -> list[dict]:
    table = schema.world_model_improvements
    with db.transaction() as conn:
        query = sa.select(table).where(*(table.c[k] == v for k, v in where.items()))
        return [dict(r) for r in conn.execute(query.order_by(table.c.detected_at)).mappings()]


def _of(artifact_id: str) -> dict:
    (row,) = _improvements(target_artifact_id=artifact_id)
    return row


def _pending() -> list[dict]:
    return _improvements(payout_status="pending")


# --- the rule, without a registry ----------------------------------------------------------------

def test_a_bucket_is_a_gain_never_the_size_of_a_loss():
    assert bucket(0.05) == "high" and bucket(0.875) == "very_high" and bucket(0.001) == "low"
    assert bucket(-0.875) is None and bucket(-0.001) is None  # a regression: no bucket
    assert bucket(0.0) is None and bucket(None) is None and bucket(float("nan")) is None


# --- trained versions: work, logged; never payable ------------------------------------------------

def test_training_is_logged_as_work_never_payable(registry):
    """Every trained row names the agent, the training's allocation and its settled cost; a
    trained version is not paid for, even when it gains: its improvement comes with
    promotion."""
    first = _trained("model-imp-v2", BASE_ID, {"test_macro_f1": 0.70})
    second = _trained("model-imp-v3", "model-imp-v2", {"test_macro_f1": 0.75})
    for artifact_id, alloc in (("model-imp-v2", first), ("model-imp-v3", second)):
        row = _of(artifact_id)
        assert row["event_type"] == "model_version_trained"
        assert row["agent_id"] == AGENT and row["allocation_id"] == alloc["id"]
        assert row["cost"] == alloc["actual_cost"] == Decimal("0.005")  # 36 s at 0.50/h
        assert row["payout_status"] == "ineligible"
        assert "paid when the eval gate promotes" in row["detection_metadata"]["payout_reason"]
    gained = _of("model-imp-v3")
    assert gained["magnitude"] == pytest.approx(0.05)
    assert gained["detection_metadata"]["bucket"] == "high"  # measured, not yet payable
    assert _pending() == []


def test_a_gain_follows_the_metric_direction_and_zero_is_no_gain(registry):
    """A loss that falls gains; one that rises is a regression (no bucket); an equal one is
    no improvement (no bucket). None of them is payable."""
    _trained("model-imp-pre", BASE_ID, {"test_loss": 0.9}, primary="test_loss", task=PRETRAIN)
    for artifact_id, loss in (("model-imp-lower", 0.5), ("model-imp-higher", 0.95),
                              ("model-imp-equal", 0.9)):
        _trained(artifact_id, "model-imp-pre", {"test_loss": loss}, primary="test_loss",
                 task=PRETRAIN)
    lower, higher, equal = (_of(f"model-imp-{k}") for k in ("lower", "higher", "equal"))
    assert lower["magnitude"] == pytest.approx(0.4)
    assert lower["detection_metadata"]["bucket"] == "very_high"
    assert higher["magnitude"] == pytest.approx(-0.05)
    assert higher["detection_metadata"]["bucket"] is None
    assert equal["magnitude"] == 0.0 and equal["detection_metadata"]["bucket"] is None
    assert _pending() == []


def test_not_like_with_like_has_no_magnitude_and_says_why(registry):
    """Other held-out cells, no split digest on either side, or test metrics that cover part
    of the held-out cells: the magnitude is null, with the reason."""
    _trained("model-imp-p", BASE_ID, {"test_macro_f1": 0.70})
    _trained("model-imp-p-nodigest", BASE_ID, {"test_macro_f1": 0.70}, split=NO_DIGEST)
    _trained("model-imp-p-legacy", BASE_ID, {"test_macro_f1": 0.70}, test_cells=None)
    cases = {
        "other-split": ("model-imp-p", {"split": OTHER_SPLIT},
                        "the parent was evaluated on other held-out cells"),
        "no-digest": ("model-imp-p-nodigest", {"split": NO_DIGEST},
                      "this version records no held-out cells"),
        "partial": ("model-imp-p", {"test_cells": 50},
                    "this version's test metrics cover 50 of its 100 held-out cells"),
        "legacy-parent": ("model-imp-p-legacy", {},
                          "the parent's test metrics cover an unrecorded number of its 100"),
    }
    for name, (parent, record, _) in cases.items():
        _trained(f"model-imp-{name}", parent, {"test_macro_f1": 0.95}, **record)
    for name, (_, _, why) in cases.items():
        row = _of(f"model-imp-{name}")
        assert row["magnitude"] is None, name
        assert why in row["detection_metadata"]["magnitude_reason"], name
        assert row["detection_metadata"]["bucket"] is None
    # the same cells, all of them scored: compared
    _trained("model-imp-same", "model-imp-p", {"test_macro_f1": 0.95})
    assert _of("model-imp-same")["magnitude"] == pytest.approx(0.25)


def test_another_task_never_compares():
    """test_loss is masked MSE after pretraining, cross-entropy after fine-tuning."""
    record = {"task": PRETRAIN, "split": SPLIT, "test_cells": 100}
    parent = {"metadata": record, "version": {"eval_metrics_json": {"test_loss": 0.9},
                                              "eval_dataset_artifact_id": DATASET_ID}}
    same = improvement("test_loss", 0.5, parent, record, DATASET_ID)
    assert same["magnitude"] == pytest.approx(0.4) and same["bucket"] == "very_high"
    other = improvement("test_loss", 0.5, parent, {**record, "task": FINETUNE}, DATASET_ID)
    assert other["magnitude"] is None and "another task" in other["magnitude_reason"]


# --- gate decisions: the real gate, stand-in eval jobs --------------------------------------------

# The candidate predicts every held-out cell wrong; every comparator predicts it right.
WORSE_CANDIDATE = GATE_HELD_OUT + """
    pred = {name: ([(t + 1) % k for t in true] if name == "candidate" else true)
            for name in m["models"]}
    write_predictions(out, cells, pred, data.label_names)
    json.dump({"status": "ok", "reason": "ok"}, open(out / "result.json", "w"))
"""

# The candidate predicts every held-out cell right; every comparator predicts it wrong.
BETTER_CANDIDATE = WORSE_CANDIDATE.replace('name == "candidate"', 'name != "candidate"')

# The candidate predicts exactly as its comparators do.
TIED_CANDIDATE = GATE_HELD_OUT + """
    other = [t if i % 4 else (t + 1) % k for i, t in enumerate(true)]
    write_predictions(out, cells, {name: other for name in m["models"]}, data.label_names)
    json.dump({"status": "ok", "reason": "ok"}, open(out / "result.json", "w"))
"""


def _use_eval_job(tmp_path, monkeypatch, name: str, body: str) -> None:
    monkeypatch.setenv("FORGE_CODE_REPO", str(stand_in_gate_repo(tmp_path / name, body)))


def _decision_row(result: dict, candidate: str) -> dict:
    """The decision's improvement row, checked for what every one carries: the agent credited
    (the trainer), the evaluation's allocation and its settled cost, and a link to the
    training's allocation."""
    (row,) = _improvements(target_artifact_id=candidate,
                           event_type=f"model_version_{result['decision']}")
    alloc = ledger.get_allocation(result["allocation_id"])
    assert alloc["purpose"] == "evaluation" and alloc["status"] == "settled"
    assert row["agent_id"] == AGENT and row["allocation_id"] == alloc["id"]
    assert row["cost"] == alloc["actual_cost"] and row["cost"] is not None
    trained = catalog.get_model_version(candidate)["version"]["gpu_allocation_id"]
    assert row["detection_metadata"]["training_allocation_id"] == trained
    assert row["detection_metadata"]["decided_by"] == AGENT
    return row


@pytest.mark.sandbox
def test_a_rejected_regression_is_never_payable(registry, tmp_path, monkeypatch):
    _use_eval_job(tmp_path, monkeypatch, "worse", WORSE_CANDIDATE)
    cand = stand_in_candidate(BASE_ID, "model-imp-worse")
    result = evaluate_candidate(cand, AGENT, allow_dirty=True)
    assert result["decision"] == "rejected", result["notes"]
    row = _decision_row(result, cand)
    (vs_parent,) = result["comparisons"]
    assert row["magnitude"] == pytest.approx(vs_parent["delta"]) and row["magnitude"] < -0.5
    assert row["detection_metadata"]["bucket"] is None  # was very_high: the absolute delta
    assert row["payout_status"] == "ineligible"
    assert row["detection_metadata"]["payout_reason"] == "the eval gate rejected the version"
    assert _pending() == []


@pytest.mark.sandbox
def test_only_a_promotion_that_gains_is_payable(registry, tmp_path, monkeypatch):
    """A tie promoted on a recorded tradeoff gains nothing: promoted, not payable. A candidate
    that beats its parent and the champion is payable, by its smallest gain."""
    conf = operator_conf(tmp_path, monkeypatch, "")
    (conf / "gate" / "lenient.yaml").write_text("allow_tradeoff: true\n")
    _use_eval_job(tmp_path, monkeypatch, "tied", TIED_CANDIDATE)
    tied = stand_in_candidate(BASE_ID, "model-imp-tied")
    result = evaluate_candidate(tied, AGENT, allow_dirty=True, gate="lenient",
                                justification="smaller at the same accuracy")
    assert result["decision"] == "promoted", result["notes"]
    row = _decision_row(result, tied)
    assert row["magnitude"] == 0.0 and row["detection_metadata"]["bucket"] is None
    assert row["payout_status"] == "ineligible"
    assert row["detection_metadata"]["payout_reason"].startswith("no improvement")

    _use_eval_job(tmp_path, monkeypatch, "better", BETTER_CANDIDATE)
    better = stand_in_candidate(BASE_ID, "model-imp-better")
    result = evaluate_candidate(better, AGENT, allow_dirty=True)
    assert result["decision"] == "promoted", result["notes"]
    assert {c["comparator_role"] for c in result["comparisons"]} == {"parent", "champion"}
    row = _decision_row(result, better)
    assert row["magnitude"] == pytest.approx(min(c["delta"] for c in result["comparisons"]))
    assert row["magnitude"] > 0.5 and row["detection_metadata"]["bucket"] == "very_high"
    assert row["payout_status"] == "pending"
    assert "payout_reason" not in row["detection_metadata"]
    assert [r["target_artifact_id"] for r in _pending()] == [better]
    # the sum of the rows' costs is what was spent, each allocation once
    rows = _improvements()
    assert len({r["allocation_id"] for r in rows}) == len(rows)


# --- a registry from before revision 0007 ---------------------------------------------------------

def test_rows_from_before_0007_are_backfilled_and_made_safe(registry):
    """Downgraded to 0006, rows written as the old code wrote them (all `pending`, a rejected
    regression bucketed by its absolute delta, no agent or cost), upgraded again: only the
    promotion that gained stays payable; every row has its agent, allocation and cost."""
    from alembic import command

    trained = stand_in_candidate(BASE_ID, "model-imp-old")
    rejected = stand_in_candidate(BASE_ID, "model-imp-old-rejected")
    gates = []
    for cand in (trained, rejected):
        alloc = ledger.reserve(AGENT, "0.01", f"old-gate-{cand}", wall_time_cap_min=1,
                               vram_cap_gb=1, price_per_hour="0.5", purpose="evaluation")
        gates.append(ledger.settle(alloc["id"], 2.0, artifact_id=cand))
    training = catalog.get_model_version(trained)["version"]["gpu_allocation_id"]
    command.downgrade(db.alembic_config(registry), "0006")

    old = sa.table("world_model_improvements", *(sa.column(c) for c in (
        "id", "event_type", "target_artifact_id", "target_artifact_type", "magnitude",
        "payout_status")), sa.column("detection_metadata", sa.JSON()),
        sa.column("detected_at", sa.DateTime(timezone=True)))
    rows = [("old-trained", "model_version_trained", trained, 0.05, training, "high"),
            ("old-promoted", "model_version_promoted", trained, 0.05, gates[0]["id"], "high"),
            ("old-rejected", "model_version_rejected", rejected, -0.875, gates[1]["id"],
             "very_high")]
    with db.transaction() as conn:
        conn.execute(old.insert(), [
            {"id": i, "event_type": e, "target_artifact_id": t, "target_artifact_type": "model",
             "magnitude": m, "payout_status": "pending", "detected_at": datetime.now(UTC),
             "detection_metadata": {"allocation_id": a, "bucket": b}}
            for i, e, t, m, a, b in rows])
    db.upgrade(registry)

    got = {r["id"]: r for r in _improvements()}
    assert [r["id"] for r in _pending()] == ["old-promoted"]
    assert got["old-promoted"]["detection_metadata"]["bucket"] == "high"
    assert got["old-trained"]["payout_status"] == got["old-rejected"]["payout_status"] == \
        "ineligible"
    assert "0007" in got["old-rejected"]["detection_metadata"]["payout_reason"]
    assert got["old-rejected"]["detection_metadata"]["bucket"] is None
    for row_id, _, _, _, alloc_id, _ in rows:
        row = got[row_id]
        assert row["agent_id"] == AGENT and row["allocation_id"] == alloc_id
        assert row["cost"] == ledger.get_allocation(alloc_id)["actual_cost"]
