"""The eval gate's rule, applied on the host to the per-cell predictions its job wrote,
scored against the host's own truth (truth.read_predictions: the labels, the cells and the
baseline are the host's). `decide` runs the paired bootstrap of the gate's metric for
the candidate against each comparator and applies the rule (SciDEX WS4):

- against every comparator that could classify the cells, the delta is >= min_delta and the
  CI excludes 0; when none could (a pretrained parent has no cell-type head), against the
  logistic-regression baseline refitted on the same split;
- no guard metric drops by more than its allowance against any of them;
- a gate with allow_tradeoff promotes a candidate that misses the first rule (never one
  that breaks a guard) when the call gives a justification, which is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

from runner.config.gate import METRICS, GateConf
from runner.errors import EvaluationFailed
from runner.jobs import hook
from runner.jobs.bootstrap import Bootstrap, metric_value, pair_seed, paired_bootstrap
from runner.jobs.truth import BASELINE, Predictions


@dataclass(frozen=True)
class Comparison:
    role: str  # parent | champion | benchmark_best | baseline
    comparator_id: str | None  # None: the baseline
    metric: str  # the gate's name for it (test_macro_f1)
    result: Bootstrap
    guards: dict[str, float]  # guard metric -> candidate minus comparator
    passed_delta: bool
    passed_guards: bool
    reasons: list[str]

    def row(self) -> dict:
        """The comparison's `evaluations` columns."""
        r = self.result
        return dict(comparator_artifact_id=self.comparator_id, comparator_role=self.role,
                    metric=self.metric, candidate_value=r.value_a, comparator_value=r.value_b,
                    delta=r.delta, ci_low=r.low, ci_high=r.high, confidence=r.confidence,
                    n_resamples=r.n_resamples, n_cells=r.n_cells, seed=r.seed,
                    reasons=self.reasons)


@dataclass(frozen=True)
class Decision:
    decision: str  # promoted | rejected
    notes: str
    comparisons: list[Comparison]
    magnitude: float | None  # the smallest gain over a comparator (hook.gain)
    bucket: str | None  # SciDEX's, of a gain > 0 only (hook.bucket)
    baseline_value: float  # the baseline's metric on the same cells, compared or not

    def rows(self) -> list[dict]:
        """The `evaluations` rows: one per comparison, each with the baseline's value."""
        return [{**c.row(), "baseline_value": self.baseline_value} for c in self.comparisons]


def _bad(message: str) -> EvaluationFailed:
    return EvaluationFailed(f"predictions.json {message}", reason="missing_predictions",
                            field="predictions.json",
                            fix="the eval job must write predictions.json as "
                                "trainers/gate_eval.py documents; read its job log")


def _bad(message: str) -> EvaluationFailed:
    return EvaluationFailed(f"predictions.json {message}", reason="missing_predictions",
                            field="predictions.json",
                            fix="the eval job must write predictions.json as "
                                "trainers/gate_eval.py documents; read its job log")


def decide(gate: GateConf, preds: Predictions, comparators: dict[str, str],
           candidate_id: str, justification: str | None = None) -> Decision:
    """`comparators`: role -> artifact id of the comparators the job was asked to predict
    with; those it could not (not a classifier) are left out, and the baseline stands in
    when none is left."""
    if "candidate" not in preds.pred:
        raise _bad("has no predictions of the candidate")
    usable = {role: aid for role, aid in comparators.items() if role in preds.pred}
    if not usable:
        if BASELINE not in preds.pred:
            raise _bad("has no comparator to judge the candidate against (no classifier "
                       "among the comparators, and no baseline)")
        usable = {BASELINE: None}
    comparisons = [_compare(gate, preds, role, aid, candidate_id) for role, aid in usable.items()]
    deltas_ok = all(c.passed_delta for c in comparisons)
    guards_ok = all(c.passed_guards for c in comparisons)
    tradeoff = bool(gate.allow_tradeoff and justification and guards_ok and not deltas_ok)
    promoted = (deltas_ok and guards_ok) or tradeoff
    lines = [reason for c in comparisons for reason in c.reasons]
    if tradeoff:
        lines.append(f"promoted on a recorded tradeoff justification: {justification[:1000]}")
    elif justification and not gate.allow_tradeoff:
        lines.append("a justification was given, but this gate accepts none")
    # the improvement is over the best model it was compared with: the smallest gain
    magnitude = min(hook.gain(gate.metric, c.result.delta) for c in comparisons)
    verdict = "promoted" if promoted else "rejected"
    k = preds.n_classes
    baseline = metric_value(METRICS[gate.metric], preds.true, preds.pred[BASELINE], k + 1, k)
    return Decision(verdict, f"{verdict} by gate: " + "; ".join(lines), comparisons,
                    magnitude, hook.bucket(magnitude), float(baseline))


def _compare(gate: GateConf, preds: Predictions, role: str, comparator_id: str | None,
             candidate_id: str) -> Comparison:
    k = preds.n_classes
    mine, theirs = preds.pred["candidate"], preds.pred[role]
    seed = pair_seed(gate.seed, candidate_id, comparator_id or BASELINE)
    result = paired_bootstrap(preds.true, mine, theirs, metric=METRICS[gate.metric],
                              n_classes=k + 1, n_scored=k, n_resamples=gate.n_resamples,
                              confidence=gate.confidence, seed=seed)
    who = f"{role} {comparator_id}" if comparator_id else "the logistic-regression baseline"
    ci = (f"{gate.confidence:.0%} CI [{result.low:+.4f}, {result.high:+.4f}]")
    summary = (f"{gate.metric} {result.value_a:.4f} vs {result.value_b:.4f} of {who}: delta "
               f"{result.delta:+.4f}, {ci}")
    passed_delta = result.delta >= gate.min_delta and result.low > 0
    if passed_delta:
        reasons = [f"{summary} excludes 0"]
    elif result.delta < gate.min_delta:
        reasons = [f"{summary}: below min_delta {gate.min_delta:+.4f}"]
    else:
        reasons = [f"{summary} contains 0: not shown better"]
    guards = {}
    for name, allowance in gate.guards.items():
        delta = (metric_value(METRICS[name], preds.true, mine, k + 1, k)
                 - metric_value(METRICS[name], preds.true, theirs, k + 1, k))
        guards[name] = delta
        if delta < -allowance:
            reasons.append(f"guard {name} drops {-delta:.4f} against {who}, over the "
                           f"{allowance:.4f} allowed")
    passed_guards = all(guards[n] >= -a for n, a in gate.guards.items())
    return Comparison(role, comparator_id, gate.metric, result, guards, passed_delta,
                      passed_guards, reasons)

