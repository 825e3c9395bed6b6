"""Multi-device jobs: Lightning DDP with devices=2 on CPU (gloo) inside the real sandbox.

The jail's network side (only lo, no route out, loopback TCP allowed, packet and netlink
sockets but NETLINK_ROUTE refused) is tested with the other jail attacks in
tests/test_security_jail.py; the plan and the dry run in tests/test_plan.py and
tests/test_dry_run.py. Here: how the ranks share the training cells, a non-finite loss on
one rank stopping both, and one real tiny fine-tune with devices=2 through the public API.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from helpers import AGENT, BASE_ID, DATASET_ID
from test_security_jail import host_deadline

from runner.registry import catalog, ledger, money, recovery

REPO = Path(__file__).resolve().parents[1]
# One rank's progress line (trainers/scgpt/lightning.py LineProgress with several devices).
RANK_LINE = re.compile(r"^rank (\d+) epoch (\d+)/\d+ step (\d+)/\d+ loss (\S+) ")


def _rank_losses(log: str) -> dict[int, list[tuple[int, int, float]]]:
    """rank -> [(epoch, step, loss)] from the job's log."""
    out: dict[int, list] = {}
    for line in log.splitlines():
        if m := RANK_LINE.match(line):
            out.setdefault(int(m[1]), []).append((int(m[2]), int(m[3]), float(m[4])))
    return out


# --------------------------------------------------------------------------- the ranks' data


def _batches(rank: int = 0, world: int = 1, n: int = 101, batch_size: int = 8):
    from trainers.data.load import CellData
    from trainers.scgpt.batches import CellBatches
    from trainers.scgpt.tokenize import Tokenizer

    genes = 5
    rows = np.random.default_rng(0).random((n, genes), dtype=np.float32) + 0.1
    data = CellData(X=rows, genes=[f"g{i}" for i in range(genes)],
                    labels=np.arange(n, dtype=np.int64),  # a cell's label is its index
                    label_names=[str(i) for i in range(n)], value_kind="counts")
    tokenizer = Tokenizer(gene_ids=np.arange(genes) + 2, cls_id=0, pad_id=1, max_seq_len=6)
    return CellBatches(data, np.arange(genes), np.arange(n), tokenizer, batch_size, seed=3,
                       shuffle=True, rank=rank, world=world)


def _cells(loader) -> list[int]:
    return [int(c) for batch in loader for c in batch["labels"]]


def test_each_rank_trains_on_its_share_of_every_epoch():
    """DistributedSampler's split of each epoch's order, for a loader that is not a
    DataLoader: the order padded by wrapping to a multiple of the ranks, then every other
    cell; the same number of batches on each rank (DDP hangs otherwise), every cell seen."""
    single, ranks = _batches(), [_batches(rank, 2) for rank in (0, 1)]
    assert len(single) == 13 and [len(r) for r in ranks] == [7, 7]  # 101 -> 51 + 51 cells
    for _ in range(2):  # epochs: a new order each, the same on both ranks
        order = _cells(single)
        padded = order + order[:1]
        seen = [_cells(r) for r in ranks]
        assert seen == [padded[0::2], padded[1::2]]
        assert set(seen[0]) | set(seen[1]) == set(range(101))
    assert _cells(ranks[0]) != seen[0]  # the third epoch draws again


# --------------------------------------------------------------------------- in the jail


# A job that runs the real trainer with a NaN loss on rank 1 alone, at its second step.
NAN_ON_RANK_1 = """
import os, sys
import trainers.scgpt.lightning as lightning

real = lightning.ScGPTModule.compute_loss

def compute_loss(self, batch):
    loss, out = real(self, batch)
    if os.environ.get("LOCAL_RANK") == "1" and self.training and self.global_step == 1:
        loss = loss * float("nan")
    return loss, out

lightning.ScGPTModule.compute_loss = compute_loss
from trainers.entrypoint import main
sys.exit(main())
"""


@pytest.mark.slow
@pytest.mark.sandbox
def test_a_nan_on_one_rank_stops_both_and_rank_0_reports_it(tmp_path):
    """Rank 1's loss turns NaN: both ranks stop at that step (rank 0 would otherwise wait
    for rank 1's gradients until the launcher kills it), rank 0 writes result.json with
    reason nan_loss and the job exits 3, well within its cap."""
    from runner.jobs.datasets import fetch
    from runner.sandbox import SandboxJob, gpu_launch
    from trainers.manifest import EXIT_NAN

    code = tmp_path / "code"
    shutil.copytree(REPO / "trainers", code / "trainers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (code / "nan_on_rank_1.py").write_text(NAN_ON_RANK_1)
    manifest = {
        "task": "finetune_celltype", "device": "cpu", "devices": 2, "output_dir": "/job/out",
        "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat"},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_hid": 64},
        "training": {"max_epochs": 1, "batch_size": 32, "max_seq_len": 33, "precision": "32",
                     "limit_train_batches": 4, "limit_eval_batches": 1,
                     "log_every_n_steps": 1}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    job = SandboxJob(module="nan_on_rank_1", args=["/job/in/manifest.json"], code_dir=code,
                     inputs={"manifest.json": tmp_path / "manifest.json",
                             "dataset": fetch("cbmc")},
                     devices=2, output_dir=tmp_path / "out", log_path=tmp_path / "job.log",
                     on_line=lambda line: None, wall_time_cap_s=240)
    with host_deadline(300):
        launched = gpu_launch(job)
    log = (tmp_path / "job.log").read_text()
    assert launched.exit_code == EXIT_NAN and launched.reason != "timeout", log
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "failed" and result["reason"] == "nan_loss", log
    assert result["step"] == 1 and "non-finite on another rank" in result["message"]
    steps = {rank: [s for _, s, _ in lines] for rank, lines in _rank_losses(log).items()}
    assert steps == {0: [1], 1: [1]}  # both trained step 1, neither printed step 2


# --------------------------------------------------------------------------- the public API


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_two_devices_fine_tune_registers_one_candidate_billed_per_device(
        sqlite_registry, committed_code, monkeypatch, tmp_path):
    """A real tiny fine-tune with devices=2 (gloo over the jail's loopback): one candidate,
    the allocation settled at price x seconds x 2, both ranks' losses finite in the job log,
    result.json written once, by rank 0, with test metrics over the whole test set."""
    from runner.api import train_model_version
    from runner.jobs import launch as launch_mod
    from runner.jobs import tracking
    from runner.settings import forge_home

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    monkeypatch.setattr(launch_mod, "clean_run_dir", lambda run_dir: None)  # keep out/
    overrides = ["training.max_epochs=1", "training.batch_size=32", "training.max_seq_len=33",
                 "training.limit_train_batches=3", "training.log_every_n_steps=1"]
    with host_deadline(600):
        result = train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, devices=2,
                                     wall_time_cap_min=5, vram_cap_gb=1, overrides=overrides)

    candidates = [a for a in catalog.list_artifacts("model") if a["id"] != BASE_ID]
    assert [a["id"] for a in candidates] == [result["artifact_id"]]
    assert result["lifecycle_state"] == "candidate"

    alloc = ledger.get_allocation(result["gpu_allocation_id"])
    assert alloc["status"] == "settled" and alloc["devices"] == 2
    assert alloc["resource_type"] == "cpu"
    price, seconds = alloc["price_per_hour"], alloc["actual_seconds"]
    assert alloc["estimated_cost"] == money.estimate(price, 5, 2) == 2 * money.estimate(price, 5)
    assert Decimal(result["cost"]["estimated"]) == Decimal("0.083334")  # 5 min x 2 at 0.50/h
    assert alloc["actual_cost"] == money.charge(price, seconds, 2)
    assert alloc["actual_cost"] == money.round_money(
        Decimal(2) * Decimal(str(seconds)) * Decimal(str(price)) / Decimal(3600))
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert recovery.check() == []

    run_dir = forge_home() / "runs" / alloc["id"]
    assert json.loads((run_dir / "manifest.json").read_text())["devices"] == 2
    log = (run_dir / "job.log").read_text()
    losses = _rank_losses(log)
    assert sorted(losses) == [0, 1], log
    for rank, lines in losses.items():
        assert [(e, s) for e, s, _ in lines] == [(1, 1), (1, 2), (1, 3)], (rank, log)
        assert all(math.isfinite(loss) for _, _, loss in lines), (rank, lines)
    assert [x[2] for x in losses[0]] != [x[2] for x in losses[1]]  # their own cells
    assert log.count("result: ok (ok) -> /job/out/result.json") == 1  # rank 0 only

    out = run_dir / "out"  # what the job left (the host's hand-back, not cleaned here)
    assert {p.name for p in out.iterdir()} <= {
        "result.json", "predictions.json", "metrics.jsonl", "checkpoint",
        "confusion_matrix.png", "learning_curves.png"}
    points = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(p["key"], p["step"]) for p in points if p["key"] != "epoch"]  # Lightning's own
    assert len(keys) == len(set(keys)), "a metric point was logged by more than one rank"
    assert [step for key, step in keys if key == "lr"] == [0, 1, 2]  # 3 steps, one writer
    job_result = json.loads((out / "result.json").read_text())
    assert job_result["status"] == "ok" and job_result["manifest"]["devices"] == 2
    assert job_result["test_cells"] == job_result["split"]["counts"]["test"] > 0
    client = tracking.client(_tracking_uri())
    logged = Path(client.download_artifacts(result["mlflow"]["run_id"], "result.json",
                                            str(tmp_path)))
    assert json.loads(logged.read_text()) == job_result  # the one result.json, as logged
    metrics = result["eval_metrics"]
    # the host's measurement of rank 0's predictions of every held-out cell; the job's claim
    # is Lightning's float32 log of the same number
    assert metrics["test_accuracy"] == pytest.approx(job_result["metrics"]["test_accuracy"],
                                                     abs=1e-6)
    assert 0.0 <= metrics["test_macro_f1"] <= 1.0


def _tracking_uri() -> str:
    from runner.config.compose import compose_config, to_plain

    return to_plain(compose_config())["tracking"]["tracking_uri"]

