"""`make demo`: the pilot, on the embedded defaults (SQLite registry and MLflow store under
FORGE_HOME).

1. migrate the registry; register the CBMC and pbmc68k datasets with their citations;
2. grant the agent `demo-agent` credits;
3. once: pretrain a small scGPT-style base on CBMC (masked gene expression), through the
   same plan -> debit -> sandbox -> register path as every job, as version 1 of
   `model-scgpt-cbmc-base`;
4. fine-tune it for cell types with train_model_version() into a candidate version 2;
5. gate the candidate with evaluate_candidate() (conf/gate/default.yaml): evaluated in the
   sandbox on its held-out cells against its parent, or, as the pretrained base cannot
   classify cells, against the logistic-regression baseline refitted on the same split;
   the paired bootstrap's CI decides promoted or rejected;
6. print the returned dicts, the decision with its CI, and the command that opens the
   MLflow UI on the same store.

A second run reuses the base and gets the same requests' earlier results back.

`python -m runner.demo smoke` (`make demo DEMO=smoke`) runs the same steps on the same
defaults, sized to a minute or two on 2 cores: a base of its own (one short epoch) and a
one-epoch fine-tune. CI runs it in a fresh clone to prove the main command works there.
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
BASE_ID = "model-scgpt-cbmc-base"
DATASETS = {"dataset-geo-GSE100866": ("cbmc", "CBMC CITE-seq, 8,617 cord blood cells"),
            "dataset-10x-pbmc68k-reduced": ("pbmc68k_reduced", "PBMC 68k (reduced), 700 cells")}
CREDITS = Decimal("5")


@dataclass(frozen=True)
class Profile:
    base_id: str
    pretrain: tuple[str, ...]  # training overrides for the base
    finetune: dict  # training settings for train_model_version
    wall_time_cap_min: int


PROFILES = {
    "full": Profile(BASE_ID, (), {}, 60),
    "smoke": Profile(f"{BASE_ID}-smoke",
                     ("training.max_epochs=1", "training.limit_train_batches=8",
                      "training.limit_eval_batches=2", "training.max_seq_len=33"),
                     {"max_epochs": 1, "limit_train_batches": 16, "limit_eval_batches": 4,
                      "max_seq_len": 65, "log_every_n_steps": 4}, 10),
}

console = Console(stderr=True)


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


def ensure_base(profile: Profile) -> dict:
    """Version 1: trained from scratch once, on the same path as every job (plan, debit,
    sandbox, MLflow run, registration, settlement), then reused."""
    try:
        return catalog.get_artifact(profile.base_id)
    except NotFound:
        pass
    console.print(f"pretraining the base [bold]{profile.base_id}[/] "
                  "(masked gene expression on CBMC)")
    plan = prepare(TrainRequest(profile.base_id, "dataset-geo-GSE100866", AGENT,
                                overrides=("training=pretrain_mgm", *profile.pretrain),
                                wall_time_cap_min=profile.wall_time_cap_min, from_scratch=True))
    if plan.problems:
        raise plan.problems[0]
    launch(plan)
    return catalog.get_artifact(profile.base_id)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "full"
    if name not in PROFILES:
        console.print(f"[red]error[/]: unknown demo profile {name!r}; use one of "
                      f"{', '.join(PROFILES)}")
        return 2
    profile = PROFILES[name]
    start = time.perf_counter()
    console.print(f"[bold]forge-runner pilot[/]: registry {settings.db_url()}")
    try:
        console.print(f"registry schema at revision {db.upgrade()}")
        register_tools(SKILLS)
        register_datasets()
        fund_agent()
        base = ensure_base(profile)
        console.print(f"base [bold]{base['id']}[/] version {base['version_number']}")
        console.print("fine-tuning it for cell types on CBMC (train_model_version)")
        result = train_model_version(base["id"], "dataset-geo-GSE100866",
                                     profile.finetune or None, AGENT,
                                     wall_time_cap_min=profile.wall_time_cap_min, vram_cap_gb=24)
        print(json.dumps(result, indent=2, default=str))
        console.print(f"gating candidate [bold]{result['artifact_id']}[/] (evaluate_candidate, "
                      "gate default)")
        decision = evaluate_candidate(result["artifact_id"], AGENT, "default")
    except ForgeError as exc:
        console.print(f"[red]error[/]: {type(exc).__name__}: {exc}")
        return 2
    print(json.dumps(decision, indent=2, default=str))
    console.print(decision_text(decision))
    unreproduced = [w for w in decision.get("warnings") or [] if w.startswith("unreproduced")]
    if unreproduced:  # one metric, one number: the gate re-measures what training recorded
        console.print(f"[red]error[/]: {unreproduced[0]}")
        return 1
    uri = to_plain(compose_config())["tracking"]["tracking_uri"]
    took = f"done in {time.perf_counter() - start:.0f}s."
    if uri.startswith(("http://", "https://")):  # tracking=server: its UI is already up
        console.print(f"{took} Browse runs and the registered model: {result.get('mlflow_url')}")
    else:
        console.print(f"{took} Browse runs and the registered model:\n  .venv/bin/mlflow ui "
                      f"--backend-store-uri {uri} --workers 1 --port 5000   # then open "
                      f"{result.get('mlflow_url')}")
    console.print(f"The version's page (lineage, metrics, cost, gate):\n  .venv/bin/forge serve"
                  f"   # then open {result.get('detail_url')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
