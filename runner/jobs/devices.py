"""Which device a job gets, and which row of the price table it is billed at.

Resolved once per request, in the dry-run steps, so the estimate, the debit, the allocation
and the sandbox all speak of the same device. `auto` is the hardware this host really has:
the CPU, or its first GPU priced by the pricing key its name contains (an H200 is `h200`).
A GPU no price row names, or a named device this host lacks, is refused before any debit:
money follows the hardware.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache

from runner import sandbox
from runner.errors import ForgeError
from runner.registry import money


class DeviceUnavailable(ForgeError):
    reason = "device_unavailable"


@dataclass(frozen=True)
class Device:
    price_key: str  # the row of pricing.per_device this job is billed at
    sandbox: str  # what the sandbox binds: "cpu" or "cuda:0"
    name: str  # what the hardware calls itself ("cpu", "NVIDIA H200")

    @property
    def resource_type(self) -> str:
        return "cpu" if self.sandbox == "cpu" else "gpu"


def gpu_names() -> tuple[str, ...]:
    """Names of this host's GPUs, index order; () without a driver (nvidia-smi)."""
    return _gpu_names(os.environ.get("FORGE_NVIDIA_SMI") or shutil.which("nvidia-smi") or "")


@lru_cache(maxsize=4)
def _gpu_names(smi: str) -> tuple[str, ...]:
    if not smi or not os.path.exists("/dev/nvidia0"):
        return ()
    try:
        out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def price_key_for(name: str, per_device: dict) -> str | None:
    """The pricing key a GPU's name contains ('NVIDIA H200 NVL' -> 'h200'); longest wins."""
    flat = name.lower().replace(" ", "").replace("-", "")
    keys = [k for k in per_device if k != "cpu" and k.lower().replace("-", "") in flat]
    return max(keys, key=len) if keys else None


def resolve(requested: str, per_device: dict) -> Device:
    """`auto`, `cpu` or a pricing key -> the device the job will run on and be billed as."""
    gpus = gpu_names()
    if requested == "cpu" or (requested == "auto" and not gpus):
        return Device("cpu", "cpu", "cpu")
    if not gpus:
        raise DeviceUnavailable(
            f"device {requested!r} asked for, but this host has no GPU", field="device",
            fix="ask for device=auto or device=cpu, or run on a host with that GPU")
    key = price_key_for(gpus[0], per_device)
    if key is None:
        raise DeviceUnavailable(
            f"this host's GPU {gpus[0]!r} has no row in pricing.per_device", field="device",
            reason="unpriced_device",
            fix="the operator adds its price to conf/pricing (or conf/local): "
                "per_device.<key> where <key> is part of the GPU's name")
    if requested not in ("auto", key):
        raise DeviceUnavailable(
            f"device {requested!r} asked for, but this host's GPU is {gpus[0]} ({key})",
            field="device", fix=f"ask for device=auto or device={key}")
    return Device(key, "cuda:0", gpus[0])


def not_visible(device: Device, count: int) -> DeviceUnavailable | None:
    """Why the jail could not give a job the GPUs it is priced for: nvidia-smi lists them,
    but a device node the sandbox binds (/dev/nvidiaN, nvidiactl, nvidia-uvm) is absent, so
    the job would run on the CPU or fail in CUDA at GPU prices. None when all are there."""
    if device.resource_type != "gpu":
        return None
    index = int(device.sandbox.split(":")[1])
    missing = sandbox.missing_gpu_nodes(index, count)
    if not missing:
        return None
    return DeviceUnavailable(
        f"device {device.price_key} ({device.name}) x{count} asked for, but this host has no "
        f"{', '.join(missing)}: the job could not see its GPU", field="device",
        reason="gpu_not_visible",
        fix="ask for device=cpu, or the operator makes the GPU's device nodes visible to this "
            "host (nvidia-modprobe -u -c=0 creates nvidia-uvm; a container needs them mapped)")


def priced(resolved: dict) -> tuple[Device | None, Decimal, ForgeError | None]:
    """The one device rule: (the device this host gives the job, its price per device-hour,
    why it cannot have one). The price is the device's row of pricing.per_device, else the
    default price; without a device (it is unavailable), the requested device's row."""
    pricing = resolved["pricing"]
    try:
        device, problem = resolve(resolved["device"], pricing["per_device"]), None
    except ForgeError as exc:
        device, problem = None, exc
    key = device.price_key if device is not None else resolved["device"]
    if key in pricing["per_device"]:
        price = money.to_price(pricing["per_device"][key], f"pricing.per_device.{key}")
    else:
        price = money.to_price(pricing["price_per_hour"], "pricing.price_per_hour")
    return device, price, problem
