"""Orchestration overhead of train_model_version() over the bare trainer.

Runs the same fine-tune (a small scGPT base, real CBMC cells, about 10 s on this CPU)
two ways, interleaved, N times each:

  direct: python -m trainers.entrypoint MANIFEST.json   (the manifest the forge path built; no
          sandbox, no registry, no MLflow relay)
  forge:  train_model_version(...)                       (compose, pin, debit, sandbox, relay,
                                                          MLflow registration, hook, settle)

and prints the medians, their ratio (target <= 1.10) and the overhead in seconds (target <= 3).

    python benchmarks/overhead.py [--repeats 3] [--batches 40]
    python benchmarks/overhead.py --smoke     # 2 batches, one run each way (the forge way's
                                              # is its warm-up): does it work
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_hid": 128, "n_bins": 51,
        "dropout": 0.0, "input_emb_style": "continuous"}


def make_base(folder: Path) -> None:
    from runner.jobs.datasets import fetch
    from trainers.data.load import load
    from trainers.scgpt.model import ScGPT, ScGPTConfig, save_checkpoint
    from trainers.scgpt.tokenize import GeneVocab

    vocab = GeneVocab.from_genes(load(fetch("cbmc"), "cbmc_mat").genes)
    config = ScGPTConfig(vocab_size=len(vocab), pad_token_id=vocab.pad_id, dropout=0.0,
                         **{k: v for k, v in ARCH.items() if k != "dropout"})
    save_checkpoint(ScGPT(config), vocab.stoi, folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=40, help="training batches per run")
    parser.add_argument("--smoke", action="store_true",
                        help="2 batches, one run each way (the forge way's is its warm-up): "
                             "checks that the benchmark works")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.batches = 1, 2

    home = Path(tempfile.mkdtemp(prefix="forge-overhead-"))
    os.environ.update(FORGE_HOME=str(home), FORGE_DB_URL=f"sqlite:///{home}/forge.db",
                      FORGE_CACHE_DIR=str(home / "cache"), MLFLOW_DISABLE_TELEMETRY="true")
    from runner.api import SKILLS, train_model_version
    from runner.jobs import weights
    from runner.jobs.datasets import builtin_citation, fetch
    from runner.registry import catalog, db, ledger
    from runner.tools import register_tools

    db.upgrade()
    register_tools(SKILLS)
    base = home / "base"
    make_base(base)
    catalog.register_dataset("dataset-geo-GSE100866", "CBMC", builtin_citation("cbmc"))
    catalog.register_model(
        artifact_id="model-bench-base", title="bench base", created_by="bench",
        metadata={"family": "scgpt", "framework": "scgpt", "architecture": ARCH},
        origin_type="external", origin_url=base.as_uri(),
        content_hash=weights.tree_hash(weights.file_hashes(base)))
    ledger.grant("bench", "100")
    training = {"max_epochs": 1, "batch_size": 32, "max_seq_len": 129,
                "limit_train_batches": args.batches, "limit_eval_batches": 8,
                "log_every_n_steps": 10}
    if args.smoke:  # seconds, not minutes: the whole test split is still scored
        training.update(max_seq_len=33, limit_eval_batches=1)
    dataset = str(fetch("cbmc", cache=home / "cache"))

    def direct(seed: int) -> float:
        # Exactly the manifest the forge path built (precision, class weights, warmup...),
        # with the seed and the paths of a bare run.
        manifest = json.loads(forge_manifest.read_text())
        out = home / f"direct-{seed}"
        manifest.update(seed=seed, output_dir=str(out), metrics_path=str(out / "metrics.jsonl"),
                        parent={"checkpoint_dir": str(base)})
        manifest["dataset"]["path"] = dataset
        path = home / f"manifest-{seed}.json"
        path.write_text(json.dumps(manifest))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainers.entrypoint", str(path)], cwd=ROOT,
                       check=True, capture_output=True)
        return time.perf_counter() - t0

    def forge(seed: int) -> float:
        overrides = [f"training.{k}={v}" for k, v in training.items()]
        t0 = time.perf_counter()
        train_model_version("model-bench-base", "dataset-geo-GSE100866", agent_id="bench",
                            wall_time_cap_min=30, vram_cap_gb=1, allow_dirty=True,
                            overrides=[*overrides, "training.lr=0.001",
                                       f"training.seed={seed}"])
        return time.perf_counter() - t0

    warm = forge(100)  # warm the caches both paths share (dataset, code snapshot, MLflow store)
    forge_manifest = next((home / "runs").glob("alloc-*/manifest.json"))
    times: dict[str, list[float]] = {"direct": [], "forge": []}
    for i in range(args.repeats):
        times["direct"].append(direct(i))
        # --smoke only checks that both ways run: the warm-up stands for the forge way
        times["forge"].append(warm if args.smoke else forge(i))
        print(f"run {i}: direct {times['direct'][-1]:.1f}s  forge {times['forge'][-1]:.1f}s",
              flush=True)
    d, f = statistics.median(times["direct"]), statistics.median(times["forge"])
    print(f"median direct {d:.2f}s | median train_model_version {f:.2f}s | "
          f"ratio {f / d:.3f} | overhead {f - d:.2f}s  (n={args.repeats})")


if __name__ == "__main__":
    main()
