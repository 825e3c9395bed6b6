"""The two listing pages of `forge serve`, read from the registry as plain data: the index's
table of every model version (rejected ones included), sorted on the server, and the datasets
page. No HTTP and no HTML here (runner/web/app.py serves them, the templates render them).

The sort key and order come from the query string, so they are caller input: only the keys
of SORT_KEYS and the orders asc/desc are accepted, anything else is an InvalidInput (a 400
page with its fix), never a column name passed on.
"""

from __future__ import annotations

import difflib
import math
import re
from decimal import Decimal
from typing import Any

from runner.errors import InvalidInput
from runner.jobs.hook import improvement
from runner.registry import catalog, ledger, promotion
from trainers.manifest import PRIMARY_METRIC

# column -> what a row is sorted by; None values always sort last. Metrics sort within their
# name: a macro-F1 is never ranked against a masked MSE.
SORT_KEYS = {
    "id": lambda r: r["id"],
    "family": lambda r: r["family"],
    "version": lambda r: r["version_number"],
    "state": lambda r: r["state"],
    "dataset": lambda r: r["dataset"],
    "metric": lambda r: None if r["metric_value"] is None else (r["metric"], r["metric_value"]),
    "delta": lambda r: r["delta"],
    "cost": lambda r: r["cost"],
    "date": lambda r: r["created_at"],
}
ORDERS = ("asc", "desc")
DEFAULT_SORT, DEFAULT_ORDER = "date", "desc"  # the newest version first
_GENES = re.compile(r"(\d[\d,]*) gene")  # "500 genes", "765 gene symbols" in schema_summary


def sort_request(sort: str | None, order: str | None) -> tuple[str, str]:
    """The sort key and order of a query, checked against the whitelist."""
    sort = sort or DEFAULT_SORT
    if sort not in SORT_KEYS:
        close = difflib.get_close_matches(sort, SORT_KEYS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidInput(f"cannot sort by {sort[:40]!r}", field="sort",
                           fix=f"{hint}sort by one of {', '.join(SORT_KEYS)}")
    order = order or ("asc" if sort in ("id", "family", "dataset", "state") else "desc")
    if order not in ORDERS:
        raise InvalidInput(f"order {order[:40]!r} is neither asc nor desc", field="order",
                           fix="order=asc or order=desc")
    return sort, order


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _families(models: list[dict], conn) -> dict[str, str]:
    """id -> family: its metadata's, else the nearest ancestor's (pages.families' rule); an
    ancestor outside `models` is read from the registry."""
    by_id = {m["id"]: m for m in models}
    out: dict[str, str] = {}
    for model in models:
        seen, current = set(), model
        while current is not None and current["id"] not in seen:  # no cycles, but be sure
            seen.add(current["id"])
            family = (current.get("metadata") or {}).get("family")
            if family:
                out[model["id"]] = family
                break
            parent = current["parent_version_id"]
            if parent and parent not in by_id:
                by_id.update(catalog.models_by_id({parent}, conn=conn))
            current = by_id.get(parent)
        out.setdefault(model["id"], "(no family)")
    return out


PER_PAGE = 50  # versions on one page of the index


def page_request(page: str | None) -> int:
    """The page number of a query (1 the first), checked: caller input."""
    if page in (None, ""):
        return 1
    if not page.isdigit() or not 1 <= int(page) <= 10**6:
        raise InvalidInput(f"page {page[:40]!r} is not a page number", field="page",
                           fix="page=1 for the first page, 2 for the next, ...")
    return int(page)


def version_rows(conn, sort: str = DEFAULT_SORT, order: str = DEFAULT_ORDER, page: int = 1,
                 per_page: int = PER_PAGE) -> tuple[list[dict], int]:
    """One page of model versions and how many there are in all: id, family, version, state
    (rejected included), dataset, the primary metric (name, value), its delta against the
    comparator that decided it (the gate's first comparison on that metric: parent, champion
    or baseline; an ungated version: its parent where comparable, else the
    logistic-regression baseline on its split), its training cost and date. Rows without a
    value of the sort key come last. `sort`, `order`: from sort_request().

    The database sorts and pages every key it holds (ix_artifacts_type_created_at serves the
    default, the newest first), so a page reads `per_page` versions; the metric and the delta
    are computed per version, so sorting by them reads every version."""
    total = catalog.count_artifacts("model", conn=conn)
    if sort not in catalog.MODEL_SORTS:
        models = catalog.list_artifacts("model", conn=conn)
        rows = _rows(models, conn)
        present = [r for r in rows if SORT_KEYS[sort](r) is not None]
        absent = [r for r in rows if SORT_KEYS[sort](r) is None]
        present.sort(key=lambda r: (SORT_KEYS[sort](r), r["id"]), reverse=order == "desc")
        return (present + absent)[(page - 1) * per_page:page * per_page], total
    models = catalog.model_page(sort, order, limit=per_page, offset=(page - 1) * per_page,
                                conn=conn)
    return _rows(models, conn), total


def _rows(models: list[dict], conn) -> list[dict]:
    """The index's rows of `models`, in their order: their versions, parents, gate
    comparisons and allocations read in one query each."""
    ids = [m["id"] for m in models]
    parent_ids = {m["parent_version_id"] for m in models if m["parent_version_id"]}
    versions = catalog.models_by_id(set(ids) | parent_ids, conn=conn)
    recorded = promotion.recorded_for(ids, conn=conn)
    allocs = ledger.allocations_by_id({(v["version"] or {}).get("gpu_allocation_id")
                                       for v in versions.values()} - {None}, conn=conn)
    families = _families(list(versions.values()), conn)
    rows = []
    for model in models:
        full = versions[model["id"]]
        version = full["version"] or {}
        meta = model.get("metadata") or {}
        metrics = version.get("eval_metrics_json") or {}
        primary = PRIMARY_METRIC.get(meta.get("task"))
        value = metrics.get(primary) if primary else None
        value = value if _number(value) else None
        dataset = version.get("training_dataset_artifact_id") or \
            version.get("eval_dataset_artifact_id")
        delta, against = _delta(primary, value, full, versions, metrics, dataset,
                                recorded.get(model["id"], []))
        cost = _cost(allocs.get(version.get("gpu_allocation_id")))
        rows.append({
            "id": model["id"], "family": families[model["id"]],
            "version_number": model["version_number"], "state": model["lifecycle_state"],
            "dataset": dataset, "metric": primary if value is not None else None,
            "metric_value": value, "delta": delta, "against": against,
            "cost": cost[0] if cost else None, "currency": cost[1] if cost else None,
            "created_at": model["created_at"]})
    return rows


def _delta(metric: str | None, value: float | None, model: dict, versions: dict,
           metrics: dict, dataset: str | None, recorded: list[dict]) -> tuple:
    """(delta, what it is against) for the index; (None, None) when there is nothing.
    `recorded`: the version's evaluations rows (promotion.recorded)."""
    if value is None:
        return None, None
    for row in recorded:  # the gate's own comparisons
        if row["metric"] == metric and _number(row["delta"]):
            return row["delta"], f"{row['comparator_role']} (gate)"
    parent = versions.get(model["parent_version_id"])
    gain = improvement(metric, value, parent, model.get("metadata") or {}, dataset)
    if gain["magnitude"] is not None:
        return value - gain["parent_value"], "parent"
    base = (metrics.get("baseline") or {}).get(metric)  # hook.split_metrics' baseline_*
    if _number(base):
        return value - base, "baseline"
    return None, None


def _cost(alloc: dict | None) -> tuple[Decimal, str] | None:
    """What the training cost: the settled actual cost, else what is debited so far."""
    if not alloc:
        return None
    amount = alloc.get("actual_cost")
    if amount is None:
        amount = alloc.get("debited")
    return (Decimal(amount), alloc.get("currency") or "credits") if amount is not None else None


def datasets(conn) -> list[dict]:
    """Every registered dataset: id, title, source and external id, license, cells and genes
    where its citation says, the label key its loader reads, and the versions trained on it."""
    trained: dict[str, list[dict]] = {}
    for model in catalog.list_artifacts("model", conn=conn):
        version = catalog.get_model_version(model["id"], conn=conn)["version"] or {}
        used = version.get("training_dataset_artifact_id")
        if used:
            trained.setdefault(used, []).append(model)
    out = []
    for dataset in catalog.list_artifacts("dataset", conn=conn):
        meta = dataset.get("metadata") or {}
        citation = meta.get("citation") or {}
        summary = citation.get("schema_summary")
        genes = _GENES.search(summary) if isinstance(summary, str) else None
        loader = meta.get("loader") or meta.get("load_options") or {}
        out.append({
            "id": dataset["id"], "title": dataset["title"], "source": citation.get("source"),
            "external_id": citation.get("external_id"), "license": citation.get("license"),
            "cells": citation.get("row_count"),
            "genes": int(genes[1].replace(",", "")) if genes else None,
            "label_key": loader.get("label_key"), "format": citation.get("format"),
            "versions": trained.get(dataset["id"], [])})
    return out
