"""Our model loads scGPT 0.2.4 checkpoints and gives the same outputs (eval mode).

scGPT's model.py is fetched from the scgpt==0.2.4 wheel (pip download, sha256-checked,
cached under $FORGE_CACHE_DIR or $FORGE_HOME/cache) and imported on its own.
"""

import json

import numpy as np
import pytest
import torch
from scgpt_reference import (
    PUBLISHED_ARGS,
    load_into_scgpt_strictly,
    randomise_parameters,
    scgpt_transformer_model,
    write_scgpt_checkpoint,
)

from trainers.scgpt.model import CheckpointError, load_checkpoint, save_checkpoint
from trainers.scgpt.tokenize import GeneVocab, Tokenizer

CFG = {"d_model": 64, "n_heads": 4, "d_hid": 96, "n_layers": 3, "n_cls": 7}


def _batch(vocab: GeneVocab, n_genes: int, style: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(0.7, size=(12, n_genes)).astype(np.float32)
    X[3, :] = 0
    X[3, :4] = 5  # one short cell, so the batch is padded
    tok = Tokenizer(gene_ids=np.arange(n_genes) + 3, cls_id=vocab.cls_id, pad_id=vocab.pad_id,
                    max_seq_len=33, pad_value=-2 if style == "continuous" else 51,
                    mask_value=-1 if style == "continuous" else 52)
    b = tok(X, rng)
    assert b["pad_mask"].any()
    return {k: torch.from_numpy(v) for k, v in b.items()}


def _write_scgpt_folder(folder, ref, vocab, style, flash_names=False):
    folder.mkdir()
    state = ref.state_dict()
    if flash_names:  # what scGPT's released (flash-attn) checkpoints contain
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    torch.save(state, folder / "best_model.pt")
    (folder / "vocab.json").write_text(json.dumps(vocab.stoi))
    (folder / "args.json").write_text(json.dumps({
        "embsize": CFG["d_model"], "nheads": CFG["n_heads"], "d_hid": CFG["d_hid"],
        "nlayers": CFG["n_layers"], "n_layers_cls": 3, "dropout": 0.2, "n_bins": 51,
        "input_emb_style": style, "pad_token": "<pad>",
        "pad_value": -2 if style == "continuous" else 51,
        "mask_value": -1 if style == "continuous" else 52,
        "fast_transformer": flash_names}))


@pytest.mark.parametrize("style,flash_names,mvc", [
    ("continuous", False, False), ("continuous", True, True), ("category", False, True)])
def test_scgpt_checkpoint_loads_and_matches(tmp_path, style, flash_names, mvc):
    n_genes = 40
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(n_genes)])
    torch.manual_seed(0)
    ref = scgpt_transformer_model(vocab.stoi, CFG["d_model"], CFG["n_heads"], CFG["d_hid"],
                                  CFG["n_layers"], CFG["n_cls"], input_emb_style=style,
                                  pad_value=-2 if style == "continuous" else 51, do_mvc=mvc)
    randomise_parameters(ref)
    ref.eval()
    _write_scgpt_folder(tmp_path / "ckpt", ref, vocab, style, flash_names)

    ours, stoi, _, report = load_checkpoint(tmp_path / "ckpt")
    ours.eval()
    assert stoi == vocab.stoi
    assert report.missing == [] and report.shape_mismatch == []
    assert report.unexpected == []

    b = _batch(vocab, n_genes, style)
    assert ours.config.do_mvc == mvc
    with torch.no_grad():
        theirs = ref(b["genes"], b["values"], b["pad_mask"], CLS=True, MVC=mvc)
        mine = ours(b["genes"], b["values"], b["pad_mask"], cls=True, mvc=mvc)
    torch.testing.assert_close(mine["cell_emb"], theirs["cell_emb"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["cls_output"], theirs["cls_output"], atol=1e-5, rtol=1e-5)
    keep = ~b["pad_mask"]  # scGPT's nested-tensor fast path zeroes padded positions
    torch.testing.assert_close(mine["mlm_output"][keep], theirs["mlm_output"][keep],
                               atol=1e-5, rtol=1e-5)
    if mvc:
        torch.testing.assert_close(mine["mvc_output"][keep], theirs["mvc_output"][keep],
                                   atol=1e-5, rtol=1e-5)


def test_our_checkpoint_loads_into_scgpt_strictly(tmp_path):
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(30)])
    ref = scgpt_transformer_model(vocab.stoi, CFG["d_model"], CFG["n_heads"], CFG["d_hid"],
                                  CFG["n_layers"], CFG["n_cls"])
    randomise_parameters(ref, seed=1)
    _write_scgpt_folder(tmp_path / "a", ref, vocab, "continuous")
    ours, stoi, _, _ = load_checkpoint(tmp_path / "a")
    paths = save_checkpoint(ours, stoi, tmp_path / "b")
    args = json.loads(paths["args.json"].read_text())
    assert (args["embsize"], args["nlayers"], args["nheads"], args["d_hid"]) == (64, 3, 4, 96)
    fresh = scgpt_transformer_model(vocab.stoi, 64, 4, 96, 3, 7)
    fresh.load_state_dict(torch.load(paths["best_model.pt"]), strict=True)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_mismatched_checkpoint_is_reported(tmp_path):
    vocab = GeneVocab.from_genes([f"G{i}" for i in range(30)])
    ref = scgpt_transformer_model(vocab.stoi, 64, 4, 96, 3, 7)
    _write_scgpt_folder(tmp_path / "c", ref, vocab, "continuous")
    args = json.loads((tmp_path / "c" / "args.json").read_text())
    args["nlayers"] = 4  # claims a layer the weights do not have
    (tmp_path / "c" / "args.json").write_text(json.dumps(args))
    with pytest.raises(CheckpointError, match=r"missing: .*blocks\.3\."):
        load_checkpoint(tmp_path / "c")
    # a checkpoint with an extra head (scGPT's explicit-zero-prob decoder) loads, reporting
    # the extra keys
    state = torch.load(tmp_path / "c" / "best_model.pt")
    state["decoder.zero_logit.0.weight"] = torch.zeros(64, 64)
    torch.save(state, tmp_path / "c" / "best_model.pt")
    args["nlayers"] = 3
    (tmp_path / "c" / "args.json").write_text(json.dumps(args))
    _, _, _, report = load_checkpoint(tmp_path / "c")
    assert report.unexpected == ["decoder.zero_logit.0.weight"]


def test_a_published_style_checkpoint_with_shuffled_ids_round_trips(tmp_path):
    """scGPT's own model, a vocab.json whose ids are a shuffle (specials not first) and the
    published args.json: it loads into ours with every gene on its own row, and what we save
    loads back into scGPT strictly, unchanged."""
    genes = [f"G{i}" for i in range(25)]
    folder = write_scgpt_checkpoint(tmp_path / "published", genes, seed=3)
    vocab = json.loads((folder / "vocab.json").read_text())
    assert vocab["<pad>"] != 0 and list(vocab.values()) != sorted(vocab.values())
    args = json.loads((folder / "args.json").read_text())
    assert set(args) == set(PUBLISHED_ARGS) and args["embsize"] == 32
    theirs = torch.load(folder / "best_model.pt")

    ours, stoi, _, report = load_checkpoint(folder)
    assert stoi == vocab and report.missing == report.unexpected == report.shape_mismatch == []
    assert ours.config.do_mvc and ours.config.pad_token_id == vocab["<pad>"]
    row = ours.encoder.embedding.weight.detach()
    for gene in ("<cls>", "G0", "G17"):
        torch.testing.assert_close(row[stoi[gene]], theirs["encoder.embedding.weight"][vocab[gene]])

    save_checkpoint(ours, stoi, tmp_path / "back")
    back = load_into_scgpt_strictly(tmp_path / "back").state_dict()
    assert set(back) == set(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(back[key], value, msg=key)
    torch.testing.assert_close(back["encoder.embedding.weight"][vocab["G17"]],
                               row[stoi["G17"]])
