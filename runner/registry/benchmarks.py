"""Benchmarks (SciDEX's `benchmark_id`): a dataset + task + held-out split + metric, the cells
on which versions of every family are measured alike.

The eval gate records the benchmark of each version it decides (`model_versions.benchmark_id`,
written with the decision: registry.promotion.record_decision). A leaderboard is read from
what the gates recorded (`evaluations`), never re-measured: a version's value is its own
gate's measurement of it, else the latest gate's that measured it as a comparator on the same
cells; the logistic-regression baseline is the host's refit that every gate measures
(`evaluations.baseline_value`). A CI against the best exists only where a gate compared the
two directly (the `benchmark_best` comparator makes every new candidate do so).
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa

from runner.errors import InvalidInput, NotFound
from runner.registry import catalog
from runner.registry.db import transaction
from runner.registry.ids import ARTIFACT_ID, SHA256
from runner.registry.schema import artifacts, evaluations, model_versions

BASELINE = "baseline"  # the baseline's pseudo-entry (runner.jobs.truth.BASELINE's role)


def benchmark_id(dataset_id: str, task: str, metric: str, split_sha256: str) -> str:
    """`bench-<dataset>-<task>-<metric>-<first 12 hex of the test split's sha256>`: readable
    and deterministic; a dataset id too long for the artifact-id rule is cut and told apart
    by 8 hex of its own sha256."""
    if not isinstance(split_sha256, str) or not SHA256.match(split_sha256):
        raise InvalidInput("a benchmark's split digest must be a sha256 hex digest",
                           field="split.sha256.test", fix="gate a version trained here")
    tail = f"-{task}-{metric}-{split_sha256[:12]}"
    name = f"bench-{dataset_id}{tail}"
    if len(name) > 128:
        short = hashlib.sha256(dataset_id.encode()).hexdigest()[:8]
        name = f"bench-{dataset_id[:128 - len(tail) - 15]}.{short}{tail}"
    if not ARTIFACT_ID.match(name):
        raise InvalidInput(f"no benchmark id can be made of {dataset_id!r}, {task!r} and "
                           f"{metric!r}", field="benchmark_id",
                           fix="use artifact ids, tasks and metrics of [A-Za-z0-9._-]")
    return name


def of_version(model: dict, metric: str) -> str | None:
    """The benchmark a gate under `metric` measures `model` (get_model_version's dict) on; None
    when it records no eval dataset, task or held-out split digest."""
    meta = model.get("metadata") or {}
    test = ((meta.get("split") or {}).get("sha256") or {}).get("test")
    dataset = (model.get("version") or {}).get("eval_dataset_artifact_id")
    if not (test and dataset and meta.get("task")):
        return None
    return benchmark_id(dataset, meta["task"], metric, test)


def family(artifact: dict) -> str:
    """The family its registry record names (versions made before families were scGPT's)."""
    return (artifact.get("metadata") or {}).get("family") or "scgpt"


def leaderboard(bench_id: str, *, conn=None) -> dict:
    """Every version measured on the benchmark, best first, with the baseline's pseudo-entry
    placed by its value: {id, dataset, task, metric, split_sha256, best, entries}; an entry is
    {kind: version|baseline, id, family, version_number, lifecycle_state, value, gated
    (decided on this benchmark), vs_best: {delta, ci_low, ci_high, confidence} or None}.
    Raises InvalidArtifactId for a malformed id and NotFound for one nothing was gated on."""
    catalog.validate_artifact_id(bench_id, "benchmark_id")
    with transaction(conn) as c:
        rows = [dict(r) for r in c.execute(
            sa.select(evaluations, model_versions.c.eval_dataset_artifact_id)
            .join(model_versions,
                  model_versions.c.artifact_id == evaluations.c.candidate_artifact_id)
            .where(model_versions.c.benchmark_id == bench_id)
            .order_by(evaluations.c.created_at, evaluations.c.id)).mappings()]
        if not rows:
            raise NotFound(f"no version was gated on benchmark {bench_id!r}",
                           field="benchmark_id", fix="list the benchmarks: forge benchmarks list")
        values: dict[str, float] = {}
        for r in rows:  # as a comparator: the latest gate's measurement
            if r["comparator_artifact_id"] is not None:
                values[r["comparator_artifact_id"]] = r["comparator_value"]
        for r in rows:  # its own gate's measurement wins
            values[r["candidate_artifact_id"]] = r["candidate_value"]
        arts = {a["id"]: dict(a) for a in c.execute(
            sa.select(artifacts).where(artifacts.c.id.in_(values))).mappings()}
    gated = {r["candidate_artifact_id"] for r in rows}
    entries = [{"kind": "version", "id": aid, "family": family(arts[aid]),
                "version_number": arts[aid]["version_number"],
                "lifecycle_state": arts[aid]["lifecycle_state"], "value": value,
                "gated": aid in gated, "created_at": arts[aid]["created_at"]}
               for aid, value in values.items()]
    entries.sort(key=lambda e: (-e["value"], e["created_at"], e["id"]))
    best = entries[0]
    pairs = _pairs(rows)
    for e in entries:
        e["vs_best"] = None if e is best else pairs.get((e["id"], best["id"]))
    baseline = _baseline(rows)
    if baseline is not None:
        entries.append({"kind": BASELINE, "id": None, "family": "logistic regression",
                        "version_number": None, "lifecycle_state": None, "value": baseline,
                        "gated": False, "created_at": None,
                        "vs_best": pairs.get((BASELINE, best["id"]))})
        entries.sort(key=lambda e: -e["value"])  # stable: ties keep the versions' order
    first = rows[0]
    meta = arts[first["candidate_artifact_id"]].get("metadata") or {}
    return {"id": bench_id, "dataset": first["eval_dataset_artifact_id"],
            "task": meta.get("task"), "metric": first["metric"],
            "split_sha256": ((meta.get("split") or {}).get("sha256") or {}).get("test"),
            "best": best, "entries": entries}


def _pairs(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """(a, b) -> a minus b with its CI, for each pair a gate compared (either way round; the
    baseline as BASELINE); the latest gate's when several did."""
    out = {}
    for r in rows:
        other = r["comparator_artifact_id"] or BASELINE
        ci = {"delta": r["delta"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
              "confidence": r["confidence"]}
        out[(r["candidate_artifact_id"], other)] = ci
        out[(other, r["candidate_artifact_id"])] = {
            "delta": -r["delta"], "ci_low": -r["ci_high"], "ci_high": -r["ci_low"],
            "confidence": r["confidence"]}
    return out


def _baseline(rows: list[dict]) -> float | None:
    """The baseline's value: the latest gate's measurement (every gate since revision 0008
    records it; before, only a gate that compared against it)."""
    for r in reversed(rows):
        if r["baseline_value"] is not None:
            return r["baseline_value"]
        if r["comparator_role"] == BASELINE:
            return r["comparator_value"]
    return None


def list_benchmarks(*, conn=None) -> list[dict]:
    """Every benchmark a version was gated on: {id, dataset, task, metric, versions (how many
    measured), best (its top entry)}, by id."""
    with transaction(conn) as c:
        ids = c.execute(sa.select(model_versions.c.benchmark_id).distinct()
                        .where(model_versions.c.benchmark_id.is_not(None))
                        .order_by(model_versions.c.benchmark_id)).scalars().all()
        boards = [leaderboard(b, conn=c) for b in ids]
    return [{"id": b["id"], "dataset": b["dataset"], "task": b["task"], "metric": b["metric"],
             "versions": sum(e["kind"] == "version" for e in b["entries"]), "best": b["best"]}
            for b in boards]


def best_version(bench_id: str, exclude: set[str], *, conn=None) -> dict | None:
    """The artifact row of the benchmark's best measured version of any family, leaving out
    `exclude` (the candidate itself); None when none was measured there."""
    try:
        board = leaderboard(bench_id, conn=conn)
    except NotFound:
        return None
    top = next((e for e in board["entries"]
                if e["kind"] == "version" and e["id"] not in exclude), None)
    return None if top is None else catalog.get_artifact(top["id"], conn=conn)
