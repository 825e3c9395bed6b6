"""`make demo`: the pilot, on the embedded defaults (SQLite registry and MLflow store under
FORGE_HOME).

1. migrate the registry; register the CBMC and pbmc68k datasets with their citations;
2. grant the agent `demo-agent` credits;
3. once: pretrain a small scGPT-style base on CBMC (masked gene expression, in the sandbox)
   and register it as version 1 of `model-scgpt-cbmc-base`;
4. fine-tune it for cell types with train_model_version() into a candidate version 2;
5. print the returned dict and the command that opens the MLflow UI on the same store.

A second run reuses the base and gets the same request's earlier result back.

`python -m runner.demo smoke` (`make demo DEMO=smoke`) runs the same steps on the same
defaults, sized to a minute or two on 2 cores: a base of its own (one short epoch) and a
one-epoch fine-tune. CI runs it in a fresh clone to prove the main command works there.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal

from rich.console import Console

from runner.registry import catalog, db, ledger

from runner.jobs import codepin

from runner import settings
from runner.errors import ForgeError, NotFound

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
    from runner.jobs.datasets import BUILTINS, builtin_citation

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
    """Version 1: pretrained here once, in the sandbox, then reused."""
    try:
        return catalog.get_artifact(profile.base_id)
    except NotFound:
        pass
    from runner import sandbox
    from runner.jobs import weights
    from runner.config.compose import compose_config, to_plain
    from runner.jobs.handback import CHECKPOINT_DIR, read_result
    from runner.jobs.launch import ENTRYPOINT, build_manifest, sandbox_job
    from trainers.data import fetch

    cfg = to_plain(compose_config(["training=pretrain_mgm", *profile.pretrain]))
    pin = codepin.pin_code()
    if pin.dirty:
        raise ForgeError("the working tree has uncommitted changes", field="allow_dirty",
                         fix="commit them: the sandbox runs the pinned commit")
    run_dir = settings.forge_home() / "runs" / f"base-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir(parents=True)
    manifest = build_manifest(cfg, profile.base_id, "cpu", from_parent=False)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    console.print(f"pretraining the base [bold]{profile.base_id}[/] "
                  "(masked gene expression on CBMC)")
    started = catalog.now()
    launched = sandbox.gpu_launch(sandbox_job(
        cfg, code_dir=codepin.snapshot(pin, settings.cache_dir() / "code"),
        inputs={"manifest.json": run_dir / "manifest.json",
                "dataset": fetch.fetch(cfg["dataset"]["source"], cache=settings.cache_dir())},
        output_dir=run_dir / "out", log_path=run_dir / "job.log", device="cpu"))
    result = read_result(run_dir / "out", launched)
    stored = weights.store(profile.base_id, run_dir / "out" / CHECKPOINT_DIR)
    arch = {k: v for k, v in cfg["parent"].items() if k not in ("artifact_id", "family")}
    return catalog.register_model(
        artifact_id=profile.base_id,
        title="scGPT-style base, pretrained on CBMC (masked expression)",
        metadata={"family": cfg["parent"]["family"], "framework": "scgpt",
                  "task": "pretrain_mgm", "architecture": arch,
                  "weights": {k: stored[k] for k in ("sha256", "files", "size_bytes", "path")},
                  "split": result.get("split")},
        created_by="demo", origin_type="internal", content_hash=stored["sha256"],
        training_dataset_artifact_id="dataset-geo-GSE100866",
        version={"code_repo_url": pin.repo_url, "code_commit_sha": pin.sha,
                 "code_entrypoint": ENTRYPOINT, "trained_by": "demo",
                 "training_started_at": started, "training_completed_at": launched.ended_at,
                 "training_params_json": cfg["training"], "eval_metrics_json": result["metrics"]})


def main(argv: list[str] | None = None) -> int:
    from runner.api import train_model_version
    from runner.config.compose import compose_config, to_plain

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
        register_datasets()
        fund_agent()
        base = ensure_base(profile)
        console.print(f"base [bold]{base['id']}[/] version {base['version_number']}")
        console.print("fine-tuning it for cell types on CBMC (train_model_version)")
        result = train_model_version(base["id"], "dataset-geo-GSE100866",
                                     profile.finetune or None, AGENT,
                                     wall_time_cap_min=profile.wall_time_cap_min, vram_cap_gb=24)
    except ForgeError as exc:
        console.print(f"[red]error[/]: {type(exc).__name__}: {exc}")
        return 2
    print(json.dumps(result, indent=2, default=str))
    uri = to_plain(compose_config())["tracking"]["tracking_uri"]
    console.print(f"done in {time.perf_counter() - start:.0f}s. Browse runs and the "
                  f"registered model:\n  .venv/bin/mlflow ui --backend-store-uri {uri} "
                  f"--workers 1 --port 5000   # then open {result.get('detail_url')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
