"""The run manifest: parsing, defaults, and errors that name the offending field."""

import copy

import pytest

from trainers.manifest import (
    MODEL_DEFAULTS,
    ManifestError,
    ModelSpec,
    parse_manifest,
    resolve_model,
)

GOOD = {
    "manifest_version": 1, "task": "finetune_celltype", "seed": 0, "device": "cpu",
    "vram_cap_gb": 24, "num_threads": None, "output_dir": "/job/out",
    "metrics_path": "/job/out/metrics.jsonl", "experiment_name": "scgpt-cbmc",
    "run_name": "optional", "parent": {"checkpoint_dir": "/job/in/parent"},
    "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat",
                "label_key": None},
    "model": {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_hid": 256, "dropout": 0.1,
              "n_bins": 51, "input_emb_style": "continuous"},
    "training": {"lr": 1e-3, "max_epochs": 10, "batch_size": 64, "precision": "32",
                 "max_seq_len": 257, "mask_ratio": 0.4, "early_stopping_patience": 3,
                 "val_fraction": 0.1, "test_fraction": 0.1, "limit_train_batches": None,
                 "limit_eval_batches": None, "weight_decay": 0.0, "warmup_steps": 0},
}


def _with(path: str, value):
    raw = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


def test_the_issue_example_parses():
    m = parse_manifest(GOOD)
    assert m.task == "finetune_celltype" and m.parent.checkpoint_dir == "/job/in/parent"
    assert m.training.lr == 1e-3 and m.model.d_model == 128 and m.dataset.label_key is None
    assert parse_manifest(m.to_dict()) == m  # round trip


def test_minimal_manifest_gets_defaults():
    m = parse_manifest({"task": "pretrain_mgm", "output_dir": "/o",
                        "dataset": {"path": "/d", "format": "cbmc_mat"}})
    assert m.parent is None and m.device == "auto" and m.training.max_seq_len > 1
    assert resolve_model(m.model, None) == MODEL_DEFAULTS
    assert m.metrics_path == "/o/metrics.jsonl"  # the stream the host relays


@pytest.mark.parametrize("path,value,field", [
    ("task", "pretrain", "task"),
    ("training.lr", -1, "training.lr"),
    ("training.lr", "fast", "training.lr"),
    ("training.max_epochs", 2.5, "training.max_epochs"),
    ("training.lrr", 1e-3, "training.lrr"),
    ("training.val_fraction", 0.95, "training.test_fraction"),
    ("training.precision", "64", "training.precision"),
    ("training.split_seed", -1, "training.split_seed"),
    ("training.split_seed", "0", "training.split_seed"),
    ("model.n_heads", 5, "model.n_heads"),
    ("model.input_emb_style", "scaling", "model.input_emb_style"),
    ("dataset.format", "loom", "dataset.format"),
    ("dataset.path", KeyError, "dataset.path"),
    ("output_dir", KeyError, "output_dir"),
    ("device", "tpu", "device"),
    ("manifest_version", 2, "manifest_version"),
    ("parent", "/job/in/parent", "parent"),
    ("dataset", None, "dataset"),
])
def test_errors_name_the_field(path, value, field):
    with pytest.raises(ManifestError) as info:
        parse_manifest(_with(path, value))
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid manifest: {field}: ")


def test_h5ad_finetune_needs_a_label_key():
    raw = _with("dataset.format", "h5ad")
    with pytest.raises(ManifestError, match="dataset.label_key"):
        parse_manifest(raw)


def test_parent_architecture_must_agree():
    parent = {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_hid": 256, "dropout": 0.2,
              "n_bins": 51, "input_emb_style": "continuous"}
    arch = resolve_model(ModelSpec(d_model=128, dropout=0.0), parent)
    assert arch["d_model"] == 128 and arch["dropout"] == 0.0  # dropout may be overridden
    assert resolve_model(ModelSpec(), parent)["dropout"] == 0.2
    with pytest.raises(ManifestError, match=r"model\.d_model: is 256 but the parent"):
        resolve_model(ModelSpec(d_model=256), parent)
