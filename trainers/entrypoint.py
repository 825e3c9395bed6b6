"""Sandbox entrypoint: `python -m trainers.entrypoint MANIFEST.json`.

Reads the run manifest (trainers/manifest.py), hands it to its family's recipe
(trainers/family.py: `train(manifest, state)`), and writes `result.json` into output_dir,
whatever happened. The recipe writes the checkpoint at `output_dir/checkpoint` in its
family's layout, the figures, per-cell predictions of a fine-tune's test cells, and appends
metric points as JSON lines to the manifest's metrics_path (trainers/metrics_log.py) for the
host to relay into its MLflow run.

Exit codes: 0 ok, 1 other error, 2 invalid manifest (`field` names the setting; a dataset
the loader cannot read is `dataset`), 3 non-finite loss, 4 out of memory, 5 a parent
checkpoint that cannot be used (`field` names its file, e.g. `parent.vocab.json` or
`parent.args.json.pre_norm`; the parent is checked before any data is read), 6 an external
family (the manifest's `family_code`) requires a package this environment lacks (`field`
names it; checked before its entry point is imported). On failure result.json still says
why (`status: "failed"`, `reason`: invalid_manifest | invalid_checkpoint | nan_loss | oom |
missing_dependency | error, and `field` where there is one).
With several devices only rank 0 writes result.json (trainers/scgpt/recipe.py says how the
ranks share the work).

The job log states the phases of the start (trainers/runtime.py `phase`): `jail_ready` here,
as the entrypoint starts; `imports_done`, `data_ready` and `first_step` in the recipe. The
result's `timings` holds them (`phases`, Unix seconds) and which heavy frameworks the job
imported (`imported`): a task imports only what it needs (a linear job never loads torch).
This module imports no numpy, scipy or framework itself, so that the jail is ready (and an
invalid manifest refused) before any of them loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

from trainers import family
from trainers.family import CheckpointError, MissingDependency, NonFiniteLoss
from trainers.manifest import (
    EXIT_CHECKPOINT,
    EXIT_ERROR,
    EXIT_INVALID,
    EXIT_MISSING_DEPENDENCY,
    EXIT_NAN,
    EXIT_OK,
    EXIT_OOM,
    ManifestError,
    load_manifest,
)
from trainers.runtime import phase, process_rank

# Frameworks whose import a job pays for; the result records which ones it loaded.
HEAVY = ("torch", "pytorch_lightning", "lightning", "scvi", "sklearn", "pandas", "scipy",
         "scipy.signal", "anndata")


def train(m, state: dict) -> dict:
    """The manifest's family trains it (the family's recipe, imported only now; an external
    family's entry point once every package its card requires is found)."""
    fam = family.get(m.family)
    for name in fam.imports:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingDependency(name)
    return fam.load_recipe().train(m, state)


def _is_dataset_error(e: BaseException) -> bool:
    """A DatasetError of trainers.data.load; not imported here (numpy and scipy), and an
    exception of a module that never loaded cannot be one."""
    load = sys.modules.get("trainers.data.load")
    return load is not None and isinstance(e, load.DatasetError)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg
                                            or "can't allocate memory" in msg)


def _write_result(out_dir: Path | None, result: dict) -> None:
    if out_dir is None or process_rank() != 0:  # rank 0 alone speaks for the job
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out_dir / "result.json")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trainers.entrypoint MANIFEST.json", file=sys.stderr)
        return EXIT_INVALID
    t_start = time.perf_counter()
    state: dict = {}
    phase("jail_ready", state)
    out_dir = _raw_output_dir(argv[0])
    base = {"status": "failed", "task": None, "device": None, "metrics": {},
            "per_class_f1": {}, "split": {}, "artifacts": [],
            "checkpoint": None, "metrics_path": None, "genes": None}
    try:
        m = load_manifest(argv[0])
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        _write_result(out_dir, {**base, "reason": "invalid_manifest", "message": str(e),
                                "field": e.field,
                                "timings": {"total_s": time.perf_counter() - t_start}})
        return EXIT_INVALID
    out_dir = Path(m.output_dir)
    base.update(task=m.task, manifest=m.to_dict())
    try:
        result = train(m, state)
        code, status = EXIT_OK, {"status": "ok", "reason": "ok", "message": "ok"}
    except Exception as e:  # noqa: BLE001 -- every failure still leaves a result.json
        code, extra, status = failure(e)
        result = {**extra, "metrics": {}}
    timings = {**result.pop("timings", {}), "total_s": time.perf_counter() - t_start,
               "phases": state.get("phases", {}),
               "imported": [name for name in HEAVY if name in sys.modules]}
    final = {**base, **{k: state[k] for k in ("device", "split", "genes", "metrics_path")
                        if k in state}, **result, **status, "timings": timings}
    _write_result(out_dir, final)
    if process_rank() == 0:
        print(f"result: {final['status']} ({final['reason']}) -> {out_dir / 'result.json'}",
              flush=True)
    return code


def failure(e: Exception) -> tuple[int, dict, dict]:
    """A job's exception as (exit code, result.json extras, status fields), printed once."""
    if isinstance(e, ManifestError):
        code, reason, extra = EXIT_INVALID, "invalid_manifest", {"field": e.field}
    elif isinstance(e, CheckpointError):
        code, reason, extra = EXIT_CHECKPOINT, "invalid_checkpoint", {"field": e.field}
    elif _is_dataset_error(e):
        code, reason, extra = EXIT_INVALID, "invalid_manifest", {"field": "dataset"}
    elif isinstance(e, MissingDependency):
        code, reason, extra = EXIT_MISSING_DEPENDENCY, "missing_dependency", {"field": e.package}
    elif isinstance(e, NonFiniteLoss):
        code, reason, extra = EXIT_NAN, "nan_loss", {"step": e.step, "stage": e.stage}
    elif _is_oom(e):
        code, reason, extra = EXIT_OOM, "oom", {}
    else:
        code, reason, extra = EXIT_ERROR, "error", {}
        traceback.print_exc()
    print(f"error ({reason}): {e}", file=sys.stderr, flush=True)
    return code, extra, {"status": "failed", "reason": reason,
                         "message": f"{type(e).__name__}: {e}"}


def _raw_output_dir(path: str) -> Path | None:
    """output_dir read leniently, so that even an invalid manifest gets a result.json."""
    try:
        value = json.loads(Path(path).read_text()).get("output_dir")
        return Path(value) if isinstance(value, str) and value else None
    except Exception:  # noqa: BLE001 -- unreadable: no result.json, the exit code says it
        return None


def exit_fast(code: int) -> None:
    """End the job with `code` once result.json is written and its output flushed, skipping
    the interpreter's teardown (finalising every module of torch, Lightning and scikit-learn,
    and their thread pools: measured up to seconds a job on a loaded 2-core host, with
    nothing left to do). Only a process with no children of its own: a multi-device job's
    rank 0 (or a job that started a helper) exits the ordinary way, waiting for them."""
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:  # no child at all
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()  # flushes and closes every handler
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken stream: nothing more to say
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_fast(main())
