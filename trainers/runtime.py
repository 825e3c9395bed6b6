"""Where and how a job computes: the device it gets and the precision "auto" means. Shared by
the trainer, the eval gate's job and the MLflow model."""

from __future__ import annotations

from pathlib import Path


def choose_device(m, state: dict) -> str:
    """The manifest's device (`m.device`, `m.vram_cap_gb`) as it can be had here, recorded in
    `state`; the VRAM cap applied."""
    import torch
    has_cuda = torch.cuda.is_available()
    device = "cuda" if m.device in ("cuda", "auto") and has_cuda else "cpu"
    if m.device == "cuda" and not has_cuda:
        print("warning: device cuda requested but no GPU is visible; running on cpu",
              flush=True)
    if device == "cuda" and m.vram_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, m.vram_cap_gb / total), 0)
    state["device"] = device
    return device


def choose_precision(requested: str, device: str, cpuinfo: str | None = None) -> str:
    """"auto": bf16 autocast on GPUs and on CPUs with native bf16 arithmetic (AMX or
    AVX512-BF16), fp32 on other CPUs, where bf16 is emulated and slower than fp32.

    Measured on a 2-core AVX512-BF16 CPU without AMX (benchmarks/trainer_throughput.py,
    dropout 0): the pilot's step 177 ms in bf16 vs 217 ms in fp32.
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16-mixed"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set(cpuinfo.split())
    return "bf16-mixed" if flags & {"amx_bf16", "avx512_bf16"} else "32"
