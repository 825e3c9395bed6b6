"""The sandbox entrypoint end to end on real CBMC data, shrunk to seconds.

Runs `python -m trainers.entrypoint MANIFEST.json` as the sandbox would (stdout through a
pipe), checks result.json, the scGPT-layout checkpoint, the MLflow file store and the
exit codes: 0 ok, 2 invalid manifest, 3 non-finite loss.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runner.jobs.datasets import fetch, sha256_file
from trainers.entrypoint import EXIT_INVALID, EXIT_NAN, EXIT_OK, _is_oom, main
from trainers.runtime import choose_precision as _precision

REPO = Path(__file__).parents[1]
TINY_MODEL = {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_hid": 64}
TINY_TRAINING = {"max_epochs": 2, "batch_size": 32, "max_seq_len": 33, "precision": "32",
                 "limit_train_batches": 4, "limit_eval_batches": 2, "log_every_n_steps": 2,
                 "lr": 1e-3}


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


# One worker runs this module under `make test` (--dist loadgroup), so the parent below is
# pretrained once, not once per test that uses it (module fixtures are torn down whenever a
# worker moves on to another module's test).
pytestmark = pytest.mark.xdist_group("trainer_entrypoint")


@pytest.fixture(scope="module")
def cbmc():
    return str(fetch("cbmc"))


def _manifest(out: Path, cbmc: str, task="finetune_celltype", parent=None, model=None,
              **training) -> dict:
    # num_threads null: the trainer sizes its pool from the CPUs it may use (one, on a pinned
    # xdist worker). Two threads there burned 5-20x the CPU of one in the suite.
    return {"manifest_version": 1, "task": task, "seed": 0, "device": "cpu",
            "num_threads": None, "output_dir": str(out),
            "metrics_path": str(out / "metrics.jsonl"), "experiment_name": "test",
            "parent": {"checkpoint_dir": str(parent)} if parent else None,
            "dataset": {"name": "cbmc", "path": cbmc, "format": "cbmc_mat"},
            "model": TINY_MODEL if model is None else model,
            "training": {**TINY_TRAINING, **training}}


def _run(manifest: dict, tmp: Path) -> tuple[int, str, dict | None]:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "manifest.json"
    path.write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "trainers.entrypoint", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    result_path = Path(manifest["output_dir"]) / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return proc.returncode, proc.stdout + proc.stderr, result


def _mlflow_metric_lines(result: dict, key: str) -> list[dict]:
    """The points of metric `key` in the job's metrics stream (what the host relays)."""
    lines = Path(result["metrics_path"]).read_text().splitlines()
    return [p for p in map(json.loads, lines) if p["key"] == key]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, cbmc):
    """A tiny base pretrained with masked gene-expression modelling (subprocess)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    code, log, result = _run(_manifest(tmp / "out", cbmc, task="pretrain_mgm"), tmp)
    assert code == EXIT_OK, log
    return tmp / "out", result, log


@pytest.mark.slow
def test_pretrain_writes_result_checkpoint_and_mlflow(pretrained):
    out, result, log = pretrained
    assert result["status"] == "ok" and result["device"] == "cpu"
    m = result["metrics"]
    assert {"train_mse", "val_mse", "test_mse", "train_mvc_mse", "test_mvc_mse",
            "best_val_loss"} <= set(m)
    assert all(math.isfinite(v) for v in m.values())
    for name, digest in result["checkpoint"]["files"].items():
        assert sha256_file(out / "checkpoint" / name) == digest
    assert len(_mlflow_metric_lines(result, "val_mse")) == 2  # one line per epoch
    assert "epoch 1/2 step 2/4" in log  # line progress, stdout being a pipe
    assert re.search(r"epoch 2/2 step 4/4 loss [0-9.]+ [0-9]+ cells/s eta 0s", log), log


@pytest.mark.slow
def test_finetune_from_parent_standalone(pretrained, cbmc, tmp_path):
    from trainers.scgpt.model import load_checkpoint

    code, log, result = _run(_manifest(tmp_path / "out", cbmc, parent=pretrained[0] /
                                       "checkpoint", model={}), tmp_path)
    assert code == EXIT_OK, log
    assert result["status"] == "ok" and result["reason"] == "ok"
    m = result["metrics"]
    for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "test_accuracy",
                "test_macro_f1"):
        assert math.isfinite(m[key]), key
    # the logistic-regression baseline is the host's alone (runner/jobs/truth.py): no job
    # spends its time refitting it
    assert not [k for k in m if k.startswith("baseline_")] and "baseline" not in result
    # nor imports scikit-learn (and pandas under it) for its metrics or figures: numpy does
    # them (trainers/scoring.py), and the job starts about half a second sooner; nor
    # scipy.signal, which Lightning's torchmetrics would import (trainers/torchmetrics_import.py)
    assert not {"sklearn", "pandas", "scipy.signal"} & set(result["timings"]["imported"]), \
        result["timings"]
    assert len(result["per_class_f1"]) == 13 and "CD14+ Mono" in result["per_class_f1"]
    assert result["genes"] == {"in_vocab": 500, "dropped": 0, "vocab_size": 503}
    assert result["split"]["counts"] == {"train": 6893, "val": 862, "test": 862}
    report = result["parent"]["load_report"]
    assert any("out_layer" in k for k in report["shape_mismatch"])  # 1-class head -> 13
    out = tmp_path / "out"
    for name in result["artifacts"]:
        assert (out / name).stat().st_size > 1000
    assert set(result["artifacts"]) == {"confusion_matrix.png", "learning_curves.png"}
    model, vocab, args, rep = load_checkpoint(out / "checkpoint")
    assert model.config.n_cls == 13 and model.config.d_model == 32 and len(vocab) == 503
    assert args["label_names"][1] == "CD14+ Mono" and rep.missing == []
    assert len(_mlflow_metric_lines(result, "val_macro_f1")) == 2
    assert len(_mlflow_metric_lines(result, "epochs_trained")) == 1  # the final line
    from runner.jobs.tracking import valid_metric_name  # every point is one the host relays
    stream = [json.loads(x) for x in Path(result["metrics_path"]).read_text().splitlines()]
    assert all(valid_metric_name(p["key"]) and math.isfinite(p["value"]) for p in stream)
    assert any(p["key"].startswith("test_f1/") for p in stream)  # per-class F1


@pytest.mark.slow
def test_same_seed_same_metrics(cbmc, tmp_path):
    results = []
    for i in range(2):
        path = tmp_path / f"m{i}.json"
        path.write_text(json.dumps(_manifest(tmp_path / f"out{i}", cbmc)))
        assert main([str(path)]) == EXIT_OK
        results.append(json.loads((tmp_path / f"out{i}" / "result.json").read_text()))
    a, b = results
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert a["checkpoint"]["files"]["best_model.pt"] == b["checkpoint"]["files"]["best_model.pt"]


@pytest.mark.slow
def test_huge_learning_rate_exits_3_nan_loss(cbmc, tmp_path):
    code, log, result = _run(_manifest(tmp_path / "out", cbmc, lr=1e30), tmp_path)
    assert code == EXIT_NAN, log
    assert result["status"] == "failed" and result["reason"] == "nan_loss"
    assert "non-finite train loss" in result["message"]


def test_invalid_manifest_exits_2_naming_the_field(cbmc, tmp_path):
    code, log, result = _run(_manifest(tmp_path / "out", cbmc, lr=-1), tmp_path)
    assert code == EXIT_INVALID
    assert "training.lr" in log
    assert result["reason"] == "invalid_manifest" and result["field"] == "training.lr"


@pytest.mark.slow
def test_parent_mismatch_and_vocab_without_overlap_exit_2(pretrained, cbmc, tmp_path):
    parent = pretrained[0] / "checkpoint"
    path = tmp_path / "m.json"
    path.write_text(json.dumps(_manifest(tmp_path / "a", cbmc, parent=parent,
                                         model={"d_model": 64})))
    assert main([str(path)]) == EXIT_INVALID
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert result["field"] == "model.d_model" and "args.json has 32" in result["message"]

    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "CD3E": 1}))
    raw = _manifest(tmp_path / "b", cbmc)
    raw["vocab_path"] = str(tmp_path / "vocab.json")
    path.write_text(json.dumps(raw))
    assert main([str(path)]) == EXIT_INVALID
    result = json.loads((tmp_path / "b" / "result.json").read_text())
    assert result["field"] == "vocab_path"
    assert "none of the dataset's 500 genes" in result["message"]


def test_out_of_memory_is_recognised():
    import torch
    assert _is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert _is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: "
                                "can't allocate memory: you tried to allocate 1 bytes"))
    assert _is_oom(MemoryError())
    assert not _is_oom(RuntimeError("shape mismatch"))


@pytest.mark.slow
def test_h5ad_with_scgpt_default_vocab_drops_unknown_genes(tmp_path):
    h5ad = fetch("pbmc68k_reduced") / "10x_pbmc68k_reduced.h5ad"
    vocab = fetch("scgpt_default_vocab") / "default_gene_vocab.json"
    raw = _manifest(tmp_path / "out", str(h5ad), max_epochs=1)
    raw["dataset"] = {"name": "pbmc68k_reduced", "path": str(h5ad), "format": "h5ad",
                      "label_key": "bulk_labels"}
    raw["vocab_path"] = str(vocab)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(raw))
    assert main([str(path)]) == EXIT_OK
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["genes"] == {"in_vocab": 702, "dropped": 63, "vocab_size": 48295}
    assert len(result["per_class_f1"]) == 10


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 avx512f avx512_bf16", "bf16-mixed"),  # native bf16 dot products
    ("fpu avx512f amx_bf16 amx_tile", "bf16-mixed"),
    ("fpu sse avx2 avx512f", "32"),                      # bf16 would be emulated: slower
    ("", "32"),
])
def test_auto_precision_follows_the_cpu(flags, expected):
    assert _precision("auto", "cpu", f"processor : 0\nflags : {flags}\n") == expected
    assert _precision("auto", "cuda", "") == "bf16-mixed"
    assert _precision("32", "cpu", "flags : amx_bf16") == "32"  # an explicit choice stands


@pytest.mark.slow
def test_split_seed_holds_the_split_while_the_seed_varies(cbmc, tmp_path):
    def run(name: str, seed: int, **training) -> dict:
        raw = {**_manifest(tmp_path / name, cbmc, **training), "seed": seed}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        assert main([str(path)]) == EXIT_OK
        return json.loads((tmp_path / name / "result.json").read_text())

    base = run("seed0", 0)
    held = run("seed1-split0", 1, split_seed=0)
    moved = run("seed1", 1)
    assert held["split"] == base["split"]  # same cells in train / val / test
    assert held["history"] != base["history"]  # while the training draws differ
    assert moved["split"]["sha256"]["test"] != base["split"]["sha256"]["test"]
    assert moved["split"]["seed"] == 1 and held["split"]["seed"] == 0
