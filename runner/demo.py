"""`make demo`: the pilot, on the embedded defaults (SQLite registry and MLflow store under
FORGE_HOME), for three model families on CBMC's cells.

1. migrate the registry; register the CBMC and pbmc68k datasets with their citations;
2. grant the agent `demo-agent` credits;
3. per family (scgpt, scvi, linear), once: train its base from scratch through the same plan
   -> debit -> sandbox -> register path as every job, as version 1 (scGPT: masked gene
   modelling; scvi: SCVI, unsupervised; linear: logistic regression on log1p counts, a
   classifier already);
4. fine-tune each base for cell types with train_model_version() into a candidate version 2
   (scGPT's cell-type head; scANVI from the SCVI base; the linear base warm-started);
5. gate each candidate with evaluate_candidate() (conf/gate/default.yaml): evaluated in the
   sandbox, by its own family's code, on its held-out cells against its parent, or, when the
   parent cannot classify cells, against the logistic-regression baseline refitted on the
   same split; the paired bootstrap's CI decides promoted or rejected;
6. print one table (family, version, test accuracy, macro-F1, cost, the gate's decision
   against its comparator) and the commands that open the MLflow UI and forge serve.

A second run reuses the bases and gets the same requests' earlier results back.

`python -m runner.demo smoke` (`make demo DEMO=smoke`) runs the same steps on the same
defaults, sized to a minute or two on 2 cores: bases of their own (one short epoch) and
one-epoch fine-tunes. CI runs it in a fresh clone to prove the main command works there.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from decimal import Decimal

from rich.console import Console

from runner import settings
from runner.api import SKILLS, evaluate_candidate, train_model_version
from runner.config.compose import compose_config, to_plain
from runner.errors import ForgeError, NotFound
from runner.jobs.datasets import BUILTINS, builtin_citation
from runner.jobs.gate import decision_text
from runner.jobs.launch import launch
from runner.jobs.plan import TrainRequest, prepare
from runner.registry import catalog, db, ledger
from runner.tools import register_tools

AGENT = "demo-agent"
DATASET = "dataset-geo-GSE100866"
DATASETS = {DATASET: ("cbmc", "CBMC CITE-seq, 8,617 cord blood cells"),
            "dataset-10x-pbmc68k-reduced": ("pbmc68k_reduced", "PBMC 68k (reduced), 700 cells")}
CREDITS = Decimal("20")


@dataclass(frozen=True)
class Pilot:
    """One family's pilot: its base (a conf/parent option trained from scratch with
    `base_training`) and the fine-tune's settings."""
    family: str
    base_id: str
    base_option: str
    base_training: tuple[str, ...]  # overrides for the base
    finetune: dict  # training settings for train_model_version


# Sized for 2 CPU cores, all three in at most 12 minutes from a fresh clone: the linear model's
# lbfgs to convergence (seconds), SCVI up to 60 epochs then scANVI up to 30, both early-stopped
# (about a minute together), scGPT 2 pretraining epochs then up to 12 fine-tuning epochs (its
# family's default is 15; 12 keeps the whole pilot inside the budget).
PILOTS = {
    "full": (
        Pilot("linear", "model-linear-cbmc", "linear_cbmc_base", (), {}),
        Pilot("scvi", "model-scvi-cbmc-base", "scvi_cbmc_base", ("training=pretrain_scvi",),
              {}),
        Pilot("scgpt", "model-scgpt-cbmc-base", "scgpt_cbmc_base", ("training=pretrain_mgm",),
              {"max_epochs": 12}),
    ),
    "smoke": (
        Pilot("linear", "model-linear-cbmc-smoke", "linear_cbmc_base", (), {"max_iter": 50}),
        Pilot("scvi", "model-scvi-cbmc-base-smoke", "scvi_cbmc_base",
              ("training=pretrain_scvi", "training.max_epochs=1"), {"max_epochs": 1}),
        Pilot("scgpt", "model-scgpt-cbmc-base-smoke", "scgpt_cbmc_base",
              ("training=pretrain_mgm", "training.max_epochs=1", "training.limit_train_batches=8",
               "training.limit_eval_batches=2", "training.max_seq_len=33"),
              {"max_epochs": 1, "limit_train_batches": 16, "limit_eval_batches": 4,
               "max_seq_len": 65, "log_every_n_steps": 4}),
    ),
}
WALL_TIME_CAP_MIN = {"full": 60, "smoke": 10}

console = Console(stderr=True, soft_wrap=True)  # never wrap an id or a command mid-word


def register_datasets() -> None:
    for artifact_id, (source, title) in DATASETS.items():
        spec = BUILTINS[source]  # how to load it is part of the record, like its citation
        loader = {"source": source, "format": spec.format,
                  "label_key": spec.load_options.get("label_key")}
        catalog.register_dataset(artifact_id, title, builtin_citation(source), created_by="demo",
                                 metadata={"loader": loader})
        console.print(f"dataset [bold]{artifact_id}[/] registered ({source})")


def fund_agent() -> None:
    have = ledger.balance(AGENT) if ledger.account(AGENT) else Decimal(0)
    if have < CREDITS:
        ledger.grant(AGENT, CREDITS - have, memo="make demo")
    console.print(f"agent [bold]{AGENT}[/] balance {ledger.balance(AGENT)} credits")


def ensure_base(pilot: Pilot, cap: int) -> dict:
    """Version 1: trained from scratch once, on the same path as every job (plan, debit,
    sandbox, MLflow run, registration, settlement), then reused."""
    try:
        return catalog.get_artifact(pilot.base_id)
    except NotFound:
        pass
    console.print(f"training the {pilot.family} base [bold]{pilot.base_id}[/] from scratch")
    plan = prepare(TrainRequest(pilot.base_id, DATASET, AGENT, overrides=pilot.base_training,
                                wall_time_cap_min=cap, from_scratch=True,
                                parent_option=pilot.base_option))
    if plan.problems:
        raise plan.problems[0]
    launch(plan)
    return catalog.get_artifact(pilot.base_id)


def run_pilot(pilot: Pilot, cap: int) -> dict:
    """Base, fine-tune, gate: one row of the table."""
    base = ensure_base(pilot, cap)
    console.print(f"{pilot.family}: fine-tuning [bold]{base['id']}[/] v{base['version_number']}"
                  " for cell types on CBMC (train_model_version)")
    result = train_model_version(base["id"], DATASET, pilot.finetune or None, AGENT,
                                 wall_time_cap_min=cap, vram_cap_gb=24)
    console.print(f"{pilot.family}: gating [bold]{result['artifact_id']}[/] "
                  "(evaluate_candidate, gate default)")
    decision = evaluate_candidate(result["artifact_id"], AGENT, "default")
    console.print(decision_text(decision))
    return {"family": pilot.family, "result": result, "decision": decision}


def table(rows: list[dict]) -> str:
    """family | version | test accuracy | macro-F1 | cost | the gate's decision."""
    lines = [f"{'family':<8} {'version':<20} {'v':>2} {'accuracy':>8} {'macro-F1':>8} "
             f"{'cost':>9}  decision (macro-F1 delta, 95% CI, vs comparator)"]
    for row in rows:
        r, d = row["result"], row["decision"]
        m = r.get("eval_metrics") or {}
        c = min(d["comparisons"], key=lambda c: c["delta"]) if d.get("comparisons") else None
        vs = (f"{c['delta']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] vs "
              f"{c['comparator_role']} {c['comparator_value']:.3f}" if c else "")
        lines.append(f"{row['family']:<8} {r['artifact_id']:<20} {r['version_number']:>2} "
                     f"{m.get('test_accuracy', float('nan')):>8.4f} "
                     f"{m.get('test_macro_f1', float('nan')):>8.4f} "
                     f"{Decimal(str(r['cost']['actual'])):>9.6f}  {d['decision']} {vs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "full"
    if name not in PILOTS:
        console.print(f"[red]error[/]: unknown demo profile {name!r}; use one of "
                      f"{', '.join(PILOTS)}")
        return 2
    start = time.perf_counter()
    rows = []
    try:  # no forge home (settings.NoForgeHome) is one line too
        console.print(f"[bold]forge-runner pilot[/]: registry {settings.db_url()}")
        console.print(f"registry schema at revision {db.upgrade()}")
        register_tools(SKILLS)
        register_datasets()
        fund_agent()
        for pilot in PILOTS[name]:
            t0 = time.perf_counter()
            rows.append(run_pilot(pilot, WALL_TIME_CAP_MIN[name]))
            console.print(f"{pilot.family}: done in {time.perf_counter() - t0:.0f}s")
    except ForgeError as exc:
        console.print(f"[red]error[/]: {type(exc).__name__}: {exc}")
        return 2
    for row in rows:  # each family's returned dicts: the new version, then the gate's decision
        print(json.dumps(row["result"], indent=2, default=str))
        print(json.dumps(row["decision"], indent=2, default=str))
    print(table(rows))
    status = 0
    for row in rows:
        unreproduced = [w for w in row["decision"].get("warnings") or []
                        if w.startswith("unreproduced")]
        if unreproduced:  # one metric, one number: the gate re-measures what training recorded
            console.print(f"[red]error[/]: {row['family']}: {unreproduced[0]}")
            status = 1
    result = rows[-1]["result"]
    uri = to_plain(compose_config())["tracking"]["tracking_uri"]
    took = f"done in {time.perf_counter() - start:.0f}s."
    if uri.startswith(("http://", "https://")):  # tracking=server: its UI is already up
        console.print(f"{took} Browse runs and the registered models: {result.get('mlflow_url')}")
    else:
        console.print(f"{took} Browse runs and the registered models:\n  .venv/bin/mlflow ui "
                      f"--backend-store-uri {uri} --workers 1 --port 5000   # then open "
                      f"{result.get('mlflow_url')}", soft_wrap=True)
    console.print(f"The versions' pages (lineage, metrics, cost, gate):\n  .venv/bin/forge serve"
                  f"   # then open {result.get('detail_url')}", soft_wrap=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
