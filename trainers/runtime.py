"""Where and how a job computes: the device it gets, the precision "auto" means, for a
multi-device job its rank and Lightning strategy, and the phases of its start that the job
log states (`phase`). Shared by the trainer, the eval gate's job and the MLflow model."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PHASES = ("jail_ready", "imports_done", "data_ready", "first_step")


def phase(name: str, state: dict) -> None:
    """Mark phase `name` of the job's start: recorded once in `state["phases"]` (wall-clock
    Unix seconds; the jail shares the host's clock, so the host can subtract its launch time)
    and stated in the job log as `phase <name> <unix time> (+<s since jail_ready>)`."""
    phases = state.setdefault("phases", {})
    if name in phases:
        return
    now = time.time()
    phases[name] = round(now, 4)
    if process_rank() == 0:
        since = max(0.0, now - phases.get("jail_ready", now))
        print(f"phase {name} {now:.3f} (+{since:.3f} s)", file=sys.stdout, flush=True)

# The process group's rendezvous. The jail has a network namespace of its own holding only
# lo, so no other job shares this address and a fixed port never collides.
MASTER_ADDR, MASTER_PORT = "127.0.0.1", 29500


def process_rank() -> int:
    """This process's rank in a multi-device job, 0 when alone. Lightning's launcher starts
    ranks 1.. by re-running the entrypoint with LOCAL_RANK set (a job runs on one host, so
    the local rank is the global one); rank 0 is the process the sandbox started."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def strategy(devices: int, device: str):
    """Lightning's strategy for `devices` processes: "auto" (one device) or DDP over loopback,
    gloo on cpu and NCCL on cuda, the same path for both. Lightning starts ranks 1.. as
    subprocesses that re-run `python -m trainers.entrypoint MANIFEST` (start_method "popen":
    each rank loads its own data; nothing is pickled across). The graph is static (a task
    always uses the same heads), so DDP need not search for unused parameters each step."""
    if devices == 1:
        return "auto"
    from pytorch_lightning.strategies import DDPStrategy

    os.environ["MASTER_ADDR"] = MASTER_ADDR
    os.environ.setdefault("MASTER_PORT", str(MASTER_PORT))  # a test outside the jail may pick
    if device == "cuda":
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # the jail's only interface
    return DDPStrategy(process_group_backend="nccl" if device == "cuda" else "gloo",
                       start_method="popen", static_graph=True)


def choose_device(m, state: dict) -> str:
    """The manifest's device (`m.device`, `m.vram_cap_gb`) as it can be had here, recorded in
    `state`; the VRAM cap applied."""
    import torch
    has_cuda = torch.cuda.is_available()
    device = "cuda" if m.device in ("cuda", "auto") and has_cuda else "cpu"
    if m.device == "cuda" and not has_cuda:
        print("warning: device cuda requested but no GPU is visible; running on cpu",
              flush=True)
    if device == "cuda" and m.vram_cap_gb:  # per GPU: a multi-device job's rank N has GPU N
        index = process_rank()
        total = torch.cuda.get_device_properties(index).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, m.vram_cap_gb / total), index)
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
