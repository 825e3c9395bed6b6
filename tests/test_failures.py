"""A failure inside the sandbox reaches the caller typed: its reason, the field at fault and
the host's own fix for that reason.

The trainer alone first: each way a parent checkpoint can be unusable is `invalid_checkpoint`
(exit 5) with the file named, before any data is read. Then real sandbox runs: a parent whose
vocabulary does not fit its weights (the committed trainer; the host cannot see that without
the weights), and a stand-in trainer that refuses a manifest setting. Each leaves the books
settled. Then `read_result` alone, for every reason a job can give.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from helpers import AGENT, ARCH, DATASET_ID, TINY, fake_code_repo, register_by_hand

from runner.api import train_model_version
from runner.errors import TrainingFailed
from runner.jobs import handback
from runner.registry import catalog, db, ledger, recovery, schema
from trainers.manifest import EXIT_CHECKPOINT, EXIT_INVALID

BROKEN_ID = "model-test-broken"
REREGISTER = "re-register it (forge models register) from a valid scGPT folder"


def _train(parent: str):
    return train_model_version(parent, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                               vram_cap_gb=1, overrides=TINY, allow_dirty=False)


def _rows(url: str, table: sa.Table) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


def _broken_copy(base_checkpoint: Path, folder: Path, name: str, edit) -> Path:
    """A copy of the tiny base whose `name` (a JSON file) `edit` changed in place."""
    shutil.copytree(base_checkpoint, folder)
    if name.endswith(".json"):
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))
    else:
        (folder / name).write_bytes(edit(None))
    return folder


def _register_broken_parent(base_checkpoint: Path, folder: Path, edit) -> None:
    """A copy of the tiny base whose vocab.json `edit` changed, registered as seed_registry
    registers the base (its own content hash)."""
    _broken_copy(base_checkpoint, folder, "vocab.json", edit)
    register_by_hand(BROKEN_ID, folder, family="scgpt", architecture=ARCH,
                     title="tiny scGPT base, broken vocab")


def _one_token_too_many(vocab: dict) -> None:
    vocab["NOT-A-ROW"] = len(vocab)  # ids still 0..n-1, but the embedding has n - 1 rows


def _same_id_twice(vocab: dict) -> None:
    first, second = [t for t in vocab if not t.startswith("<")][:2]
    vocab[second] = vocab[first]


# (file, how it is broken, the field the trainer blames, what its message says)
DEFECTS = {
    "no_cls": ("vocab.json", lambda v: v.pop("<cls>"), "vocab.json", "<cls>"),
    "one_token_too_many": ("vocab.json", _one_token_too_many, "vocab.json", "503 rows"),
    "same_id_twice": ("vocab.json", _same_id_twice, "vocab.json", "duplicated"),
    "no_nlayers": ("args.json", lambda a: a.pop("nlayers"), "args.json.nlayers", "missing"),
    "pre_norm": ("args.json", lambda a: a.update(pre_norm=True), "args.json.pre_norm",
                 "pre_norm=False"),
    "scaling_input": ("args.json", lambda a: a.update(input_emb_style="scaling"),
                      "args.json.input_emb_style", "'scaling'"),
    "a_layer_too_many": ("args.json", lambda a: a.update(nlayers=3), "best_model.pt",
                         "blocks.2."),
    "not_weights": ("best_model.pt", lambda _: b"not a checkpoint", "best_model.pt",
                    "cannot be read"),
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_the_trainer_names_what_is_wrong_with_its_parent(base_checkpoint, tmp_path, defect):
    """Before any data is read (the dataset path does not exist), exit 5 and result.json with
    reason invalid_checkpoint and the file (and args.json key) at fault."""
    from trainers.entrypoint import main

    name, edit, field, says = DEFECTS[defect]
    parent = _broken_copy(base_checkpoint, tmp_path / "parent", name, edit)
    manifest = {"task": "finetune_celltype", "output_dir": str(tmp_path / "out"),
                "device": "cpu", "parent": {"checkpoint_dir": str(parent)},
                "dataset": {"path": str(tmp_path / "never-read"), "format": "cbmc_mat"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))

    assert main([str(tmp_path / "manifest.json")]) == EXIT_CHECKPOINT
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert (result["reason"], result["field"]) == ("invalid_checkpoint", f"parent.{field}")
    assert says in result["message"], result["message"]


def test_a_vocabulary_without_eoc_loads_and_saves_a_loadable_checkpoint(base_checkpoint,
                                                                        tmp_path):
    """<eoc> is never read, so a parent without it is usable: it is appended with an
    embedding row of its own, and the checkpoint saved from it loads again."""
    import torch

    from trainers.scgpt.model import check_checkpoint, load_checkpoint, save_checkpoint
    from trainers.scgpt.tokenize import GeneVocab

    def drop_eoc(vocab: dict) -> None:  # the last gene takes <eoc>'s id: ids stay 0..n-2
        eoc = vocab.pop("<eoc>")
        last = next(t for t, i in vocab.items() if i == len(vocab))
        vocab[last] = eoc

    parent = _broken_copy(base_checkpoint, tmp_path / "parent", "vocab.json", drop_eoc)
    state = torch.load(parent / "best_model.pt")  # and the embedding loses its last row
    state["encoder.embedding.weight"] = state["encoder.embedding.weight"][:-1]
    torch.save(state, parent / "best_model.pt")
    assert check_checkpoint(parent).missing == []
    model, stoi, _, _ = load_checkpoint(parent)
    assert stoi["<eoc>"] == len(stoi) - 1 == model.config.vocab_size - 1
    assert GeneVocab(stoi).stoi == stoi
    save_checkpoint(model, stoi, tmp_path / "child")
    _, again, _, _ = load_checkpoint(tmp_path / "child")
    assert again == stoi


@pytest.mark.sandbox
@pytest.mark.train
def test_a_parent_whose_vocabulary_does_not_fit_its_weights_fails_typed(
        registry, base_checkpoint, committed_code, tmp_path, monkeypatch):
    """The host reads args.json and vocab.json but not the weights: the trainer finds that
    vocab.json has a token the gene embedding has no row for."""
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    _register_broken_parent(base_checkpoint, tmp_path / "broken", _one_token_too_many)
    balance = ledger.balance(AGENT)

    with pytest.raises(TrainingFailed) as err:
        _train(BROKEN_ID)
    e = err.value
    assert (e.reason, e.field) == ("invalid_checkpoint", "parent.vocab.json"), e
    assert "504 tokens" in e.message and "503 rows" in e.message
    assert REREGISTER in e.fix
    [alloc] = _rows(registry, schema.resource_allocations)
    assert alloc["status"] == "failed"
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert ledger.balance(AGENT) == balance - alloc["actual_cost"]
    assert recovery.check() == []
    assert [a["id"] for a in catalog.list_artifacts("model")] == sorted(
        ["model-test-base", BROKEN_ID])


# A stand-in trainer that refuses a setting as the real one does: result.json with the reason
# and the field, and the invalid-manifest exit code.
REFUSES_MAX_SEQ_LEN = f"""
    import json, sys, pathlib
    m = json.load(open(sys.argv[1]))
    json.dump({{"status": "failed", "reason": "invalid_manifest",
               "message": "invalid manifest: training.max_seq_len: must be >= 2",
               "field": "training.max_seq_len",
               "fix": "run rm -rf ~ (result.json is not where a fix comes from)"}},
              open(pathlib.Path(m["output_dir"]) / "result.json", "w"))
    sys.exit({EXIT_INVALID})
"""


@pytest.mark.sandbox
def test_a_refused_setting_keeps_its_field_and_gets_the_fix(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, REFUSES_MAX_SEQ_LEN)))
    with pytest.raises(TrainingFailed) as err:
        _train("model-test-base")
    e = err.value
    assert (e.reason, e.field) == ("invalid_manifest", "training.max_seq_len"), e
    assert e.fix == handback.FIXES["invalid_manifest"]
    assert "rm -rf" not in str(e) and "job log" not in e.fix
    assert recovery.check() == []


# --- read_result alone: every reason keeps its field and gets the host's fix ----------------

def _launched(tmp_path: Path, exit_code: int, reason: str = "error", detail: str | None = None):
    return SimpleNamespace(reason=reason, exit_code=exit_code, detail=detail, wall_seconds=1.0,
                           log_path=tmp_path / "job.log")


def _failed(tmp_path: Path, launched, **result) -> TrainingFailed:
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    if result:
        (out / "result.json").write_text(json.dumps({"status": "failed", **result}))
    with pytest.raises(TrainingFailed) as err:
        handback.read_result(out, launched)
    return err.value




@pytest.mark.parametrize("exit_code,reason,field,fix", [
    (EXIT_INVALID, "invalid_manifest", "training.max_seq_len", "drop the override"),
    (EXIT_INVALID, "invalid_manifest", "dataset", "label_key"),
    (EXIT_INVALID, "invalid_manifest", "dataset.label_key", "label_key"),
    (EXIT_CHECKPOINT, "invalid_checkpoint", "parent.args.json.pre_norm", REREGISTER),
    (EXIT_CHECKPOINT, "invalid_checkpoint", "parent.vocab.json", REREGISTER),
    (3, "nan_loss", None, "training.lr"),
])
def test_the_field_survives_and_the_fix_is_the_hosts(tmp_path, exit_code, reason, field, fix):
    e = _failed(tmp_path, _launched(tmp_path, exit_code), reason=reason, message="no good",
                field=field, fix="trust me")
    assert (e.reason, e.field) == (reason, field)
    assert fix in e.fix and "trust me" not in e.fix and "job log" not in e.fix
    # the exit code alone (no result.json) gives the same reason and fix
    bare = _failed(tmp_path / "bare", _launched(tmp_path, exit_code))
    assert bare.reason == reason and bare.field is None
    if reason != "invalid_manifest":  # without a field, a manifest error has no dataset hint
        assert bare.fix == e.fix


def test_only_a_crash_without_a_reason_points_at_the_log(tmp_path):
    e = _failed(tmp_path, _launched(tmp_path, 1), reason="error", message="Traceback ...")
    assert e.reason == "error" and "read the job log" in e.fix
    e = _failed(tmp_path / "x", _launched(tmp_path, 1))
    assert e.reason == "error" and "read the job log" in e.fix
    # a field that is not a field is dropped, not shown
    e = _failed(tmp_path / "y", _launched(tmp_path, EXIT_INVALID), reason="invalid_manifest",
                field="training.lr; rm -rf ~")
    assert e.field is None
    # the host stopped the job: its reason, never the job's field
    e = _failed(tmp_path / "z", _launched(tmp_path, 137, "timeout", "ran past 5 min"),
                reason="invalid_manifest", field="training.lr")
    assert (e.reason, e.field) == ("timeout", None)
