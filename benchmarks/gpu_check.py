"""GPU check for the whole-human scGPT config: tokens/s, model FLOP utilisation, peak memory.

    python benchmarks/gpu_check.py                 # from the repo root, on a CUDA machine
    python benchmarks/gpu_check.py --batch 16 --compile
    python benchmarks/gpu_check.py --smoke         # a tiny config, seconds: CUDA if any, else CPU

Config: scGPT's whole-human model (12 layers, d_model 512, 8 heads, d_hid 512, vocab
60,697, seq 1,200), trained as the trainer does on a GPU: bf16 autocast, AdamW, masked
gene-expression loss on 40% of the genes + the MVC head. Synthetic tokens (no data, no
network). Two cases: full sequences (no padding mask: SDPA may pick FlashAttention) and
20% padding (a boolean mask: the memory-efficient kernel).

MFU = achieved model FLOPs / peak dense bf16 FLOPs; model FLOPs per token are
6 x (non-embedding parameters) + 12 x layers x seq x d_model (attention scores and
values, forward + backward). Peak: H100/H200 SXM 989 TFLOPS, H100 PCIe 756, A100 312,
L40S 362; override with --peak-tflops. Without CUDA it says so and exits 0; `--smoke` then
runs the tiny config on CPU (the whole script but the CUDA calls) and says it skipped them.
Exits 1 on an out-of-memory case or a non-finite loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1200)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-hid", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=60697)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny config for seconds (no figures): on CUDA if there is one, "
                         "else on CPU")
    ap.add_argument("--cpu-smoke", action="store_true", help="--smoke, on CPU even with CUDA")
    a = ap.parse_args()

    import torch
    if a.smoke and not a.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check --smoke: no CUDA device visible; running the tiny config on CPU "
              "(skipped: CUDA kernels, peak memory, MFU)")
        a.cpu_smoke = True
    if a.smoke or a.cpu_smoke:
        a.batch, a.seq, a.layers, a.d_model, a.heads, a.d_hid, a.vocab = 2, 64, 2, 64, 4, 64, 500
        a.steps, a.warmup = 2, 1
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (torch "
              f"{torch.__version__}); nothing to measure. Run it on a GPU machine.")
        return 0

    import torch.nn.functional as F

    from trainers.scgpt.model import ScGPT, ScGPTConfig

    cuda = not a.cpu_smoke
    dev = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "cpu (smoke test)"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = ScGPT(ScGPTConfig(vocab_size=a.vocab, d_model=a.d_model, n_heads=a.heads,
                              d_hid=a.d_hid, n_layers=a.layers, n_cls=1, dropout=0.2,
                              do_mvc=True)).to(dev)
    n_params = model.num_params()
    n_embed = model.encoder.embedding.weight.numel()
    flops_per_token = 6 * (n_params - n_embed) + 12 * a.layers * a.seq * a.d_model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    fwd = torch.compile(model.encode) if a.compile else model.encode

    def batch(pad_frac: float):
        B, T = a.batch, a.seq
        genes = torch.randint(3, a.vocab, (B, T), device=dev)
        genes[:, 0] = 1  # <cls>
        values = torch.randint(1, 51, (B, T), device=dev).float()
        pad = torch.zeros(B, T, dtype=torch.bool, device=dev)
        if pad_frac:
            lengths = torch.randint(int(T * (1 - 2 * pad_frac)), T + 1, (B,), device=dev)
            pad = torch.arange(T, device=dev)[None, :] >= lengths[:, None]
            genes[pad], values[pad] = 0, -2.0
        mask = (torch.rand(B, T, device=dev) < 0.4) & ~pad
        mask[:, 0] = False
        target = values.clone()
        values = values.masked_fill(mask, -1.0)
        return genes, values, pad, mask, target

    def step(genes, values, pad, mask, target):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            h = fwd(genes, values, pad)
            pred = model.decoder(h[mask]).float()
            rows = mask.nonzero()[:, 0]
            mvc = model.mvc_decoder(h[:, 0][rows], model.encoder(genes[mask])).float()
            loss = F.mse_loss(pred, target[mask]) + F.mse_loss(mvc, target[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    print(f"device: {name}, torch {torch.__version__}, peak bf16 "
          f"{f'{peak:.0f} TFLOPS' if peak else 'unknown (pass --peak-tflops)'}")
    print(f"model: {a.layers} layers, d_model {a.d_model}, {a.heads} heads, d_hid {a.d_hid}, "
          f"vocab {a.vocab}: {n_params / 1e6:.1f}M parameters "
          f"({(n_params - n_embed) / 1e6:.1f}M non-embedding); batch {a.batch} x seq {a.seq}, "
          f"bf16 autocast{', torch.compile' if a.compile else ''}")
    ok = True
    for label, pad_frac in (("full sequences", 0.0), ("20% padding", 0.2)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        data = batch(pad_frac)
        try:
            for _ in range(a.warmup):
                step(*data)
            sync()
            times = []
            for _ in range(a.steps):
                t = time.perf_counter()
                loss = step(*data)
                sync()
                times.append(time.perf_counter() - t)
        except torch.cuda.OutOfMemoryError:
            print(f"{label}: out of memory at batch {a.batch}; try --batch {a.batch // 2}")
            ok = False
            continue
        med = statistics.median(times)
        tokens = a.batch * a.seq  # padded positions cost the same compute
        tps = tokens / med
        mfu = tps * flops_per_token / (peak * 1e12) if peak else float("nan")
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        ok &= bool(torch.isfinite(loss))
        print(f"{label:>15}: {med * 1000:7.1f} ms/step  {tps:10.0f} tokens/s  "
              f"{a.batch / med:7.1f} cells/s  MFU {mfu:6.1%}  peak memory {mem:.2f} GiB  "
              f"(loss {float(loss):.2f}, finite {bool(torch.isfinite(loss))})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
