"""Training-step throughput: our scGPT-compatible model vs scGPT 0.2.4's TransformerModel.

Same config, same tokenized CBMC batch, same loss (cross-entropy on the <cls> head plus
MSE of the expression decoder on 40% masked genes), same AdamW step, CPU. Steps of the
two models alternate, so a noisy neighbour slows both alike; the median of several
steps is reported, in cells/second, and the ratio.

    python benchmarks/trainer_throughput.py                  # 4 layers, d 128, seq 257
    python benchmarks/trainer_throughput.py --dropout 0.2 --precision bf16-mixed

scGPT's model.py is fetched from the scgpt==0.2.4 wheel (pip download, sha256-checked,
cached under $FORGE_CACHE_DIR or $FORGE_HOME/cache).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainers.data.fetch import fetch  # noqa: E402
from trainers.data.load import load  # noqa: E402
from trainers.scgpt.model import ScGPT, ScGPTConfig  # noqa: E402
from trainers.scgpt.reference import scgpt_transformer_model  # noqa: E402
from trainers.scgpt.tokenize import GeneVocab, Tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-hid", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--seq", type=int, default=257, help="max_seq_len incl. <cls>")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--style", default="continuous", choices=["continuous", "category"])
    ap.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # as the trainer does; helps both models
    torch.manual_seed(0)
    data = load(fetch("cbmc"), "cbmc_mat")
    vocab = GeneVocab.from_genes(data.genes)
    category = a.style == "category"
    pad_value, mask_value = (51, 52) if category else (-2, -1)
    tok = Tokenizer(gene_ids=vocab.lookup(data.genes), cls_id=vocab.cls_id, pad_id=vocab.pad_id,
                    max_seq_len=a.seq, pad_value=pad_value, mask_value=mask_value)
    rng = np.random.default_rng(0)
    idx = rng.choice(data.n_cells, a.batch, replace=False)
    b = {k: torch.from_numpy(v) for k, v in tok(data.X[idx], rng, mask_ratio=0.4).items()}
    labels = torch.from_numpy(data.labels[idx])
    n_cls = len(data.label_names)

    ours = ScGPT(ScGPTConfig(vocab_size=len(vocab), d_model=a.d_model, n_heads=a.heads,
                             d_hid=a.d_hid, n_layers=a.layers, n_cls=n_cls, dropout=a.dropout,
                             pad_token_id=vocab.pad_id, input_emb_style=a.style,
                             pad_value=pad_value, mask_value=mask_value, do_mvc=False))
    theirs = scgpt_transformer_model(vocab.stoi, a.d_model, a.heads, a.d_hid, a.layers, n_cls,
                                     dropout=a.dropout, input_emb_style=a.style,
                                     pad_value=pad_value)

    def make_step(model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step():
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16)
                        if a.precision == "bf16-mixed" else contextlib.nullcontext())
            with autocast:
                out = call(model)
                loss = (F.cross_entropy(out["cls_output"].float(), labels)
                        + F.mse_loss(out["mlm_output"].float()[b["mlm_mask"]],
                                     b["target"][b["mlm_mask"]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step

    steps = {
        "ours": make_step(ours, lambda m: m(b["genes"], b["values"], b["pad_mask"], cls=True)),
        "scGPT 0.2.4": make_step(theirs, lambda m: m(b["genes"], b["values"], b["pad_mask"],
                                                     CLS=True)),
    }
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up
        step()
    for _ in range(a.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)

    T = b["genes"].shape[1]
    print(f"config: {a.layers} layers, d_model {a.d_model}, {a.heads} heads, d_hid {a.d_hid}, "
          f"dropout {a.dropout}, {a.style} values, batch {a.batch} x {T} tokens "
          f"({float(b['pad_mask'].float().mean()):.1%} padding), precision {a.precision}, "
          f"{a.threads} threads, median of {a.steps} steps")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = a.batch / med
        print(f"{name:>12}: {med * 1000:8.1f} ms/step  {rate[name]:8.1f} cells/s  "
              f"(min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f} ms)")
    print(f"ratio ours / scGPT: {rate['ours'] / rate['scGPT 0.2.4']:.2f}x")


if __name__ == "__main__":
    main()
