"""The job a plan runs, on this host: its run dir under FORGE_HOME, the disk it needs, and
`sandbox_job()`, the one place a plan becomes a sandbox job (for the dry run's plan and for
the launch)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runner import sandbox, settings
from runner.config.manifest import ENTRYPOINT
from runner.errors import DatasetUnavailable, DiskFull, ForgeError, InvalidConfig
from runner.jobs import codepin, datasets

if TYPE_CHECKING:
    from runner.jobs.plan import Plan


def run_dir(allocation_id: str) -> Path:
    """FORGE_HOME/runs/<allocation id>: a job's manifest, log and (while it runs) files."""
    return settings.forge_home() / "runs" / allocation_id


def disk_problem(resolved: dict) -> ForgeError | None:
    """DiskFull when FORGE_HOME (runs, weights, tracking store) has less free space than the
    operator's registry.min_free_gb; None when there is enough."""
    need_gb = resolved["registry"].get("min_free_gb", 2.0)
    if isinstance(need_gb, bool) or not isinstance(need_gb, (int, float)) \
            or not 0 <= need_gb < float("inf"):
        return InvalidConfig(f"registry.min_free_gb must be a number >= 0, got {need_gb!r}",
                             field="registry.min_free_gb", fix="set it in conf/registry/")
    home = settings.forge_home()
    probe = next((p for p in (home, *home.parents) if p.exists()), home)
    free_gb = shutil.disk_usage(probe).free / 1024**3
    if free_gb >= need_gb:
        return None
    return DiskFull(f"FORGE_HOME has {free_gb:.2f} GiB free, below registry.min_free_gb "
                    f"{need_gb:g} GiB", field="registry.min_free_gb",
                    fix="free space under FORGE_HOME (old runs, weights, cache) or point "
                        "FORGE_HOME at a larger disk", free_gb=round(free_gb, 3),
                    min_free_gb=need_gb)


def dataset_input(dataset: dict, source: str) -> Path:
    """The dataset artifact's data in the cache, fetched from `source` and checked against
    the artifact's own sha256, as the loader of its format reads it (the one file of an h5ad
    built-in, the folder of cbmc_mat); DatasetUnavailable when that fails."""
    try:
        fetched = datasets.fetch(source, cache=settings.cache_dir(),
                                 sha256=dataset.get("content_hash"))
        return datasets.loader_input(source, fetched)
    except (datasets.FetchError, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DatasetUnavailable(f"dataset {dataset['id']!r}: {why}", field="dataset.source",
                                 fix="check the source and the network, or delete the cached "
                                     "copy to fetch it again") from exc


KEPT_IN_RUN_DIR = ("job.log", "manifest.json")


def clean_run_dir(run_dir: Path) -> None:
    """Remove a finished job's bulk (out/, parent/, ...) from FORGE_HOME/runs/<alloc id>/,
    keeping its job.log and manifest.json. Never follows a link; never raises."""
    try:
        entries = list(Path(run_dir).iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name in KEPT_IN_RUN_DIR and entry.is_file() and not entry.is_symlink():
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, onerror=_writable_and_retry)
            else:
                entry.unlink()
        except OSError as exc:
            print(f"warning: could not clean {entry}: {exc}", file=sys.stderr)


def _writable_and_retry(func, path, _exc) -> None:
    """rmtree's error hook: a job may leave read-only folders; open the parent and retry."""
    parent = Path(path).parent
    parent.chmod(parent.stat().st_mode | 0o700)
    func(path)


def sandbox_timing(resolved: dict) -> tuple[float, float]:
    """(seconds until SIGTERM, grace until SIGKILL). The grace period lies inside the
    wall-time cap, so the job never outruns what the estimate debited and every second it
    holds the device, grace included, is billed."""
    total = float(resolved["wall_time_cap_min"] * 60)
    grace = min(float(resolved["sandbox"]["grace_s"]), total / 2)
    return total - grace, grace


def sandbox_job(plan: Plan, *, output_dir: Path, inputs: dict[str, Path] | None = None,
                log_path: Path | None = None, on_line: Callable[[str], None] | None = None,
                module: str = ENTRYPOINT, stop: threading.Event | None = None):
    """The one way a plan becomes a sandbox job: the trainer entrypoint (or the eval gate's,
    `module`) on the manifest, on
    the snapshot of the pinned code and the plan's device, with the caps and env allowlist
    of the operator's `sandbox` settings. The dry run's plan and the launch both build here."""
    resolved, box, gib = plan.resolved, plan.resolved["sandbox"], 1024**3
    code_dir = codepin.snapshot_path(plan.code, settings.cache_dir() / "code")
    inputs = dict(inputs or {})
    if plan.external is not None:  # the parent's own code: an input, read-only like the rest
        inputs.setdefault("family", plan.external.snapshot)
    device = plan.device.sandbox if plan.device is not None else "cpu"
    term_s, grace_s = sandbox_timing(resolved)
    memory = box["max_memory_gb"]
    return sandbox.SandboxJob(
        module=module, args=[f"{sandbox.IN_DIR}/manifest.json"], code_dir=code_dir,
        inputs=inputs, output_dir=output_dir, log_path=log_path, on_line=on_line,
        wall_time_cap_s=term_s, grace_s=grace_s, vram_cap_gb=float(resolved["vram_cap_gb"]),
        device=device, devices=plan.devices,
        env={k: os.environ[k] for k in box["env_allowlist"] if k in os.environ},
        max_processes=box["max_processes"], tmp_size_bytes=int(box["tmp_size_gb"] * gib),
        max_memory_bytes=None if memory is None else int(memory * gib),
        max_output_bytes=int(box["max_output_gb"] * gib), stop=stop)

