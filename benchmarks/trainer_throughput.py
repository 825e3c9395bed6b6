"""Training-step throughput: our scGPT-compatible model vs scGPT 0.2.4's TransformerModel.

Same config, same tokenized CBMC batch, same AdamW, CPU. Each model takes the training
step its own code takes for the task:
- finetune (default): ours runs the trainer's step (ScGPTModule: encoder + <cls> head,
  cross-entropy); scGPT runs forward(CLS=True) + cross-entropy, as its annotation
  tutorial does (its forward also decodes expression at every token).
- pretrain: ours the trainer's masked-gene step (expression + MVC heads on the masked
  positions); scGPT forward(MVC=True) + the two masked MSEs, as its pretraining does.
Dropout defaults to 0.2, the value of scGPT's published models and tutorials (on CPU
scGPT's nn.MultiheadAttention then leaves the fused attention kernel; ours keeps it, see
model.py). Steps of the two models alternate, so a noisy neighbour slows both alike; the
median of several steps is reported in cells/second, and the ratio.

    python benchmarks/trainer_throughput.py                       # 4 layers, d 128, seq 257
    python benchmarks/trainer_throughput.py --dropout 0 --precision bf16-mixed
    python benchmarks/trainer_throughput.py --d-model 64 --heads 2 --d-hid 128 --style category
    python benchmarks/trainer_throughput.py --smoke   # 1 layer, d 32, 8 x 33 tokens: seconds

scGPT's model.py is fetched from the scgpt==0.2.4 wheel (pip download, sha256-checked,
cached under $FORGE_CACHE_DIR or $FORGE_HOME/cache).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np
import torch
import torch.nn.functional as F

from runner.jobs.datasets import fetch
from trainers.data.load import load
from trainers.scgpt.lightning import FINETUNE, PRETRAIN, ScGPTModule
from trainers.scgpt.model import ScGPT, ScGPTConfig
from trainers.scgpt.tokenize import GeneVocab, Tokenizer

REPO = Path(__file__).resolve().parents[1]


def scgpt_reference():
    """tests/scgpt_reference.py, loaded from its file: the reference lives with the tests
    (training never needs it), and tests/ is not a package to import from."""
    spec = importlib.util.spec_from_file_location("scgpt_reference",
                                                  REPO / "tests" / "scgpt_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-hid", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--task", default="finetune", choices=["finetune", "pretrain"])
    ap.add_argument("--seq", type=int, default=257, help="max_seq_len incl. <cls>")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--style", default="continuous", choices=["continuous", "category"])
    ap.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per model")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--smoke", action="store_true",
                    help="1 layer, d_model 32, batch 8 x 33 tokens, 1 step: checks the script")
    a = ap.parse_args()
    if a.smoke:
        a.layers, a.d_model, a.heads, a.d_hid, a.seq, a.batch, a.steps = 1, 32, 2, 64, 33, 8, 1

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

    pretrain = a.task == "pretrain"
    ours = ScGPT(ScGPTConfig(vocab_size=len(vocab), d_model=a.d_model, n_heads=a.heads,
                             d_hid=a.d_hid, n_layers=a.layers, n_cls=n_cls, dropout=a.dropout,
                             pad_token_id=vocab.pad_id, input_emb_style=a.style,
                             pad_value=pad_value, mask_value=mask_value, do_mvc=pretrain))
    theirs = scgpt_reference().scgpt_transformer_model(
        vocab.stoi, a.d_model, a.heads, a.d_hid, a.layers, n_cls, dropout=a.dropout,
        input_emb_style=a.style, pad_value=pad_value, do_mvc=pretrain)
    module = ScGPTModule(ours, PRETRAIN if pretrain else FINETUNE, lr=1e-4, n_cls=n_cls)
    batch = {**b, "labels": labels}
    masked = b["mlm_mask"]

    def ours_loss():
        return module.compute_loss(batch)[0]  # exactly the trainer's training step

    def scgpt_loss():
        out = theirs(b["genes"], b["values"], b["pad_mask"], CLS=not pretrain, MVC=pretrain)
        if not pretrain:
            return F.cross_entropy(out["cls_output"].float(), labels)
        target = b["target"][masked]
        return (F.mse_loss(out["mlm_output"].float()[masked], target)
                + F.mse_loss(out["mvc_output"].float()[masked], target))

    losses = []

    def make_step(model, loss_fn):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()

        def step():
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16)
                        if a.precision == "bf16-mixed" else contextlib.nullcontext())
            with autocast:
                loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return step

    steps = {"ours": make_step(ours, ours_loss), "scGPT 0.2.4": make_step(theirs, scgpt_loss)}
    times = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(a.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)

    T = b["genes"].shape[1]
    print(f"{a.task} step; config: {a.layers} layers, d_model {a.d_model}, {a.heads} heads, "
          f"d_hid {a.d_hid}, "
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
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    if not finite:
        print("a loss was not finite")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
