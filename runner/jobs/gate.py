"""The eval gate (SciDEX WS4): a candidate is promoted or rejected on evidence.

`evaluate(candidate_id, agent_id, gate)`:

1. read: the candidate (a `candidate` fine-tuned here, with its held-out split recorded),
   the gate's rules (conf/gate/<name>.yaml), its comparators (those the rules name, each model
   once: the parent, the lineage's champion, the best version of any family on the
   candidate's benchmark), and any decision already recorded (returned as it is);
2. plan: the eval job is priced, checked and pinned by the training plan of the candidate
   (`plan.prepare`: policy, balance, code pin, sandbox) under the gate's wall-time cap; a dry
   run stops here;
3. truth: the host rebuilds the held-out cells from the registered dataset (checked against
   the recorded split digest), their labels and the logistic-regression baseline
   (`truth.py`), before any debit;
4. run: reserve (purpose `evaluation`) -> the weights of every model -> `trainers.gate_eval`
   in the sandbox, which predicts the candidate's own held-out cells with each: claims;
5. decide: the paired bootstrap and the rule on the host (`decide.py`) against the host's
   truth, written with the settlement and the candidate's benchmark (`registry.benchmarks`)
   in one transaction (`registry.promotion.record_decision`);
6. review: the MLflow side (`gate_report.publish`): the `champion` alias, version tags, the
   report on the candidate's run. The registry is the record: a failure here is a warning.

Every failure after the debit settles the allocation once (charged for what ran) and
reaches the caller typed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Callable

from runner import sandbox, settings, tools
from runner.config.gate import GateConf, load_gate
from runner.errors import (
    Conflict,
    EvaluationFailed,
    Forbidden,
    ForgeError,
    GateRefused,
    InvalidInput,
    JobCancelled,
    TrainingFailed,
)
from runner.jobs import (
    codepin,
    decide,
    engine,
    gate_report,
    handback,
    recovery,
    truth,
    weights,
)
from runner.jobs.job import clean_run_dir, dataset_input, disk_problem, run_dir, sandbox_job
from runner.jobs.plan import Plan, TrainRequest, prepare
from runner.registry import benchmarks, capacity, catalog, ledger, promotion
from runner.registry.recovery import Heartbeat, settle_retrying
from trainers.manifest import EVAL_TASK, MANIFEST_VERSION, ManifestError, parse_eval_manifest

MODULE = "trainers.gate_eval"
REPRODUCE_TOLERANCE = 1e-6  # the gate's value of the candidate vs the one training recorded


def evaluate(candidate_id: str, agent_id: str, gate: str = "default", *, dry_run: bool = False,
             justification: str | None = None, allow_dirty: bool = False,
             on_line: Callable[[str], None] | None = None) -> dict:
    catalog.validate_artifact_id(candidate_id, "candidate_artifact_id")
    ledger.check_agent_id(agent_id)
    if justification is not None and (not isinstance(justification, str)
                                      or not 1 <= len(justification) <= 4000):
        raise InvalidInput("justification must be a string of 1 to 4000 characters",
                           field="justification",
                           fix="say in words why the tradeoff is worth it, or pass none")
    rules = load_gate(gate)
    cand = catalog.get_model_version(candidate_id)
    check_owner(cand, agent_id)  # before any read-back, plan or debit
    if cand["version"]["promotion_state"] != "candidate":
        return _recorded(cand, gate, rules)
    champion = promotion.champion(promotion.lineage_root(cand))  # the decision checks it
    comparators = _comparators(cand, rules, champion)
    plan = prepare(TrainRequest(candidate_id, _eval_dataset(cand), agent_id,
                                wall_time_cap_min=rules.wall_time_cap_min,
                                allow_dirty=allow_dirty, dry_run=dry_run))
    # policy.parent_states rules what may be fine-tuned; the gate evaluates its candidate
    plan.problems = [p for p in plan.problems if p.reason != "parent_state"]
    manifest = _manifest(cand, plan, comparators, rules)
    if dry_run:
        return _dry_run(cand, gate, rules, plan, comparators)
    if plan.problems:
        raise plan.problems[0]
    if (problem := disk_problem(plan.resolved)) is not None:
        raise problem
    held = _held_out(cand, plan, manifest)  # the truth, on the host, before any debit
    recovery.reap()
    scheduled = engine.current()  # the SLURM job this host process runs in, if any
    alloc = ledger.reserve(
        agent_id, plan.estimate, _request_key(cand, gate, rules, comparators, plan),
        wall_time_cap_min=rules.wall_time_cap_min, vram_cap_gb=plan.resolved["vram_cap_gb"],
        price_per_hour=plan.price_per_hour, devices=plan.devices,
        device=plan.device.price_key, resource_type=plan.device.resource_type,
        currency=plan.currency, purpose="evaluation",
        margin_s=plan.resolved["registry"]["expiry_margin_min"] * 60,
        engine=scheduled.engine if scheduled else None,
        engine_job_id=scheduled.job_id if scheduled else None,
        limits=capacity.limits(plan.resolved, on_this_host=scheduled is None))
    if alloc.get("existing"):
        if alloc["status"] == "settled":
            return _recorded(catalog.get_model_version(candidate_id), gate, rules)
        raise Conflict(f"this gate of {candidate_id!r} is already {alloc['status']} as "
                       f"allocation {alloc['id']}", field="candidate_artifact_id",
                       fix="wait for it to finish, then call again to get its decision")
    return _Evaluation(cand, gate, rules, plan, comparators, champion, manifest, held, alloc,
                       justification, on_line).run()


# --- reading ----------------------------------------------------------------------------------

def check_owner(cand: dict, agent_id: str) -> None:
    """Only the agent that trained a version (model_versions.trained_by), or the operator,
    gates it or reads its decision back; any other agent is refused before anything runs."""
    owner = cand["version"].get("trained_by")
    if owner is None and cand["version"]["promotion_state"] != "candidate":
        return  # registered by the operator, never trained here: refused as not_a_candidate
    if owner == agent_id or tools.is_operator():
        return
    raise Forbidden(f"{cand['id']!r} is not agent {agent_id!r}'s candidate",
                    field="candidate_artifact_id",
                    fix="gate a version this agent trained; its owner or the operator "
                        "(forge gate) gates this one")


def _recorded(cand: dict, gate: str, rules: GateConf) -> dict:
    """A decided model: its recorded decision when this gate made it, else a refusal."""
    rows = promotion.recorded(cand["id"])
    state = cand["version"]["promotion_state"]
    if not rows:
        raise GateRefused(f"{cand['id']!r} is not a candidate: it is {state} and was never "
                          "gated", field="candidate_artifact_id", reason="not_a_candidate",
                          fix="gate a version whose promotion_state is candidate")
    if rows[0]["gate_config_sha256"] != rules.sha256():
        raise GateRefused(f"{cand['id']!r} was already {rows[0]['decision']} by gate "
                          f"{rows[0]['gate_name']!r} under other rules", reason="already_gated",
                          field="gate", fix=f"read its decision with gate={rows[0]['gate_name']!r}"
                          " and the rules it ran under; a decision is never re-made")
    return _result(cand, rows, recorded=True)


def _eval_dataset(cand: dict) -> str:
    dataset = cand["version"].get("eval_dataset_artifact_id")
    meta = cand.get("metadata") or {}
    test = ((meta.get("split") or {}).get("sha256") or {}).get("test")
    if meta.get("task") != "finetune_celltype" or not dataset or not test:
        raise GateRefused(f"{cand['id']!r} is not a cell-type classifier with a recorded "
                          "held-out split (task, eval dataset, split digest)",
                          field="candidate_artifact_id", reason="not_gateable",
                          fix="gate a version fine-tuned here for cell types")
    return dataset


def _comparators(cand: dict, rules: GateConf, champion: dict | None) -> dict[str, dict]:
    """role -> the comparator's artifact row, as the operator's rules name them, each model
    once (an earlier role wins): the parent, the lineage's `champion`, and `benchmark_best`,
    the best version of any family recorded on the candidate's benchmark. Resolved from the
    registry alone: a caller names a gate, never a comparator."""
    out: dict[str, dict] = {}
    if "parent" in rules.comparators and cand["parent_version_id"]:
        out["parent"] = catalog.get_artifact(cand["parent_version_id"])
    if "champion" in rules.comparators and champion is not None and \
            champion["id"] not in {cand["id"], *(a["id"] for a in out.values())}:
        out["champion"] = champion
    if "benchmark_best" in rules.comparators and \
            (bench := benchmarks.of_version(cand, rules.metric)) is not None:
        best = benchmarks.best_version(bench, exclude={cand["id"]})
        if best is not None and best["id"] not in {a["id"] for a in out.values()}:
            out["benchmark_best"] = best
    return out


def _manifest(cand: dict, plan: Plan, comparators: dict[str, dict], rules: GateConf) -> dict:
    """The eval job's manifest (trainers/manifest.py EvalManifest), in sandbox paths: the
    candidate's own test pass (seed, split, sequence length, batch size, precision)."""
    t = (cand["version"].get("training_params_json") or {}).get("training") or {}
    split = cand["metadata"]["split"]
    data = plan.resolved["dataset"]
    try:
        manifest = {
            "manifest_version": MANIFEST_VERSION, "task": EVAL_TASK, "output_dir": "/job/out",
            "seed": t["seed"], "num_threads": t.get("num_threads"),
            "device": "cpu" if plan.device is None or plan.device.sandbox == "cpu" else "cuda",
            "vram_cap_gb": plan.resolved["vram_cap_gb"],
            "dataset": {"name": data["source"], "path": f"{sandbox.IN_DIR}/dataset",
                        "format": data["format"], "label_key": data["label_key"]},
            "split": {"seed": t["seed"] if t.get("split_seed") is None else t["split_seed"],
                      "val_fraction": t["val_fraction"], "test_fraction": t["test_fraction"],
                      "test_sha256": split["sha256"]["test"]},
            "models": {"candidate": f"{sandbox.IN_DIR}/candidate",
                       **{role: f"{sandbox.IN_DIR}/{role}" for role in comparators}},
            # each model predicts by its own family's recipe: the gate is family-blind
            "families": {"candidate": benchmarks.family(cand),
                         **{role: benchmarks.family(art) for role, art in comparators.items()}},
            # the candidate's test pass, for the families that draw tokens (scGPT)
            **{k: t[k] for k in ("max_seq_len", "include_zero_gene", "precision")
               if t.get(k) is not None},
            **({"eval_batch_size": t.get("eval_batch_size") or 2 * t["batch_size"]}
               if t.get("batch_size") else {}),
            "baseline": False}  # the host refits it
        parse_eval_manifest(manifest)  # what the job would refuse, refused before any debit
    except (KeyError, TypeError, ManifestError) as exc:
        raise GateRefused(f"{cand['id']!r} lacks the training record to rebuild its test "
                          f"pass: {exc}", field="candidate_artifact_id", reason="not_gateable",
                          fix="gate a version fine-tuned here for cell types") from exc
    return manifest


def _held_out(cand: dict, plan: Plan, manifest: dict) -> truth.HeldOut:
    """The candidate's held-out cells, their labels and the baseline, rebuilt by the host from
    the registered dataset; a split that does not hash to the recorded digest is refused."""
    split = manifest["split"]
    return truth.rebuild(dataset_input(plan.dataset, plan.resolved["dataset"]["source"]),
                         plan.resolved["dataset"], seed=manifest["seed"],
                         split_seed=split["seed"], val_fraction=split["val_fraction"],
                         test_fraction=split["test_fraction"], test_sha256=split["test_sha256"],
                         content_hash=plan.dataset.get("content_hash"))


def _request_key(cand: dict, gate: str, rules: GateConf, comparators: dict[str, dict],
                 plan: Plan) -> str:
    payload = {"gate": gate, "rules": rules.sha256(), "candidate": cand["id"],
               "comparators": {r: a["id"] for r, a in comparators.items()},
               "agent": plan.agent_id, "code": plan.code.sha, "diff": plan.code.diff_sha256}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return "gate:" + hashlib.sha256(text.encode()).hexdigest()


def _dry_run(cand: dict, gate: str, rules: GateConf, plan: Plan,
             comparators: dict[str, dict]) -> dict:
    out = plan.dry_run_result()
    return {"would_launch": out["would_launch"], "reasons": out["reasons"],
            "candidate_artifact_id": cand["id"], "gate": gate, "rules": rules.to_dict(),
            "comparators": {role: a["id"] for role, a in comparators.items()},
            "estimate": out["estimate"], "balance": out["balance"], "code": out["code"],
            "sandbox": out["sandbox"], "agent_id": plan.agent_id}


# --- the job ---------------------------------------------------------------------------------

class _Evaluation:
    def __init__(self, cand, gate, rules, plan, comparators, champion, manifest, held, alloc,
                 justification, on_line):
        self.cand, self.gate, self.rules, self.plan = cand, gate, rules, plan
        self.comparators, self.manifest, self.alloc = comparators, manifest, alloc
        self.held = held  # the host's truth: the job's predictions are scored against it
        # the champion the comparators were chosen against: a decision is refused if it moved
        self.champion_id = None if champion is None else champion["id"]
        self.justification, self.on_line = justification, on_line
        self.run_dir = run_dir(alloc["id"])
        self.seconds = 0.0
        self.stop = threading.Event()  # set on SIGTERM: the sandbox stops, the job is cancelled

    def run(self) -> dict:
        try:
            with Heartbeat(self.alloc["id"]), engine.stop_on_sigterm(self.stop, self.on_line):
                result = self._run()
        except BaseException as exc:
            clean_run_dir(self.run_dir)
            self._fail(exc)
            raise _typed(exc) from exc
        clean_run_dir(self.run_dir)
        return result

    def _run(self) -> dict:
        plan, cand = self.plan, self.cand
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ledger.mark_running(self.alloc["id"], None)  # the candidate's MLflow run is not ours
        codepin.snapshot(plan.code, settings.cache_dir() / "code")
        inputs = {"dataset": dataset_input(plan.dataset, plan.resolved["dataset"]["source"]),
                  "candidate": weights.materialize(cand, self.run_dir / "models" / "candidate")}
        for role, art in self.comparators.items():
            inputs[role] = weights.materialize(art, self.run_dir / "models" / role)
        path = self.run_dir / "manifest.json"
        path.write_text(json.dumps(self.manifest, indent=2))
        inputs["manifest.json"] = path
        out = self.run_dir / "out"
        job = sandbox_job(plan, inputs=inputs, output_dir=out, log_path=self.run_dir / "job.log",
                          on_line=self.on_line, module=MODULE, stop=self.stop)
        launched = sandbox.gpu_launch(job)
        self.seconds = launched.wall_seconds
        if self.stop.is_set():
            raise JobCancelled(f"the evaluation was cancelled after {launched.wall_seconds:.1f}s "
                               "(SIGTERM: its scheduler or an operator stopped it)",
                               fix="gate the candidate again; the seconds it ran are charged, "
                                   "the rest refunded")
        handback.read_result(out, launched)
        preds = truth.read_predictions(out, self.held)
        verdict = decide.decide(self.rules, preds, {r: a["id"] for r, a in
                                                    self.comparators.items()},
                                cand["id"], self.justification)
        unreproduced = _unreproduced(cand, self.rules.metric, verdict)
        detection = {"gate": self.gate, "metric": self.rules.metric,
                     "bucket": verdict.bucket, "allocation_id": self.alloc["id"],
                     "comparisons": [c.row() for c in verdict.comparisons],
                     "warnings": unreproduced}
        promotion.record_decision(
            candidate_id=cand["id"], champion_id=self.champion_id, decision=verdict.decision,
            notes=verdict.notes, rows=verdict.rows(),
            gate_name=self.gate, gate_config=self.rules.to_dict(),
            gate_sha256=self.rules.sha256(), agent_id=plan.agent_id,
            allocation_id=self.alloc["id"], actual_seconds=self.seconds,
            magnitude=verdict.magnitude, detection=detection,
            benchmark_id=benchmarks.of_version(cand, self.rules.metric))
        fresh = catalog.get_model_version(cand["id"])
        result = _result(fresh, promotion.recorded(cand["id"]), recorded=False)
        others = {a["id"] for a in self.comparators.values()} | (
            {fresh["parent_version_id"]} if fresh["parent_version_id"] else set())
        result["warnings"] = unreproduced + gate_report.publish(
            plan.resolved["tracking"]["tracking_uri"], fresh, verdict, preds, self.gate,
            others=sorted(others), report=result, work_dir=self.run_dir / "gate")
        return result

    def _fail(self, exc: BaseException) -> None:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        status = "cancelled" if isinstance(exc, JobCancelled) else "failed"
        try:
            settle_retrying(self.alloc["id"], self.seconds, status=status,
                            reason=f"{reason}: {exc}"[:500])
        except Exception as step_exc:  # noqa: BLE001 - never mask the original error
            print(f"warning: could not settle allocation {self.alloc['id']}; `forge ledger "
                  f"reap` settles it once it expires: {step_exc}", file=sys.stderr)


def _unreproduced(cand: dict, metric: str, verdict: decide.Decision) -> list[str]:
    """The gate's measurement of the candidate must be the one its training recorded (both are
    the host's scores of the same held-out cells): a difference is a warning on the decision."""
    recorded = (cand["version"].get("eval_metrics_json") or {}).get(metric)
    measured = verdict.comparisons[0].result.value_a
    if isinstance(recorded, (int, float)) and abs(recorded - measured) <= REPRODUCE_TOLERANCE:
        return []
    return [f"unreproduced: the gate measured {metric} {measured:.6f} for the candidate, its "
            f"training recorded {recorded!r} on the same held-out cells"]


def _typed(exc: BaseException) -> BaseException:
    """A failed evaluation as the caller sees it: the job's failure as EvaluationFailed (a
    split that does not rebuild as GateRefused `split_mismatch`); ForgeErrors as they are."""
    if isinstance(exc, TrainingFailed):
        if exc.field == "split.test_sha256":
            return GateRefused(f"the candidate's held-out cells cannot be rebuilt: "
                               f"{exc.message}", reason="split_mismatch",
                               field="candidate_artifact_id",
                               fix="the dataset or the split code changed since it was "
                                   "trained; retrain it, then gate it")
        return EvaluationFailed(exc.message.replace("training ", "evaluation ", 1),
                                reason=exc.reason, field=exc.field, fix=exc.fix,
                                **exc.details)
    if isinstance(exc, ForgeError) or not isinstance(exc, Exception):
        return exc
    return EvaluationFailed(f"the evaluation failed on the host: {type(exc).__name__}: {exc}",
                            reason="internal_error",
                            fix="the allocation is settled; report this with the job log")


# --- the result ------------------------------------------------------------------------------

def _result(model: dict, rows: list[dict], *, recorded: bool) -> dict:
    """The call's return value, from the registry: the same on every retry."""
    first = rows[0]
    alloc = ledger.get_allocation(first["allocation_id"]) if first["allocation_id"] else None
    version = model["version"]
    return {
        "candidate_artifact_id": model["id"], "gate": first["gate_name"],
        "decision": first["decision"], "notes": version.get("promotion_notes"),
        "recorded": recorded, "lifecycle_state": model["lifecycle_state"],
        "promotion_state": version["promotion_state"], "is_latest": model["is_latest"],
        "comparisons": [{k: r[k] for k in (
            "comparator_role", "comparator_artifact_id", "metric", "candidate_value",
            "comparator_value", "delta", "ci_low", "ci_high", "confidence", "n_resamples",
            "n_cells", "reasons")} for r in rows],
        "allocation_id": first["allocation_id"],
        "cost": None if alloc is None else {
            "estimated": str(alloc["estimated_cost"]), "debited": str(alloc["debited"]),
            "actual": str(alloc["actual_cost"]), "refunded": str(alloc["refunded"]),
            "currency": alloc["currency"]},
        "mlflow": {"model_uri": version.get("mlflow_model_uri"),
                   "run_id": version.get("mlflow_run_id")},
    }


def decision_text(result: dict) -> str:
    """A gate's decision in a few lines: the verdict, then each comparison with its CI."""
    lines = [f"{result['candidate_artifact_id']}: {result['decision'].upper()} by gate "
             f"{result['gate']!r}{' (recorded earlier)' if result.get('recorded') else ''}"]
    for c in result["comparisons"]:
        who = c["comparator_artifact_id"] or "logistic-regression baseline"
        lines.append(f"  vs {c['comparator_role']} {who}: {c['metric']} "
                     f"{c['candidate_value']:.4f} vs {c['comparator_value']:.4f}, delta "
                     f"{c['delta']:+.4f}, {c['confidence']:.0%} CI [{c['ci_low']:+.4f}, "
                     f"{c['ci_high']:+.4f}] over {c['n_cells']} cells")
        lines.extend(f"    {reason}" for reason in (c.get("reasons") or [])[1:])  # guards
    cost = result.get("cost")
    if cost:
        lines.append(f"  cost {cost['actual']} {cost['currency']} (debited {cost['debited']}, "
                     f"refunded {cost['refunded']})")
    return "\n".join(lines)
