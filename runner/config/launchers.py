"""The resolvers the operator's launcher configs (conf/hydra/launcher/) use to map a job's
caps onto its scheduler's resources, and the check that a SLURM array can ever run. Each
resolver takes numbers or a device name that the schema has already checked; none reads a
string as config.

- `forge_slurm_time`: SLURM's --time = the job's wall-time cap + the registry's expiry
  margin (the host's own minutes around the sandbox: inputs, MLflow, registration), so SLURM
  ends the job when its allocation would expire anyway; the sandbox enforces the cap itself.
- `forge_slurm_gpus`: --gpus-per-node = `devices` for a GPU job, none for a CPU job (and,
  for device=auto, none on a cluster whose nodes advertise no GPU).
- `forge_slurm_task`: the task size deploy/slurm/up.sh wrote for the node it configured
  (TASK_FILE), the launcher's default where the operator's FORGE_SLURM_* variables are unset.
- `check_schedulable`: before any job of a sweep (and in its dry run), each array's request
  against what `sinfo` says the partition's nodes offer; what no node can ever run is refused
  (`Unschedulable`), naming the field, the request, the largest node and the fix.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from runner.errors import Unschedulable

# Written by deploy/slurm/up.sh (cpus_per_task, mem_gb: one task per CPU of its node).
TASK_FILE = Path(os.environ.get("FORGE_SLURM_TASK_FILE", "/etc/forge/slurm-task.yaml"))


def register_resolvers() -> None:
    """Idempotent; forge-train calls it before Hydra reads the launcher config."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("forge_slurm_time", slurm_time_min, replace=True)
    OmegaConf.register_new_resolver("forge_slurm_gpus", slurm_gpus, replace=True)
    OmegaConf.register_new_resolver("forge_slurm_task", slurm_task, replace=True)


def slurm_time_min(wall_time_cap_min, margin_min) -> int:
    return int(wall_time_cap_min) + int(margin_min)


def slurm_gpus(device, devices) -> int | None:
    if device == "cpu" or (device == "auto" and not cluster_has_gpus()):
        return None
    return int(devices)


def slurm_task(key: str, default):
    """`key` (cpus_per_task, mem_gb) of TASK_FILE, a positive integer; `default` when the file
    is absent or does not say."""
    try:
        import yaml

        value = (yaml.safe_load(TASK_FILE.read_text()) or {}).get(key)
    except (OSError, ValueError, AttributeError):
        return default
    except Exception:  # noqa: BLE001 - yaml.YAMLError: a broken file is no file
        return default
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 \
        else default


@lru_cache(maxsize=1)
def cluster_has_gpus() -> bool:
    """Does any SLURM node advertise a gpu GRES (sinfo %G)? False when SLURM cannot say."""
    return any(node.gpus for node in nodes() or [])


# --- what the cluster offers -------------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    name: str
    partition: str  # without sinfo's "*"
    default: bool  # of the default partition
    cpus: int
    mem_mb: int
    gpus: int
    time_limit_min: int | None  # the partition's; None: unlimited

    def describe(self) -> str:
        gpus = f"{self.gpus} GPUs" if self.gpus else "no GPU"
        return f"{self.name}: {self.cpus} CPUs, {self.mem_mb} MB, {gpus}"


def nodes(sinfo: str | None = None) -> list[Node] | None:
    """Every (node, partition) pair `sinfo` lists; None when SLURM cannot be asked."""
    sinfo = sinfo or shutil.which("sinfo")
    if sinfo is None:
        return None
    try:
        proc = subprocess.run([sinfo, "-h", "-N", "-o", "%N|%P|%c|%m|%G|%l"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    out = []
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 6 or not parts[2].isdigit():
            continue
        name, part, cpus, mem, gres, limit = parts
        out.append(Node(name, part.rstrip("*"), part.endswith("*"), int(cpus),
                        int(mem) if mem.isdigit() else 0, _gres_gpus(gres), _minutes(limit)))
    return out


def _gres_gpus(gres: str) -> int:
    """GPUs in sinfo's %G: `gpu:4`, `gpu:h100:8(S:0-1)`, `gpu:a:2,gpu:b:2`, `(null)`."""
    total = 0
    for entry in gres.split(","):
        fields = re.sub(r"\(.*?\)", "", entry).split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def _minutes(limit: str) -> int | None:
    """sinfo's %l (`infinite`, `1-00:00:00`, `30:00`, `45`) in minutes; None: unlimited."""
    days, _, clock = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    parts = clock.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or len(parts) > 3:
        return None
    hours, minutes = (int(parts[0]), int(parts[1])) if len(parts) == 3 else (0, int(parts[0]))
    return int(days) * 1440 + hours * 60 + minutes


def is_slurm(launcher) -> bool:
    """Is this Hydra launcher config submitit's SLURM launcher (forge_slurm or a cluster's)?"""
    return str(launcher.get("_target_", "")).endswith(".SlurmLauncher")


def check_schedulable(launcher, cluster: list[Node] | None = None) -> None:
    """Raise Unschedulable when no node of the array's partition can ever run one of its
    tasks. Silent when SLURM cannot be asked (sbatch then says why it cannot submit)."""
    cluster = nodes() if cluster is None else cluster
    if cluster is None:
        return
    partition = launcher.get("partition")
    named = [n for n in cluster if (n.partition == partition if partition else n.default)]
    if not named:
        have = sorted({n.partition for n in cluster})
        raise Unschedulable(
            f"the array asks partition {partition or '(the default)'}, which SLURM does not "
            f"have (partitions: {', '.join(have) or 'none'})",
            field="hydra.launcher.partition", request=partition, partitions=have,
            fix=f"FORGE_SLURM_PARTITION={have[0]}" if have else "start SLURM's partition")
    where = f"partition {named[0].partition}"
    tasks = int(launcher.get("tasks_per_node") or 1)
    asks = [  # field, what the array asks of one node, what a node has, fix, unit
        ("cpus_per_task", int(launcher.get("cpus_per_task") or 1) * tasks,
         lambda n: n.cpus, lambda most: f"FORGE_SLURM_CPUS_PER_TASK={most // tasks}", "CPUs"),
        ("mem_gb", int(launcher.get("mem_gb") or 0) * 1024,
         lambda n: n.mem_mb, lambda most: f"FORGE_SLURM_MEM_GB={most // 1024}", "MB"),
        ("gpus_per_node", int(launcher.get("gpus_per_node") or 0),
         lambda n: n.gpus, lambda most: "device=cpu, or FORGE_SLURM_PARTITION=<a partition "
                                        "with GPU nodes>", "GPUs"),
    ]
    for field, want, has, fix, unit in asks:
        largest = max(named, key=has)
        if want > has(largest):
            raise Unschedulable(
                f"the array asks {want} {unit} a node ({field}={launcher.get(field)}); the "
                f"largest node of {where} has {has(largest)} ({largest.describe()})",
                field=f"hydra.launcher.{field}", request=want, largest_node=largest.describe(),
                fix=fix(has(largest)) if has(largest) > 0 or field == "gpus_per_node"
                else f"FORGE_SLURM_PARTITION=<a partition whose nodes have {unit}>")
    fits = [n for n in named if all(want <= has(n) for _, want, has, _, _ in asks)]
    if not fits:
        raise Unschedulable(
            f"no single node of {where} has the CPUs, memory and GPUs one task asks together "
            f"({', '.join(n.describe() for n in named)})",
            field="hydra.launcher.cpus_per_task",
            fix="FORGE_SLURM_CPUS_PER_TASK and FORGE_SLURM_MEM_GB that one node holds")
    want_nodes = int(launcher.get("nodes") or 1)
    if want_nodes > len({n.name for n in named}):
        raise Unschedulable(
            f"the array asks {want_nodes} nodes; {where} has {len({n.name for n in named})}",
            field="hydra.launcher.nodes", request=want_nodes, fix="nodes: 1")
    limit = named[0].time_limit_min
    timeout = launcher.get("timeout_min")
    if limit is not None and timeout is not None and int(timeout) > limit:
        raise Unschedulable(
            f"the array asks --time={timeout} min; {where} allows {limit} min",
            field="hydra.launcher.timeout_min", request=int(timeout), limit=limit,
            fix=f"a wall_time_cap_min whose sum with registry.expiry_margin_min fits {limit}")
