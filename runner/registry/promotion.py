"""The eval gate's decision in the registry (SciDEX WS4): who the champion is, what was
decided, and `record_decision`, which writes a decision in ONE transaction: the
`evaluations` rows, the version's benchmark, the lifecycle flip (promoted: the candidate
becomes the lineage's latest and `active`, the parent and the old champion `superseded` by
it; rejected: `rejected`), the `artifact_lifecycle_history` rows, the settlement of the
evaluation's allocation, the `world_model_improvements` row (payable only for a promotion
with a magnitude > 0: improvements.payout) and the event.

A lineage is a root model and every version whose base_model_id is that root. Its champion
is the one version with is_latest set. Gates of one lineage serialise on the root's row
(SELECT ... FOR UPDATE on PostgreSQL; SQLite's write transactions are serial already), and a
decision made against a champion that has moved since is refused: two candidates of one
parent never both become latest.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from runner.errors import GateRefused
from runner.registry import catalog, improvements, ledger
from runner.registry.db import now, rows_where_in, transaction
from runner.registry.schema import (
    artifacts,
    evaluations,
    events,
    model_versions,
)

PROMOTED_EVENT, REJECTED_EVENT = improvements.PROMOTED, improvements.REJECTED


def lineage_root(model: dict) -> str:
    """The root of a model's lineage: its base model, or itself."""
    return (model.get("version") or {}).get("base_model_id") or model["id"]


def champion(root_id: str, *, conn=None) -> dict | None:
    """The lineage's latest model (its artifact row), or None."""
    members = sa.select(model_versions.c.artifact_id).where(
        model_versions.c.base_model_id == root_id)
    with transaction(conn) as c:
        rows = c.execute(sa.select(artifacts).where(
            artifacts.c.is_latest.is_(True), artifacts.c.artifact_type == "model",
            sa.or_(artifacts.c.id == root_id, artifacts.c.id.in_(members)))
            .order_by(artifacts.c.created_at.desc())).mappings().all()
    return dict(rows[0]) if rows else None


def champions(*, conn=None) -> dict[str, dict]:
    """lineage root -> its champion (champion()'s, its catalog.BRIEF columns), for every
    lineage in one read of the latest models (ix_artifacts_type_is_latest; each one's root
    looked up by primary key)."""
    base = (sa.select(model_versions.c.base_model_id)
            .where(model_versions.c.artifact_id == artifacts.c.id).scalar_subquery())
    out: dict[str, dict] = {}
    with transaction(conn) as c:
        for r in c.execute(sa.select(*catalog.BRIEF, sa.func.coalesce(base, artifacts.c.id)
                                     .label("root"))
                           .where(artifacts.c.is_latest.is_(True),
                                  artifacts.c.artifact_type == "model")
                           .order_by(artifacts.c.created_at.desc())).mappings():
            model = dict(r)
            out.setdefault(model.pop("root"), model)
    return out


def recorded(candidate_id: str, *, conn=None) -> list[dict]:
    """The evaluations rows of a gated candidate (empty: never gated)."""
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(
            sa.select(evaluations).where(evaluations.c.candidate_artifact_id == candidate_id)
            .order_by(evaluations.c.created_at, evaluations.c.id)).mappings()]


def recorded_for(candidate_ids, *, conn=None) -> dict[str, list[dict]]:
    """candidate id -> its evaluations rows (recorded's), for many candidates in one read."""
    out: dict[str, list[dict]] = {}
    query = sa.select(evaluations).order_by(evaluations.c.created_at, evaluations.c.id)
    with transaction(conn) as c:
        for r in rows_where_in(c, query, evaluations.c.candidate_artifact_id, candidate_ids):
            out.setdefault(r["candidate_artifact_id"], []).append(r)
    return out


def record_decision(*, candidate_id: str, champion_id: str | None, decision: str,
                    notes: str, rows: list[dict], gate_name: str, gate_config: dict,
                    gate_sha256: str, agent_id: str, allocation_id: str,
                    actual_seconds: float, magnitude: float | None, detection: dict,
                    benchmark_id: str | None = None) -> dict:
    """Write the decision; returns the candidate's new artifact row. `rows` are the
    comparisons (comparator_artifact_id, comparator_role, metric, values, delta, CI, ...);
    `benchmark_id` the benchmark they measured it on (registry.benchmarks), recorded with it.
    Raises GateRefused (nothing written) when the candidate was decided meanwhile or the
    lineage's champion is no longer `champion_id`."""
    with transaction() as c:
        cand = catalog.get_model_version(candidate_id, conn=c)
        root = lineage_root(cand)
        _lock(c, root)
        cand = catalog.get_model_version(candidate_id, conn=c)  # as of the lock
        if cand["version"]["promotion_state"] != "candidate":
            raise GateRefused(f"{candidate_id!r} was decided meanwhile: "
                              f"{cand['version']['promotion_state']}",
                              field="candidate_artifact_id",
                              reason="already_gated", fix="read its recorded decision: gate it "
                              "again with the same gate")
        current = champion(root, conn=c)
        if (current or {}).get("id") != champion_id:
            raise GateRefused(
                f"the champion of {root!r} moved from {champion_id!r} to "
                f"{(current or {}).get('id')!r} while {candidate_id!r} was evaluated",
                field="candidate_artifact_id", reason="champion_changed",
                fix="gate it again: it is then compared against the new champion")
        stamp = now()
        c.execute(evaluations.insert(), [dict(
            id=f"eval-{uuid.uuid4().hex}", candidate_artifact_id=candidate_id,
            gate_name=gate_name, gate_config=gate_config, gate_config_sha256=gate_sha256,
            decision=decision, allocation_id=allocation_id, agent_id=agent_id,
            created_at=stamp, **row) for row in rows])
        c.execute(model_versions.update().where(model_versions.c.artifact_id == candidate_id)
                  .values(benchmark_id=benchmark_id))
        if decision == "promoted":
            catalog.set_lifecycle(c, cand, "active", stamp, agent_id, notes, is_latest=True,
                       promotion_state="promoted", notes=notes)
            losers = {r["id"]: r for r in (_model(c, cand["parent_version_id"]), current)
                      if r is not None and r["id"] != candidate_id}
            for loser in losers.values():
                if loser["lifecycle_state"] in ("active", "candidate") or loser["is_latest"]:
                    catalog.set_lifecycle(c, loser, "superseded", stamp, agent_id,
                               f"superseded by {candidate_id}", is_latest=False,
                               superseded_by=candidate_id, promotion_state="superseded")
        else:
            catalog.set_lifecycle(c, cand, "rejected", stamp, agent_id, notes,
                                  promotion_state="rejected",
                       notes=notes)
        event = PROMOTED_EVENT if decision == "promoted" else REJECTED_EVENT
        # settled first: the improvement row carries what the evaluation cost
        alloc = ledger.settle(allocation_id, actual_seconds, status="settled",
                              artifact_id=candidate_id, conn=c)
        # the version's trainer is credited; whoever decided (its owner or the operator) and
        # the training's allocation (its cost is on the trained row) are named beside
        trainer = cand["version"].get("trained_by") or agent_id
        detection = {**detection, "decided_by": agent_id,
                     "training_allocation_id": cand["version"].get("gpu_allocation_id")}
        improvements.record(c, event_type=event, target_artifact_id=candidate_id,
                            magnitude=magnitude, detection=detection, agent_id=trainer,
                            allocation_id=allocation_id, cost=alloc["actual_cost"], stamp=stamp)
        c.execute(events.insert().values(
            id=f"evt-{uuid.uuid4().hex}", type=event, source="forge-runner", created_at=stamp,
            payload={"artifact_id": candidate_id, "decision": decision, "gate": gate_name,
                     "notes": notes, **detection}))
        return catalog.get_artifact(candidate_id, conn=c)


def _lock(conn, root_id: str) -> None:
    """Serialise gates of one lineage on its root's row."""
    query = sa.select(artifacts.c.id).where(artifacts.c.id == root_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    conn.execute(query).first()


def _model(conn, artifact_id: str | None) -> dict | None:
    if artifact_id is None:
        return None
    return catalog.get_artifact(artifact_id, conn=conn)
