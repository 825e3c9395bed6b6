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
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

from trainers import family
from trainers.data.load import DatasetError
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
from trainers.runtime import process_rank


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
    out_dir = _raw_output_dir(argv[0])
    state: dict = {}
    base = {"status": "failed", "task": None, "device": None, "metrics": {},
            "per_class_f1": {}, "baseline": {}, "split": {}, "artifacts": [],
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
    timings = {**result.pop("timings", {}), "total_s": time.perf_counter() - t_start}
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
    elif isinstance(e, DatasetError):
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


if __name__ == "__main__":
    sys.exit(main())
