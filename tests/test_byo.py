"""Bring your own checkpoint and dataset: every registered dataset trains, built-in or not.

Each built-in dataset goes through train_model_version end to end (real sandbox, registry,
MLflow store), from a tiny base whose vocabulary is that dataset's genes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import AGENT, ARCH, TINY

from runner.api import train_model_version
from runner.jobs import weights
from runner.jobs.datasets import BUILTINS, builtin_citation, fetch, loader_input
from runner.registry import catalog, ledger, recovery

DATASET_IDS = {"cbmc": "dataset-geo-GSE100866", "pbmc68k_reduced": "dataset-10x-pbmc68k-reduced"}


def tiny_base(folder: Path, name: str) -> Path:
    """A random-init tiny scGPT checkpoint whose vocabulary is dataset `name`'s genes."""
    from trainers.data.load import load
    from trainers.scgpt.model import ScGPT, ScGPTConfig, save_checkpoint
    from trainers.scgpt.tokenize import GeneVocab

    spec = BUILTINS[name]
    data = load(loader_input(name, fetch(name)), spec.format, **spec.load_options)
    vocab = GeneVocab.from_genes(data.genes)
    config = ScGPTConfig(vocab_size=len(vocab), pad_token_id=vocab.pad_id,
                         n_layers=ARCH["n_layers"], d_model=ARCH["d_model"],
                         n_heads=ARCH["n_heads"], d_hid=ARCH["d_hid"], dropout=0.0,
                         n_bins=ARCH["n_bins"], input_emb_style="continuous")
    save_checkpoint(ScGPT(config), vocab.stoi, folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_every_builtin_dataset_trains_end_to_end(name, sqlite_url, committed_code, tmp_path,
                                                 monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    checkpoint = tiny_base(tmp_path / "base", name)
    base_id = f"model-byo-{name.replace('_', '-')}"
    catalog.register_dataset(DATASET_IDS[name], name, builtin_citation(name))
    catalog.register_model(
        artifact_id=base_id, title=f"tiny base on {name}", created_by="test",
        metadata={"family": "scgpt-byo", "framework": "scgpt", "task": "external",
                  "architecture": ARCH},
        origin_type="external", origin_url=checkpoint.as_uri(),
        content_hash=weights.tree_hash(weights.file_hashes(checkpoint)))
    ledger.grant(AGENT, "10")
    result = train_model_version(base_id, DATASET_IDS[name], agent_id=AGENT,
                                 wall_time_cap_min=5, vram_cap_gb=1, overrides=TINY)
    version = catalog.get_model_version(result["artifact_id"])
    assert version["parent_version_id"] == base_id
    assert version["version"]["training_dataset_artifact_id"] == DATASET_IDS[name]
    assert 0 <= result["eval_metrics"]["test_macro_f1"] <= 1
    assert recovery.check() == []
