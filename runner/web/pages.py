"""What each page of `forge serve` shows, read from the registry as plain data: no HTTP, no
HTML here (runner/web/app.py serves it, the templates render it).

Every value comes from the registry and is shown as data: the templates escape it, links are
built from validated ids and quoted, and an outside URL becomes a link only when it is
http(s). The MLflow links and the confusion matrix use the operator's tracking config (the
`tracking` group of conf/), never a URI stored with a version.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from runner import tools
from runner.errors import InvalidInput
from runner.jobs.hook import improvement
from runner.jobs.tracking import UI_WORKFLOW, experiment_route  # mlflow: imported lazily there
from runner.registry import audit, catalog, ledger, promotion
from runner.registry import benchmarks as registry_benchmarks
from trainers.manifest import PRIMARY_METRIC

CONFUSION_PNG = "confusion_matrix.png"  # the run artifact launch.py uploads (RUN_OUTPUTS)
MAX_PNG_BYTES = 5 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RUN_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")  # MLflow run ids: 32 hex digits


# --- small rules the templates use ----------------------------------------------------------

def http_url(value: Any) -> str | None:
    """`value` when it is an http(s) URL with a host (fit for an href), else None."""
    if not isinstance(value, str):
        return None
    parts = urlsplit(value)
    return value if parts.scheme in ("http", "https") and parts.netloc else None


def segment(value: Any) -> str:
    """One URL path segment: everything but unreserved characters percent-encoded."""
    return quote(str(value), safe="")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


# --- / : the model families ------------------------------------------------------------------

CANDIDATES_SHOWN = 20  # per family on the index; the rest are counted


def families(conn) -> list[dict]:
    """Per family (metadata.family, which a trained version inherits from its parent), how
    many versions it has, its latest version, the champion of each of its lineages
    (promotion.champion; oldest lineage first) and its candidates (the first
    CANDIDATES_SHOWN, oldest first, and how many more). Read per lineage and through indices,
    never per version."""
    groups: dict[str, list[dict]] = {}
    for lineage in catalog.lineages(conn=conn):
        family = lineage["root"]["family"] or "(no family)"
        groups.setdefault(family, []).append(lineage)
    latest = catalog.newest_by_family(groups, conn=conn)
    champions = promotion.champions(conn=conn)
    candidates: dict[str, list[dict]] = {}
    for model in catalog.in_state("candidate", conn=conn):
        candidates.setdefault(model["family"] or "(no family)", []).append(model)
    out = []
    for name, lineages in sorted(groups.items()):
        waiting = candidates.get(name, [])
        out.append({
            "name": name, "count": sum(lin["count"] for lin in lineages),
            "latest": latest.get(name),
            "champions": [champions[lin["root"]["id"]] for lin in lineages
                          if lin["root"]["id"] in champions],
            "candidates": waiting[:CANDIDATES_SHOWN],
            "more_candidates": max(0, len(waiting) - CANDIDATES_SHOWN)})
    return out


# --- /artifacts/{id} ---------------------------------------------------------------------------

def artifact(artifact_id: str, conn, tracking: dict) -> dict:
    """Everything the detail page shows. Raises InvalidArtifactId or NotFound (a 404)."""
    art = catalog.get_artifact(artifact_id, conn=conn)
    page: dict = {"artifact": art, "metadata": art.get("metadata") or {},
                  "origin_link": http_url(art.get("origin_url"))}
    if art["artifact_type"] == "dataset":
        page["citation"] = _citation(art)
        return page
    if art["artifact_type"] != "model":
        return page
    model = catalog.get_model_version(artifact_id, conn=conn)
    version = model["version"] or {}
    meta = page["metadata"]
    parent = (catalog.get_model_version(art["parent_version_id"], conn=conn)
              if art["parent_version_id"] else None)
    dataset_id = version.get("eval_dataset_artifact_id") or \
        version.get("training_dataset_artifact_id")
    page.update(
        version=version, parent=parent,
        lineage=catalog.lineage(artifact_id, conn=conn),
        children=catalog.children(artifact_id, conn=conn),
        metrics=metric_rows(model, parent, dataset_id),
        training=(version.get("eval_metrics_json") or {}).get("training") or {},
        per_class=per_class_rows(meta),
        cost=_cost(version.get("gpu_allocation_id"), conn),
        datasets=_datasets(version, conn),
        evaluations=promotion.recorded(artifact_id, conn=conn),
        champion=promotion.champion(promotion.lineage_root(model), conn=conn),
        mlflow=mlflow_links(version, meta, tracking))
    return page


def metric_rows(model: dict, parent: dict | None, dataset_id: str | None) -> list[dict]:
    """The version's own metrics (primary first) beside its parent's, where the registry
    deems them comparable (hook.improvement: same metric, dataset and held-out cells), and the
    logistic-regression baseline's on the same split."""
    metrics = (model["version"] or {}).get("eval_metrics_json") or {}
    meta = model.get("metadata") or {}
    primary = PRIMARY_METRIC.get(meta.get("task"))
    baseline = metrics.get("baseline") or {}  # hook.split_metrics: baseline_* without prefix
    rows = []
    for name, value in metrics.items():
        if not _number(value):
            continue
        gain = improvement(name, value, parent, meta, dataset_id)
        theirs = gain.get("parent_value") if gain["magnitude"] is not None else None
        base = baseline.get(name)
        rows.append({"name": name, "value": value, "primary": name == primary,
                     "parent": theirs, "parent_delta": None if theirs is None else value - theirs,
                     "not_comparable": gain["magnitude_reason"],
                     "baseline": base if _number(base) else None,
                     "baseline_delta": value - base if _number(base) else None})
    return sorted(rows, key=lambda r: (not r["primary"], r["name"]))


def per_class_rows(meta: dict) -> list[dict]:
    """Per-class F1 on the held-out cells, the version's beside the baseline's."""
    own = meta.get("per_class_f1") or {}
    base = (meta.get("baseline") or {}).get("per_class_f1") or {}
    return [{"name": name, "f1": own.get(name), "baseline": base.get(name)}
            for name in dict.fromkeys([*(meta.get("class_names") or []), *own])
            if _number(own.get(name))]


def _cost(allocation_id: str | None, conn) -> dict | None:
    return ledger.get_allocation(allocation_id, conn=conn) if allocation_id else None


def _citation(dataset: dict) -> dict:
    citation = dict((dataset.get("metadata") or {}).get("citation") or {})
    citation["link"] = http_url(citation.get("url"))
    doi = citation.get("doi")
    citation["doi_link"] = f"https://doi.org/{quote(doi, safe='/')}" if doi else None
    return citation


def _datasets(version: dict, conn) -> list[dict]:
    """The training and evaluation datasets with their citations (one row when the same)."""
    roles: dict[str, list[str]] = {}
    for role in ("training", "eval"):
        dataset_id = version.get(f"{role}_dataset_artifact_id")
        if dataset_id:
            roles.setdefault(dataset_id, []).append(role)
    out = []
    for dataset_id, used in roles.items():
        dataset = catalog.get_artifact(dataset_id, conn=conn)
        out.append({"artifact": dataset, "roles": used, "citation": _citation(dataset)})
    return out


def mlflow_links(version: dict, meta: dict, tracking: dict) -> dict:
    """The run page and the registered model version in the operator's MLflow UI, and whether
    the confusion matrix can be read: only for a version tracked in the configured store."""
    recorded = (meta.get("mlflow") or {}).get("tracking_uri")
    here = recorded == tracking.get("tracking_uri")
    run_id, experiment_id = version.get("mlflow_run_id"), (meta.get("mlflow") or {}).get(
        "experiment_id")
    ui = http_url(tracking.get("ui_url"))
    name, _, number = (version.get("mlflow_model_uri") or "").removeprefix(
        "models:/").partition("/")
    links = {"tracking_uri": recorded, "same_store": here, "run_id": run_id,
             "model_uri": version.get("mlflow_model_uri"), "run": None, "model_version": None,
             "experiment": None, "experiment_id": experiment_id,
             "confusion_matrix": here and bool(run_id) and meta.get("task") == "finetune_celltype"}
    if here and ui and run_id and experiment_id is not None:
        links["run"] = tracking["mlflow_url"].format(experiment_id=segment(experiment_id),
                                                     run_id=segment(run_id))
        links["experiment"] = f"{ui.rstrip('/')}/{experiment_route(experiment_id)}"
    if here and ui and name and number:
        links["model_version"] = f"{ui.rstrip('/')}/#/models/{segment(name)}/versions/" \
                                 f"{segment(number)}{UI_WORKFLOW}"
    return links


def confusion_run(artifact_id: str, conn, tracking: dict) -> str | None:
    """The MLflow run whose confusion_matrix.png the version shows: a cell-type model's run,
    tracked in the configured store; None otherwise."""
    model = catalog.get_model_version(artifact_id, conn=conn)
    version = model["version"] or {}
    links = mlflow_links(version, model.get("metadata") or {}, tracking)
    ok = links["confusion_matrix"] and _RUN_ID.match(links["run_id"])
    return links["run_id"] if ok else None


def confusion_png(run_id: str, tracking: dict) -> bytes | None:
    """The run's confusion_matrix.png, read through the host's MLflow client from the
    configured store into a folder of our own; None when there is none."""
    from runner.jobs import tracking as mlflow_tracking  # lazy: mlflow, ~2 s, per figure only

    with tempfile.TemporaryDirectory(prefix="forge-web-") as folder:
        try:
            mlflow_tracking.client(tracking["tracking_uri"]).download_artifacts(
                run_id, CONFUSION_PNG, folder)
        except Exception:  # noqa: BLE001 - no such artifact, or the store is away: no figure
            return None
        return _read_png(Path(folder) / CONFUSION_PNG)


def _read_png(path: Path) -> bytes | None:
    """A regular file (no link followed), within the cap, that starts like a PNG."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PNG_BYTES:
            return None
        data = f.read(MAX_PNG_BYTES + 1)
    return data if data.startswith(PNG_SIGNATURE) and len(data) <= MAX_PNG_BYTES else None


# --- /benchmarks ----------------------------------------------------------------------------------

def benchmarks(conn) -> list[dict]:
    return registry_benchmarks.list_benchmarks(conn=conn)


def benchmark(bench_id: str, conn) -> dict:
    """The leaderboard. Raises InvalidArtifactId or NotFound (a 404)."""
    return {"board": registry_benchmarks.leaderboard(bench_id, conn=conn)}


# --- /tools --------------------------------------------------------------------------------------

def skills(conn) -> list[dict]:
    return audit.list_skills(conn=conn)


# The form's fields are train_model_version's declaration (runner/api/train.py TrainArgs),
# less what the page sets itself (a dry run, not verbose) and a sweep's own arguments.
FORM_SKIP = ("dry_run", "verbose", "mlflow_parent_run_id", "code_commit")
# Fields that name a registered artifact: the form offers the registry's ids.
ID_FIELDS = {"parent_artifact_id": "model", "dataset_artifact_id": "dataset"}


def form_fields() -> list[dict]:
    """The dry-run form's fields, derived from the call's declaration (runner.api.declare)."""
    from runner.api import declare  # lazy: the API composes Hydra configs, ~1 s cold
    from runner.api.train import TrainArgs

    return declare.form_fields(TrainArgs, skip=FORM_SKIP)


def tools_form(conn) -> dict:
    """The form: its fields, the id fields with the registry's artifacts to pick from (none
    when `conn` is None: the registry is away, and the ids are typed)."""
    fields = []
    for field in form_fields():
        kind = ID_FIELDS.get(field["name"])
        options = [] if kind is None or conn is None else [
            {"id": a["id"], "label": f"{a['title']} (v{a['version_number']}, "
                                     f"{a['lifecycle_state']})"}
            for a in catalog.list_artifacts(kind, conn=conn)]
        fields.append({**field, "options": options})
    return {"fields": fields}


WEB_CALLER = "web"  # the page's own name in tool_calls: with no login, it speaks for no agent
# What a dry run says about the named agent's account (that it has one, what is in it).
ACCOUNT_REASONS = ("insufficient_balance", "unknown_agent")


def dry_run(form: dict[str, str], *, show_balances: bool = False) -> dict:
    """train_model_version(..., dry_run=True) on the form's fields (strings), audited as the
    page's (`web`). Malformed input raises its typed ForgeError, as the call does; writes
    nothing but the call's audit row. Without `show_balances` (the operator's flag), the
    agent's account is left out: its balance, and the reasons that tell of it."""
    from runner.api import train_model_version  # lazy: composes Hydra configs, ~1 s cold

    fields = form_fields()
    names = [f["name"] for f in fields]
    unknown = sorted(set(form) - set(names))
    if unknown:
        raise InvalidInput(f"unknown fields: {', '.join(unknown)}", field=unknown[0],
                           fix=f"use only {', '.join(names)}")
    arguments = {}
    for field in fields:  # a field left empty is the declaration's default (conf/'s)
        value = _field_value(form, field)
        if value is not None or field["required"]:
            arguments[field["name"]] = value
    with tools.audited_as(WEB_CALLER):
        result = train_model_version(**arguments, dry_run=True)
    return result if show_balances else _without_account(result)


def _field_value(form: dict[str, str], field: dict) -> Any:
    """A form field's text as the call's argument: an integer, a flag, lines, a string or
    None when left empty (what does not parse is passed as typed, for the call to refuse)."""
    text = (form.get(field["name"]) or "").strip()
    if field["kind"] == "list":
        return [line.strip() for line in text.splitlines() if line.strip()] or None
    if field["kind"] == "bool":
        return text.lower() in ("on", "true", "1", "yes") if text else None
    if not text:
        return None
    return _count(form, field["name"], None) if field["kind"] == "int" else text


def _without_account(result: dict) -> dict:
    """The dry run minus the agent's account: `would_launch` then means "but for the
    balance", which the real call checks when it debits."""
    reasons = [r for r in result["reasons"] if r.get("reason") not in ACCOUNT_REASONS]
    return {**result, "balance": None, "balance_hidden": True, "reasons": reasons,
            "would_launch": not reasons}


def _count(form: dict[str, str], name: str, default: int) -> Any:
    """A cap from the form: an integer when it reads as one, else the text as typed, which
    the call refuses with its own typed error (InvalidInput on `name`)."""
    text = (form.get(name) or "").strip()
    if not text:
        return default
    return int(text) if text.isascii() and text.isdigit() else text

