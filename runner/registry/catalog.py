"""The artifact catalog (SciDEX `artifact_catalog`): the only code that writes `artifacts` and
`model_versions`, the eval gate's lifecycle moves included (`set_lifecycle`). Every
registration validates first and writes all its rows in one transaction, so a failure
leaves nothing behind. A version trained here is registered with
its publication (`register_trained_version`: the `world_model_improvements` and `events`
rows) in that same transaction.
"""

from __future__ import annotations

import functools
import json
import uuid
from datetime import datetime
from decimal import Decimal
from importlib import resources
from typing import Any

import sqlalchemy as sa

from runner.errors import Conflict, InvalidArtifactId, NotFound, SchemaViolation, WrongArtifactType
from runner.registry import improvements
from runner.registry.db import now, rows_where_in, transaction
from runner.registry.db import row as _row
from runner.registry.ids import ARTIFACT_ID, SHA256
from runner.registry.schema import (
    artifact_lifecycle_history,
    artifact_links,
    artifacts,
    events,
    model_versions,
    resource_allocations,
)

TRAINED_EVENT = improvements.TRAINED


def validate_artifact_id(value: Any, field: str = "artifact_id") -> str:
    """Check an id before it touches a path or a query."""
    if not isinstance(value, str) or not ARTIFACT_ID.match(value):
        shown = repr(value)[:60]
        raise InvalidArtifactId(
            f"{field} {shown} is not a valid artifact id",
            field=field,
            fix="use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit "
                "(no slashes, quotes, spaces or '..' prefixes)",
        )
    return value


@functools.cache
def _schema(name: str) -> dict:
    return json.loads(resources.files("runner.registry").joinpath("schemas", name).read_text())


def validate_json(document: Any, schema_name: str, field: str) -> None:
    import jsonschema  # lazy: ~30 ms, not on the dry run's path

    errors = sorted(jsonschema.Draft202012Validator(_schema(schema_name)).iter_errors(document),
                    key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = ".".join([field, *map(str, err.absolute_path)])
        if err.validator == "required":
            missing = [k for k in err.validator_value if k not in (err.instance or {})]
            where = ".".join([field, *map(str, err.absolute_path), missing[0]])
        raise SchemaViolation(f"{where}: {err.message}", field=where,
                              fix=f"make {where} satisfy runner/registry/schemas/{schema_name}")


# --- reads ------------------------------------------------------------------------------------

def get_artifact(artifact_id: str, *, conn=None, kind: str | None = None,
                 field: str = "artifact_id") -> dict:
    """The artifact row; NotFound (with the closest registered ids of `kind`, any kind when
    None) when there is none."""
    validate_artifact_id(artifact_id, field)
    with transaction(conn) as c:
        row = _row(c.execute(sa.select(artifacts).where(artifacts.c.id == artifact_id)))
        if row is None:
            raise not_found(artifact_id, kind, field, conn=c)
    return row


_LISTS = {"model": "forge models list", "dataset": "forge datasets list"}


def not_found(artifact_id: str, kind: str | None, field: str = "artifact_id", *,
              conn=None) -> NotFound:
    """NotFound for `artifact_id`, its fix naming the registered ids of `kind` closest to it
    (difflib), and the command that lists them."""
    import difflib  # lazy: the error path only

    query = sa.select(artifacts.c.id)
    if kind is not None:
        query = query.where(artifacts.c.artifact_type == kind)
    with transaction(conn) as c:
        ids = list(c.execute(query).scalars())
    close = difflib.get_close_matches(artifact_id, ids, n=3, cutoff=0.6)
    lists = _LISTS.get(kind or "", " / ".join(_LISTS.values()))
    what = f"{kind} {artifact_id!r}" if kind else f"artifact {artifact_id!r}"
    if close:
        fix = f"did you mean {' or '.join(map(repr, close))}? (all of them: {lists})"
    else:
        fix = f"register it first, or pick a registered one: {lists}"
    return NotFound(f"{what} does not exist", field=field, fix=fix,
                    did_you_mean=close or None)


def get_model_version(artifact_id: str, *, conn=None) -> dict:
    """The artifact row and its model_versions row, merged under `version`."""
    with transaction(conn) as c:
        art = get_artifact(artifact_id, conn=c, kind="model")
        _require_type(art, "model", "artifact_id")
        mv = _row(c.execute(sa.select(model_versions)
                            .where(model_versions.c.artifact_id == artifact_id)))
    return {**art, "version": mv}


def lineage(artifact_id: str, *, conn=None) -> list[dict]:
    """Ancestors of `artifact_id` and itself, root first, in one recursive query."""
    validate_artifact_id(artifact_id)
    chain = sa.select(artifacts.c.id, artifacts.c.parent_version_id, sa.literal(0).label("depth")) \
        .where(artifacts.c.id == artifact_id).cte("chain", recursive=True)
    up = artifacts.alias("up")
    chain = chain.union_all(
        sa.select(up.c.id, up.c.parent_version_id, (chain.c.depth + 1).label("depth"))
        .join(chain, up.c.id == chain.c.parent_version_id))
    query = (sa.select(artifacts.c.id, artifacts.c.title, artifacts.c.artifact_type,
                       artifacts.c.version_number, artifacts.c.lifecycle_state,
                       artifacts.c.parent_version_id, artifacts.c.origin_type, chain.c.depth)
             .join(chain, chain.c.id == artifacts.c.id).order_by(chain.c.depth.desc()))
    with transaction(conn) as c:
        rows = [dict(r) for r in c.execute(query).mappings()]
    if not rows:
        get_artifact(artifact_id)  # raises NotFound
    return rows


def list_artifacts(artifact_type: str, *, conn=None) -> list[dict]:
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(
            sa.select(artifacts).where(artifacts.c.artifact_type == artifact_type)
            .order_by(artifacts.c.created_at, artifacts.c.id)).mappings()]


def list_model_versions(*, limit: int | None = None, offset: int = 0, conn=None) -> list[dict]:
    """Model artifacts, newest first (rejected and candidate versions included), each with its
    model_versions row's promotion state, dataset, metrics and trainer merged in (None for one
    without). `limit`, `offset`: one page of them, read through ix_artifacts_type_created_at
    (migration 0009); no limit reads them all."""
    query = (sa.select(artifacts, model_versions.c.promotion_state,
                       model_versions.c.training_dataset_artifact_id,
                       model_versions.c.eval_metrics_json, model_versions.c.trained_by)
             .outerjoin(model_versions, model_versions.c.artifact_id == artifacts.c.id)
             .where(artifacts.c.artifact_type == "model")
             .order_by(artifacts.c.created_at.desc(), artifacts.c.id)
             .limit(limit).offset(offset or None))
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(query).mappings()]


# The keys a page of model versions can be sorted by in the database (the web index's): each
# its SQL expression; text in code-point order (COLLATE "C" on PostgreSQL), as Python sorts.
MODEL_SORTS = ("id", "family", "version", "state", "dataset", "cost", "date")
_TEXT_SORTS = ("id", "family", "state", "dataset")


def _sort_key(sort: str, dialect: str):
    a, mv, alloc = artifacts.c, model_versions.c, resource_allocations.c
    key = {"id": a.id, "family": a.metadata["family"].as_string(), "version": a.version_number,
           "state": a.lifecycle_state, "date": a.created_at,
           "dataset": sa.func.coalesce(mv.training_dataset_artifact_id,
                                       mv.eval_dataset_artifact_id),
           "cost": sa.func.coalesce(alloc.actual_cost, alloc.debited)}[sort]
    return sa.collate(key, "C") if dialect == "postgresql" and sort in _TEXT_SORTS else key


def model_page(sort: str, order: str, *, limit: int, offset: int = 0, conn=None) -> list[dict]:
    """One page of model artifacts sorted by `sort` (one of MODEL_SORTS: family is
    metadata.family, dataset the training else the evaluation dataset, cost the allocation's
    actual cost else its debit) in `order` ('asc' or 'desc'), ties by id in the same order.
    Rows without a value come last, oldest first. The newest first reads
    ix_artifacts_type_created_at (migration 0009)."""
    a = artifacts.c
    direction = sa.desc if order == "desc" else sa.asc
    with transaction(conn) as c:
        key = _sort_key(sort, c.dialect.name)
        ordering = [direction(key), direction(a.id)]
        if sort in ("family", "dataset", "cost"):  # nullable
            ordering = [key.is_(None), direction(key),
                        direction(sa.case((key.is_(None), None), else_=a.id)),
                        a.created_at, a.id]
        query = (sa.select(artifacts)
                 .outerjoin(model_versions, model_versions.c.artifact_id == a.id)
                 .outerjoin(resource_allocations,
                            resource_allocations.c.id == model_versions.c.gpu_allocation_id)
                 .where(a.artifact_type == "model").order_by(*ordering)
                 .limit(limit).offset(offset or None))
        return [dict(r) for r in c.execute(query).mappings()]


def models_by_id(ids, *, conn=None) -> dict[str, dict]:
    """id -> the artifact row with its model_versions row under `version` (None for one
    without), for those of `ids` that exist; a bounded IN list at a time."""
    with transaction(conn) as c:
        arts = {r["id"]: r for r in rows_where_in(c, sa.select(artifacts), artifacts.c.id, ids)}
        mvs = {r["artifact_id"]: r for r in rows_where_in(
            c, sa.select(model_versions), model_versions.c.artifact_id, arts)}
    return {i: {**art, "version": mvs.get(i)} for i, art in arts.items()}


# What a link to a model shows (the web's model_link): lists of many models read only these.
BRIEF = (artifacts.c.id, artifacts.c.title, artifacts.c.version_number,
         artifacts.c.lifecycle_state, artifacts.c.created_at)


def _family():
    return artifacts.c.metadata["family"].as_string().label("family")


def newest_by_family(families, *, conn=None, batch: int = 200) -> dict[str, dict]:
    """family (metadata.family) -> its newest model (by created_at, then version number; its
    BRIEF columns), for each of `families`: the newest models read a batch at a time down
    ix_artifacts_type_created_at until every family has one (a family of old versions only
    reads further)."""
    wanted, out = set(families), {}
    offset = 0
    with transaction(conn) as c:
        while wanted - set(out):
            page = c.execute(sa.select(*BRIEF, _family())
                             .where(artifacts.c.artifact_type == "model")
                             .order_by(artifacts.c.created_at.desc(),
                                       artifacts.c.version_number.desc())
                             .limit(batch).offset(offset)).mappings().all()
            if not page:
                break
            for model in page:
                if model["family"] in wanted:
                    out.setdefault(model["family"], dict(model))
            offset += batch
            batch = min(batch * 4, 20_000)
    return out


def lineages(*, conn=None) -> list[dict]:
    """Every lineage of models, oldest first: its root (a model without a parent: its BRIEF
    columns and metadata.family under `family`) and how many versions it has (the roots read
    on the parent_version_id index, the members counted on the base_model_id index)."""
    mv = model_versions.c
    with transaction(conn) as c:
        roots = c.execute(sa.select(*BRIEF, _family()).where(
            artifacts.c.artifact_type == "model", artifacts.c.parent_version_id.is_(None))
            .order_by(artifacts.c.created_at, artifacts.c.id)).mappings().all()
        members = dict(c.execute(sa.select(mv.base_model_id, sa.func.count())
                                 .where(mv.base_model_id.is_not(None))
                                 .group_by(mv.base_model_id)).all())
    return [{"root": dict(r), "count": 1 + members.get(r["id"], 0)} for r in roots]


def in_state(state: str, *, conn=None) -> list[dict]:
    """The models in lifecycle `state` (ix_artifacts_type_lifecycle_state), oldest first: their
    BRIEF columns and their metadata.family under `family`."""
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(
            sa.select(*BRIEF, _family()).where(artifacts.c.artifact_type == "model",
                                               artifacts.c.lifecycle_state == state)
            .order_by(artifacts.c.created_at, artifacts.c.id)).mappings()]


def children(artifact_id: str, *, conn=None) -> list[dict]:
    """The models whose parent is `artifact_id`, oldest first (the parent_version_id index)."""
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(
            sa.select(artifacts).where(artifacts.c.parent_version_id == artifact_id,
                                       artifacts.c.artifact_type == "model")
            .order_by(artifacts.c.created_at, artifacts.c.id)).mappings()]


def count_artifacts(artifact_type: str, *, conn=None) -> int:
    """How many artifacts of `artifact_type` there are (an index-only count)."""
    with transaction(conn) as c:
        return c.execute(sa.select(sa.func.count()).select_from(artifacts)
                         .where(artifacts.c.artifact_type == artifact_type)).scalar_one()


def _require_type(row: dict, expected: str, field: str) -> None:
    if row["artifact_type"] != expected:
        raise WrongArtifactType(
            f"{field} {row['id']!r} is a {row['artifact_type']}, not a {expected}", field=field,
            fix=f"pass the id of a {expected} artifact")


# --- writes -----------------------------------------------------------------------------------

def register_dataset(artifact_id: str, title: str, citation: dict, *, created_by: str = "forge",
                     metadata: dict | None = None, conn=None) -> dict:
    """Register a dataset artifact with its citation. Re-registering the same content is a no-op."""
    validate_artifact_id(artifact_id)
    validate_json(citation, "dataset_citation.schema.json", "citation")
    with transaction(conn) as c:
        existing = _row(c.execute(sa.select(artifacts).where(artifacts.c.id == artifact_id)))
        if existing:
            if existing["content_hash"] != citation["sha256"]:
                raise Conflict(f"dataset {artifact_id!r} is already registered with other content",
                               field="citation.sha256",
                               fix="register the new data under a new id")
            return existing
        row = dict(id=artifact_id, artifact_type="dataset", title=title, version_number=1,
                   is_latest=True, lifecycle_state="active", lifecycle_changed_at=now(),
                   origin_type="external", origin_url=citation["url"],
                   content_hash=citation["sha256"],
                   metadata={**(metadata or {}), "citation": citation},
                   created_by=created_by, created_at=now())
        c.execute(artifacts.insert().values(**row))
    return row


def register_model(*, title: str, metadata: dict, created_by: str,
                   artifact_id: str | None = None,
                   parent_artifact_id: str | None = None,
                   training_dataset_artifact_id: str | None = None,
                   eval_dataset_artifact_id: str | None = None,
                   origin_type: str = "internal", origin_url: str | None = None,
                   content_hash: str | None = None, changelog: str | None = None,
                   version: dict | None = None, conn=None) -> dict:
    """Register a model artifact and its model_versions row.

    Without a parent: a base model, version 1, `active` and latest (external models carry
    `origin_url` and the sha256 of their weights). With a parent: a trained version,
    version_number = parent + 1, `candidate`, not latest, linked `derives_from` the parent and
    `trained_on` the training dataset. `version` holds the model_versions columns
    (code_commit_sha, gpu_allocation_id, eval_metrics_json, mlflow_run_id, ...).
    Pass `conn` to make this part of a larger transaction.
    """
    if artifact_id is not None:
        validate_artifact_id(artifact_id)
    for field, value in (("parent_artifact_id", parent_artifact_id),
                         ("training_dataset_artifact_id", training_dataset_artifact_id),
                         ("eval_dataset_artifact_id", eval_dataset_artifact_id)):
        if value is not None:
            validate_artifact_id(value, field)
    if origin_type not in ("internal", "external"):
        raise SchemaViolation(f"origin_type {origin_type!r} is not internal or external",
                              field="origin_type", fix="use 'internal' or 'external'")
    if origin_type == "external" and not origin_url:
        raise SchemaViolation("an external model needs origin_url", field="origin_url",
                              fix="pass the file:// or https:// URL its weights come from")
    if content_hash is not None and not SHA256.match(content_hash):
        raise SchemaViolation("content_hash is not a lowercase sha256 hex digest",
                              field="content_hash", fix="pass hashlib.sha256(weights).hexdigest()")
    validate_json(metadata, "model_metadata.schema.json", "metadata")
    version = dict(version or {})
    unknown = set(version) - set(model_versions.c.keys())
    if unknown:
        raise SchemaViolation(f"unknown model_versions fields {sorted(unknown)}",
                              field=f"version.{sorted(unknown)[0]}",
                              fix=f"use only {sorted(model_versions.c.keys())}")

    with transaction(conn) as c:
        parent = None
        if parent_artifact_id is not None:
            parent = get_artifact(parent_artifact_id, conn=c, kind="model",
                                  field="parent_artifact_id")
            _require_type(parent, "model", "parent_artifact_id")
        for field, value in (("training_dataset_artifact_id", training_dataset_artifact_id),
                             ("eval_dataset_artifact_id", eval_dataset_artifact_id)):
            if value is not None:
                _require_type(get_artifact(value, conn=c, kind="dataset", field=field),
                              "dataset", field)

        if parent is not None and origin_type == "internal":
            _require_training_record(version, content_hash)
        number = parent["version_number"] + 1 if parent else 1
        new_id = artifact_id or f"{metadata['family']}-v{number}-{uuid.uuid4().hex[:8]}"
        if _row(c.execute(sa.select(artifacts.c.id).where(artifacts.c.id == new_id))):
            raise Conflict(f"artifact {new_id!r} already exists", field="artifact_id",
                           fix="choose another id, or read the existing one")
        stamp = now()
        trained = parent is not None
        row = dict(id=new_id, artifact_type="model", title=title, version_number=number,
                   parent_version_id=parent_artifact_id, version_tag=f"v{number}",
                   changelog=changelog, is_latest=not trained,
                   lifecycle_state="candidate" if trained else "active",
                   lifecycle_changed_at=stamp, origin_type=origin_type, origin_url=origin_url,
                   content_hash=content_hash, metadata=metadata, created_by=created_by,
                   created_at=stamp)
        c.execute(artifacts.insert().values(**row))
        mv = dict(artifact_id=new_id, is_external=origin_type == "external",
                  external_source_url=origin_url if origin_type == "external" else None,
                  base_model_id=_lineage_root(c, parent_artifact_id),
                  training_dataset_artifact_id=training_dataset_artifact_id,
                  eval_dataset_artifact_id=eval_dataset_artifact_id,
                  promotion_state="candidate" if trained else "promoted",
                  trained_by=created_by if trained else None, created_at=stamp)
        mv.update(version)
        c.execute(model_versions.insert().values(**mv))
        _write_links(c, new_id, parent_artifact_id, training_dataset_artifact_id, stamp)
    return {**row, "version": mv}


def register_trained_version(*, parent_artifact_id: str | None, dataset_artifact_id: str,
                             artifact_id: str, title: str, metadata: dict, created_by: str,
                             content_hash: str, changelog: str | None, version: dict,
                             magnitude: float | None, detection: dict, cost: Decimal | None,
                             conn=None) -> dict:
    """Register a version trained here and publish it, in one transaction: the artifact, its
    model_versions row and links (`register_model`, trained on and evaluated on
    `dataset_artifact_id`), a `world_model_improvements` row of `magnitude` (None when the
    parent is not comparable) with `detection` as its metadata, crediting `created_by` with
    the work of the allocation `version["gpu_allocation_id"]`, settled at `cost` (never
    payable itself: improvements.payout), and a `model_version_trained` event carrying the
    version, its metrics and `detection`. Pass `conn` to add more to the transaction (the hook
    settles the allocation in it)."""
    with transaction(conn) as c:
        model = register_model(
            artifact_id=artifact_id, title=title, metadata=metadata, created_by=created_by,
            parent_artifact_id=parent_artifact_id,
            training_dataset_artifact_id=dataset_artifact_id,
            eval_dataset_artifact_id=dataset_artifact_id, origin_type="internal",
            content_hash=content_hash, changelog=changelog, version=version, conn=c)
        stamp = now()
        improvements.record(c, event_type=TRAINED_EVENT, target_artifact_id=model["id"],
                            magnitude=magnitude, detection=detection, agent_id=created_by,
                            allocation_id=version.get("gpu_allocation_id"), cost=cost,
                            stamp=stamp)
        c.execute(events.insert().values(
            id=f"evt-{uuid.uuid4().hex}", type=TRAINED_EVENT, source="forge-runner",
            created_at=stamp,
            payload={"artifact_id": model["id"], "version_number": model["version_number"],
                     "parent_artifact_id": parent_artifact_id,
                     "eval_metrics": version.get("eval_metrics_json"), **detection}))
    return model


def set_lifecycle(conn, art: dict, state: str, stamp: datetime, actor: str, reason: str, *,
                  promotion_state: str, notes: str | None = None, is_latest: bool | None = None,
                  superseded_by: str | None = None) -> None:
    """Move a model to lifecycle `state` and promotion_state inside the caller's transaction,
    with its `artifact_lifecycle_history` row (the eval gate's decisions)."""
    values = {"lifecycle_state": state, "lifecycle_changed_at": stamp}
    if is_latest is not None:
        values["is_latest"] = is_latest
    if superseded_by is not None:
        values["superseded_by"] = superseded_by
    conn.execute(artifacts.update().where(artifacts.c.id == art["id"]).values(**values))
    version = {"promotion_state": promotion_state}
    if notes is not None:
        version["promotion_notes"] = notes
    conn.execute(model_versions.update()
                 .where(model_versions.c.artifact_id == art["id"]).values(**version))
    conn.execute(artifact_lifecycle_history.insert().values(
        id=f"alh-{uuid.uuid4().hex}", artifact_id=art["id"], old_state=art["lifecycle_state"],
        new_state=state, reason=reason[:2000], actor_id=actor,
        metadata={"promotion_state": promotion_state, "superseded_by": superseded_by},
        created_at=stamp))


# What a version trained here must carry (SciDEX WS3): the code it ran, the compute that
# paid for it, what it scored, and the hash of the weights it produced.
WS3_FIELDS = ("code_repo_url", "code_commit_sha", "gpu_allocation_id", "eval_metrics_json")


def _require_training_record(version: dict, content_hash: str | None) -> None:
    missing = [k for k in WS3_FIELDS if not version.get(k)]
    if not content_hash:
        missing.append("content_hash")
    if missing:
        raise SchemaViolation(
            f"a trained version needs {', '.join(missing)}", field=missing[0],
            fix="register a version trained here with its code pin, allocation, metrics and "
                "weights hash; register outside weights as origin_type='external'")


def _lineage_root(conn, parent_id: str | None) -> str | None:
    """The first model of the lineage: the parent's own base, or the parent if it has none."""
    if parent_id is None:
        return None
    base = conn.execute(sa.select(model_versions.c.base_model_id)
                        .where(model_versions.c.artifact_id == parent_id)).scalar_one_or_none()
    return base or parent_id


def _write_links(conn, new_id: str, parent_id: str | None, dataset_id: str | None,
                 stamp: datetime) -> None:
    links = [(parent_id, "derives_from"), (dataset_id, "trained_on")]
    rows = [dict(source_id=new_id, target_id=target, link_type=kind, created_at=stamp)
            for target, kind in links if target is not None]
    if rows:
        conn.execute(artifact_links.insert(), rows)


def links(artifact_id: str, *, conn=None) -> list[dict]:
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(
            sa.select(artifact_links).where(artifact_links.c.source_id == artifact_id)
            .order_by(artifact_links.c.link_type)).mappings()]
