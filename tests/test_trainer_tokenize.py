"""Tokenization: binning bit-for-bit as scGPT 0.2.4, vocab, batch sampling and masking."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scgpt_reference import scgpt_binning

from runner.jobs.datasets import fetch
from trainers.data.load import load
from trainers.scgpt.tokenize import SPECIALS, GeneVocab, Tokenizer, bin_edges, binning


@pytest.fixture(scope="module")
def scgpt_bin():
    return scgpt_binning()


@pytest.fixture(scope="module")
def cbmc():
    return load(fetch("cbmc"), "cbmc_mat", name="cbmc")


def _scgpt_rows(ref, X, seed, n_bins=51):
    """scGPT bins row by row, drawing its tie-breaking uniforms from the global RNG."""
    np.random.seed(seed)
    return np.stack([ref(row, n_bins) for row in X]).astype(np.int64)


@pytest.mark.parametrize("transform", ["counts", "float_counts", "log1p"])
def test_binning_matches_scgpt_on_cbmc(scgpt_bin, cbmc, transform):
    X = cbmc.X[:256]
    X = {"counts": X.astype(np.uint16), "float_counts": X,
         "log1p": np.log1p(X).astype(np.float32)}[transform]
    ours = binning(X, 51, np.random.RandomState(7))
    assert np.array_equal(ours, _scgpt_rows(scgpt_bin, X, seed=7))
    assert ours.min() == 0 and ours.max() == 50
    assert np.array_equal(ours > 0, X > 0)  # zero stays zero, expressed is >= 1


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 30)),
              elements=st.sampled_from([0.0, 0.0, 1.0, 2.0, 2.0, 3.5, 7.25, 100.0])),
       st.integers(3, 60), st.integers(0, 2**31 - 1))
def test_binning_matches_scgpt_with_ties(scgpt_bin, X, n_bins, seed):
    X[:, 0] = 1.0  # scGPT's binning needs a non-zero value in every row
    ours = binning(X, n_bins, np.random.RandomState(seed))
    assert np.array_equal(ours, _scgpt_rows(scgpt_bin, X, seed, n_bins))


def test_bin_edges_are_numpy_quantiles(cbmc):
    X = np.log1p(cbmc.X[:64]).astype(np.float32)
    expected = np.stack([np.quantile(r[r != 0], np.linspace(0, 1, 50)) for r in X])
    assert np.array_equal(bin_edges(X, 51), expected)


def test_vocab_specials_and_scgpt_default_vocab(tmp_path):
    v = GeneVocab.from_genes(["A", "B", "A"])
    assert [v[s] for s in SPECIALS] == [0, 1, 2] and v["A"] == 3 and len(v) == 5
    assert v.lookup(["B", "nope"]).tolist() == [4, -1]
    v.save_json(tmp_path / "vocab.json")
    assert GeneVocab.from_file(tmp_path / "vocab.json").stoi == v.stoi

    path = fetch("scgpt_default_vocab") / "default_gene_vocab.json"
    raw = json.loads(path.read_text())
    default = GeneVocab.from_file(path)  # no specials inside: appended at the end, as scGPT
    assert len(default) == len(raw) + 3 and default.pad_id == len(raw)
    assert default["CD3E"] == raw["CD3E"]


def _tokenizer(n_genes, max_seq_len, **kw):
    return Tokenizer(gene_ids=np.arange(n_genes) + 3, cls_id=1, pad_id=0,
                     max_seq_len=max_seq_len, **kw)


def test_tokenizer_samples_expressed_genes_pads_and_masks(cbmc):
    X = cbmc.X[:64].copy()
    X[5, :] = 0
    X[5, [10, 20, 30]] = [1, 2, 3]  # a cell with three expressed genes
    tok = _tokenizer(X.shape[1], 129)
    b = tok(X, np.random.default_rng(0), mask_ratio=0.4)
    B, T = b["genes"].shape
    assert (B, T) == (64, 129)
    assert (b["genes"][:, 0] == 1).all() and not b["pad_mask"][:, 0].any()
    assert not b["mlm_mask"][:, 0].any()
    for i in range(B):
        real = ~b["pad_mask"][i]
        genes = b["genes"][i, real][1:] - 3
        assert len(set(genes.tolist())) == len(genes)  # sampled without replacement
        assert (X[i, genes] > 0).all()  # only expressed genes
        assert len(genes) == min(128, int((X[i] > 0).sum()))
        assert real[:len(genes) + 1].all()  # padding only at the end
        assert (b["genes"][i, ~real] == 0).all() and (b["values"][i, ~real] == -2).all()
        n_mask = int(b["mlm_mask"][i].sum())
        assert n_mask == int(len(genes) * 0.4)  # scGPT's random_mask_value count
        assert (b["values"][i, b["mlm_mask"][i]] == -1).all()
        assert (b["target"][i, b["mlm_mask"][i]] >= 1).all()
    assert b["pad_mask"][5].sum() == 129 - 4


def test_tokenizer_trims_to_longest_cell_and_is_seeded(cbmc):
    X = np.zeros((4, 50), np.float32)
    X[:, :7] = np.arange(1, 8)
    tok = _tokenizer(50, 257)
    a = tok(X, np.random.default_rng(3), mask_ratio=0.3)
    b = tok(X, np.random.default_rng(3), mask_ratio=0.3)
    assert a["genes"].shape == (4, 8)  # <cls> + 7 expressed genes, not 257
    for k in a:
        assert np.array_equal(a[k], b[k])
    zeros = _tokenizer(50, 21, include_zero_gene=True)(X, np.random.default_rng(0))
    assert zeros["genes"].shape == (4, 21) and not zeros["pad_mask"].any()
