"""Bring your own checkpoint and dataset: every registered dataset trains, built-in or not.

Each built-in dataset goes through train_model_version end to end (real sandbox, registry,
MLflow store), from a tiny base whose vocabulary is that dataset's genes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import AGENT, ARCH, TINY, register_by_hand

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
@pytest.mark.sandbox
@pytest.mark.train
def test_every_builtin_dataset_trains_end_to_end(name, sqlite_url, committed_code, tmp_path,
                                                 monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    checkpoint = tiny_base(tmp_path / "base", name)
    base_id = f"model-byo-{name.replace('_', '-')}"
    catalog.register_dataset(DATASET_IDS[name], name, builtin_citation(name))
    register_by_hand(base_id, checkpoint, family="scgpt", architecture=ARCH)
    ledger.grant(AGENT, "10")
    result = train_model_version(base_id, DATASET_IDS[name], agent_id=AGENT,
                                 wall_time_cap_min=5, vram_cap_gb=1, overrides=TINY)
    version = catalog.get_model_version(result["artifact_id"])
    assert version["parent_version_id"] == base_id
    assert version["version"]["training_dataset_artifact_id"] == DATASET_IDS[name]
    assert 0 <= result["eval_metrics"]["test_macro_f1"] <= 1
    assert recovery.check() == []


# --- the checkpoint decides: registration and the dry run ---------------------------------------

def _checkpoint(folder: Path, genes: list[str], **extra_args) -> Path:
    """A tiny checkpoint in scGPT's layout (our writer), args.json updated with extra_args."""
    import json

    from trainers.scgpt.model import ScGPT, ScGPTConfig, save_checkpoint
    from trainers.scgpt.tokenize import GeneVocab

    vocab = GeneVocab.from_genes(genes)
    config = ScGPTConfig(vocab_size=len(vocab), pad_token_id=vocab.pad_id, n_layers=2,
                         d_model=32, n_heads=4, d_hid=64, dropout=0.0,
                         input_emb_style="continuous")
    save_checkpoint(ScGPT(config), vocab.stoi, folder)
    if extra_args:
        args = json.loads((folder / "args.json").read_text())
        (folder / "args.json").write_text(json.dumps({**args, **extra_args}))
    return folder


def _cbmc_genes() -> list[str]:
    from trainers.data.load import load

    return load(fetch("cbmc"), "cbmc_mat").genes


def test_registration_reads_the_architecture_from_args_json(sqlite_url, tmp_path):
    from runner.jobs import parents

    folder = _checkpoint(tmp_path / "ckpt", _cbmc_genes())
    row = parents.register_parent("model-byo", folder.as_uri(), family="scgpt")
    meta = catalog.get_artifact("model-byo")["metadata"]
    assert meta["architecture"] == {"n_layers": 2, "d_model": 32, "n_heads": 4, "d_hid": 64,
                                    "n_bins": 51, "dropout": 0.0,
                                    "input_emb_style": "continuous"}
    assert meta["checkpoint"]["vocab"]["size"] == 503
    assert meta["checkpoint"]["vocab"]["specials"] == {"<pad>": 0, "<cls>": 1, "<eoc>": 2}
    assert row["content_hash"] == weights.tree_hash(weights.file_hashes(folder))


@pytest.mark.parametrize("change,reason,field", [
    ({"args": {"pre_norm": True}}, "unsupported_checkpoint", "args.json.pre_norm"),
    ({"args": {"use_batch_labels": True}}, "unsupported_checkpoint", "args.json.use_batch_labels"),
    ({"args": {"nheads": 5}}, "invalid_checkpoint", "args.json.nheads"),
    ({"drop_arg": "nlayers"}, "invalid_checkpoint", "args.json.nlayers"),
    ({"drop_token": "<cls>"}, "vocab_specials", "vocab.json"),
    ({"gap": True}, "vocab_gaps", "vocab.json"),
])
def test_a_checkpoint_this_trainer_cannot_honour_is_refused_at_registration(
        sqlite_url, tmp_path, change, reason, field):
    import json

    from runner.jobs import parents

    folder = _checkpoint(tmp_path / "ckpt", _cbmc_genes(), **change.get("args", {}))
    args = json.loads((folder / "args.json").read_text())
    vocab = json.loads((folder / "vocab.json").read_text())
    if "drop_arg" in change:
        del args[change["drop_arg"]]
    if "drop_token" in change:
        gone = vocab.pop(change["drop_token"])
        vocab = {t: i - (i > gone) for t, i in vocab.items()}  # no gap, just no <cls>
    if change.get("gap"):
        vocab["CBMC_G0001"] = len(vocab) + 5
    (folder / "args.json").write_text(json.dumps(args))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(parents.CheckpointProblem) as err:
        parents.register_parent("model-bad", folder.as_uri())
    assert err.value.reason == reason and err.value.field == field, err.value.to_dict()
    assert catalog.list_artifacts("model") == []  # nothing registered


def _dry_run(parent_id: str, dataset_id: str = "dataset-geo-GSE100866") -> dict:
    return train_model_version(parent_id, dataset_id, agent_id=AGENT, wall_time_cap_min=5,
                               vram_cap_gb=1, overrides=TINY, dry_run=True, allow_dirty=True)


def test_the_dry_run_reports_gene_overlap_and_refuses_too_little(sqlite_url, tmp_path,
                                                                 committed_code, monkeypatch):
    from runner.jobs import parents

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    catalog.register_dataset("dataset-geo-GSE100866", "CBMC", builtin_citation("cbmc"))
    ledger.grant(AGENT, "10")
    genes = _cbmc_genes()
    parents.register_parent("model-half", _checkpoint(
        tmp_path / "half", genes[:300] + [f"OTHER{i}" for i in range(300)]).as_uri())
    parents.register_parent("model-none", _checkpoint(
        tmp_path / "none", [f"ENSG{i:011d}" for i in range(500)]).as_uri())

    half = _dry_run("model-half")
    assert half["would_launch"] is True, half["reasons"]
    genes_seen = half["checkpoint"]["genes"]
    assert genes_seen["dataset_genes"] == 500 and genes_seen["matched"] == 300
    assert genes_seen["fraction"] == 0.6 and genes_seen["unmatched_examples"][0] == genes[300]
    assert half["checkpoint"]["heads"]["classifier"].startswith("re-initialised: 13 classes")
    assert half["config"]["parent"]["d_model"] == 32  # args.json's, not conf/'s 64

    none = _dry_run("model-none")
    assert none["would_launch"] is False
    (reason,) = [r for r in none["reasons"] if r["reason"] == "gene_overlap"]
    assert reason["field"] == "policy.min_gene_overlap" and reason["matched"] == 0
    with pytest.raises(parents.CheckpointProblem):  # the real run: before any debit
        train_model_version("model-none", "dataset-geo-GSE100866", agent_id=AGENT,
                            wall_time_cap_min=5, vram_cap_gb=1, overrides=TINY,
                            allow_dirty=True)
    assert ledger.balance(AGENT) == 10 and ledger.list_allocations() == []


def test_the_checkpoint_not_conf_decides_the_architecture(sqlite_url, tmp_path,
                                                          committed_code, monkeypatch):
    """A parent registered by hand without metadata.architecture: the dry run takes the
    architecture from its args.json, not from conf/'s default parent; a registry record that
    disagrees with the files is refused before any debit."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    catalog.register_dataset("dataset-geo-GSE100866", "CBMC", builtin_citation("cbmc"))
    ledger.grant(AGENT, "10")
    folder = _checkpoint(tmp_path / "ckpt", _cbmc_genes())
    for artifact_id, arch in (("model-bare", None), ("model-wrong", {"n_layers": 4})):
        register_by_hand(artifact_id, folder, family="scgpt", architecture=arch)
    bare = _dry_run("model-bare")
    assert bare["would_launch"] is True, bare["reasons"]
    assert {k: bare["config"]["parent"][k] for k in ("n_layers", "d_model", "n_heads")} == \
        {"n_layers": 2, "d_model": 32, "n_heads": 4}
    wrong = _dry_run("model-wrong")
    assert wrong["would_launch"] is False
    assert [(r["reason"], r["field"]) for r in wrong["reasons"]] == \
        [("architecture_mismatch", "parent.n_layers")]


def test_your_own_h5ad_and_checkpoint_through_the_cli(sqlite_url, tmp_path, committed_code,
                                                     monkeypatch):
    """`forge datasets register` reads the file once with the trainer's loader (its citation
    counts the cells); `forge models register` needs no hand-written architecture; a dry run
    on the pair reports the genes the checkpoint knows."""
    import shutil

    from click.testing import CliRunner

    from runner.cli import main

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    own = tmp_path / "my_cells.h5ad"
    shutil.copy(loader_input("pbmc68k_reduced", fetch("pbmc68k_reduced")), own)
    cli = CliRunner()
    out = cli.invoke(main, ["datasets", "register", "dataset-mine", own.as_uri(),
                            "--title", "my PBMCs", "--license", "CC BY 4.0",
                            "--label-key", "bulk_labels"])
    assert out.exit_code == 0, out.output
    cite = catalog.get_artifact("dataset-mine")["metadata"]["citation"]
    assert cite["row_count"] == 700 and cite["format"] == "h5ad" and "765 genes" in \
        cite["schema_summary"]
    bad = cli.invoke(main, ["datasets", "register", "dataset-bad", own.as_uri(), "--title",
                            "x", "--license", "x", "--label-key", "no_such_column"])
    assert bad.exit_code == 2 and "DatasetUnavailable" in bad.output  # typed, one line

    from trainers.data.load import load

    genes = load(own, "h5ad", label_key="bulk_labels").genes
    folder = _checkpoint(tmp_path / "ckpt", genes[:700] + [f"X{i}" for i in range(1000)])
    out = cli.invoke(main, ["models", "register", "model-mine", folder.as_uri(),
                            "--family", "scgpt"])
    assert out.exit_code == 0, out.output
    ledger.grant(AGENT, "10")
    dry = _dry_run("model-mine", "dataset-mine")
    assert dry["would_launch"] is True, dry["reasons"]
    assert dry["checkpoint"]["genes"]["matched"] == 700
    assert dry["checkpoint"]["genes"]["dataset_genes"] == 765
    assert dry["config"]["dataset"]["source"] == own.as_uri()


# --- done when: scGPT 0.2.4's own checkpoint, fine-tuned on the built-in pbmc68k_reduced -------

@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_an_scgpt_0_2_4_checkpoint_fine_tunes_on_pbmc68k_reduced(sqlite_url, committed_code,
                                                                 tmp_path, monkeypatch):
    """A checkpoint written by scGPT's own TransformerModel, with the published args.json keys
    and a shuffled 1,703-token vocabulary, is registered from its files alone, dry-run (the
    gene overlap), fine-tuned for real on pbmc68k_reduced, and the candidate loads back into
    scGPT strictly with its matched genes' embedding rows where they started."""
    import json

    import torch
    from scgpt_reference import PUBLISHED_ARGS, load_into_scgpt_strictly, write_scgpt_checkpoint

    from runner.jobs import parents
    from trainers.data.load import load

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    spec = BUILTINS["pbmc68k_reduced"]
    genes = load(loader_input("pbmc68k_reduced", fetch("pbmc68k_reduced")), spec.format,
                 **spec.load_options).genes
    vocab_genes = genes[:700] + [f"NOT_IN_PBMC_{i}" for i in range(1000)]
    folder = write_scgpt_checkpoint(tmp_path / "scgpt", vocab_genes, seed=3, shuffle=True)
    args = json.loads((folder / "args.json").read_text())
    assert set(args) == set(PUBLISHED_ARGS)
    vocab = json.loads((folder / "vocab.json").read_text())
    assert len(vocab) == 1703 and vocab["<pad>"] != 0  # shuffled ids, specials included

    parents.register_parent("model-scgpt-024", folder.as_uri(), family="scgpt")
    meta = catalog.get_artifact("model-scgpt-024")["metadata"]
    assert meta["architecture"]["n_layers"] == args["nlayers"]  # no hand-written architecture
    assert meta["architecture"]["d_model"] == args["embsize"]
    catalog.register_dataset(DATASET_IDS["pbmc68k_reduced"], "PBMC 68k reduced",
                             builtin_citation("pbmc68k_reduced"))
    ledger.grant(AGENT, "10")
    call = dict(agent_id=AGENT, wall_time_cap_min=5, vram_cap_gb=1,
                overrides=[*TINY, "training.lr=1e-9"])  # barely moves: rows stay comparable
    dry = train_model_version("model-scgpt-024", DATASET_IDS["pbmc68k_reduced"],
                              dry_run=True, **call)
    assert dry["would_launch"] is True, dry["reasons"]
    overlap = dry["checkpoint"]["genes"]
    assert (overlap["matched"], overlap["dataset_genes"]) == (700, 765)
    assert overlap["unmatched_examples"][0] == genes[700]

    result = train_model_version("model-scgpt-024", DATASET_IDS["pbmc68k_reduced"], **call)
    candidate = weights.materialize(catalog.get_artifact(result["artifact_id"]),
                                    tmp_path / "candidate")
    assert json.loads((candidate / "vocab.json").read_text()) == vocab  # the ids it came with
    before = torch.load(folder / "best_model.pt", weights_only=True)["encoder.embedding.weight"]
    after = torch.load(candidate / "best_model.pt", weights_only=True)[
        "encoder.embedding.weight"]
    rows = torch.tensor([vocab[g] for g in genes[:700]])
    assert torch.allclose(after[rows], before[rows], atol=1e-5)  # started from their rows
    load_into_scgpt_strictly(candidate)  # scGPT's own model takes it back, every key
    assert recovery.check() == []


def test_a_broken_parent_registered_by_hand_is_refused_before_any_debit(
        sqlite_url, tmp_path, committed_code, monkeypatch):
    """Registered without register_parent (by hand, or before it existed): the dry run still
    reads its files, and the real call refuses it before the debit, typed."""
    import json

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    catalog.register_dataset("dataset-geo-GSE100866", "CBMC", builtin_citation("cbmc"))
    ledger.grant(AGENT, "10")
    folder = _checkpoint(tmp_path / "ckpt", _cbmc_genes(), pre_norm=True)
    vocab = json.loads((folder / "vocab.json").read_text())
    cls = vocab.pop("<cls>")
    (folder / "vocab.json").write_text(json.dumps({t: i - (i > cls) for t, i in vocab.items()}))
    register_by_hand("model-hand", folder, family="scgpt")
    dry = _dry_run("model-hand")
    assert dry["would_launch"] is False
    assert {(r["reason"], r["field"]) for r in dry["reasons"]} >= {
        ("unsupported_checkpoint", "args.json.pre_norm"), ("vocab_specials", "vocab.json")}
    from runner.jobs.parents import CheckpointProblem

    with pytest.raises(CheckpointProblem) as err:
        train_model_version("model-hand", "dataset-geo-GSE100866", agent_id=AGENT,
                            wall_time_cap_min=5, vram_cap_gb=1, overrides=TINY,
                            allow_dirty=True)
    assert err.value.fix and err.value.field
    assert ledger.balance(AGENT) == 10 and ledger.list_allocations() == []


def test_a_linked_or_special_vocab_json_is_refused(sqlite_url, tmp_path):
    """A checkpoint's JSON files are read without following a link, and only as regular
    files: a vocab.json that is a symlink (to any file) or a FIFO is refused, typed."""
    import os

    from runner.jobs import parents

    folder = _checkpoint(tmp_path / "ckpt", _cbmc_genes())
    real = tmp_path / "elsewhere.json"
    os.replace(folder / "vocab.json", real)
    (folder / "vocab.json").symlink_to(real)
    with pytest.raises(parents.CheckpointProblem) as err:
        parents.inspect(folder, "model-x")
    assert err.value.field == "vocab.json"
    (folder / "vocab.json").unlink()
    os.mkfifo(folder / "vocab.json")
    with pytest.raises(parents.CheckpointProblem) as err:  # and it does not hang on the FIFO
        parents.inspect(folder, "model-x")
    assert err.value.field == "vocab.json"
