"""The resolvers the operator's launcher configs (conf/hydra/launcher/) use to map a job's
caps onto its scheduler's resources. Each takes numbers or a device name that the schema has
already checked; none reads a string as config.

- `forge_slurm_time`: SLURM's --time = the job's wall-time cap + the registry's expiry
  margin (the host's own minutes around the sandbox: inputs, MLflow, registration), so SLURM
  ends the job when its allocation would expire anyway; the sandbox enforces the cap itself.
- `forge_slurm_gpus`: --gpus-per-node = `devices` for a GPU job, none for a CPU job (and,
  for device=auto, none on a cluster whose nodes advertise no GPU).
"""

from __future__ import annotations

import shutil
import subprocess
from functools import lru_cache


def register_resolvers() -> None:
    """Idempotent; forge-train calls it before Hydra reads the launcher config."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("forge_slurm_time", slurm_time_min, replace=True)
    OmegaConf.register_new_resolver("forge_slurm_gpus", slurm_gpus, replace=True)


def slurm_time_min(wall_time_cap_min, margin_min) -> int:
    return int(wall_time_cap_min) + int(margin_min)


def slurm_gpus(device, devices) -> int | None:
    if device == "cpu" or (device == "auto" and not cluster_has_gpus()):
        return None
    return int(devices)


@lru_cache(maxsize=1)
def cluster_has_gpus() -> bool:
    """Does any SLURM node advertise a gpu GRES (sinfo %G)? False when SLURM cannot say."""
    sinfo = shutil.which("sinfo")
    if sinfo is None:
        return False
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%G"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "gpu" in out
