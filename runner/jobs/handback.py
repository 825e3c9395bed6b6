"""What the host takes back from a finished job: result.json, read as untrusted input.

The output tree has been sanitised by the sandbox's hand-back (regular files and directories
only, within caps) before this runs; `read_result` still trusts nothing of it. It opens
result.json without following a link or blocking, checks by fstat that it is a regular file,
caps its size and nesting depth before the JSON parser sees it, and validates it against
runner/jobs/result.schema.json. The checkpoint is always `out/checkpoint`
(`CHECKPOINT_DIR`), whatever result.json says. Every failure is a TrainingFailed with a
reason, the `field` the trainer blamed (when it is a plain dotted name) and the host's own fix
for that reason (`fix_for`): nothing of result.json but that field reaches the caller's fix.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
from importlib import resources
from itertools import accumulate
from pathlib import Path

from runner.errors import TrainingFailed
from runner.sandbox import printable
from trainers.manifest import EXIT_REASONS

MAX_RESULT_BYTES = 1024**2
MAX_RESULT_DEPTH = 32
CHECKPOINT_DIR = "checkpoint"  # out/checkpoint: the only place a checkpoint is taken from
# Exit codes of trainers.entrypoint and their reasons (trainers/manifest.py).
TRAINER_REASONS = EXIT_REASONS
FIXES = {"timeout": "raise wall_time_cap_min or shorten training",
         "nan_loss": "lower training.lr",
         "oom": "lower training.batch_size or vram",
         "cancelled": "the job was stopped (scancel, or SIGTERM to the host): submit it again "
                      "to run it anew",
         "output_quota": "write less to the output directory (sandbox.max_output_gb is the "
                         "operator's quota)",
         "invalid_manifest": "the setting named by `field` is wrong: change it, or drop the "
                             "override that set it",
         "missing_dependency": "the family's card requires the package named by `field`, "
                               "which the job's environment lacks: the operator installs it, "
                               "or the family drops the requirement",
         "invalid_checkpoint": "the parent's checkpoint is unusable (`field` names the file): "
                               "re-register it (forge models register) from a valid scGPT "
                               "folder (args.json, vocab.json with <pad> and <cls>, "
                               "best_model.pt)"}
# The trainer blames the dataset as `dataset` (a file its format's loader cannot read) or
# `dataset.<key>` (e.g. no labels under label_key): an invalid_manifest the caller fixes there.
DATASET_FIX = ("the dataset cannot be read as registered: check its format and label_key "
               "(the labels' column), or register it again")

_FIELD = re.compile(r"[A-Za-z0-9_.<>-]{1,200}")  # a manifest field the trainer blamed
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


class _Malformed(Exception):
    pass


def read_result(out: Path, launched) -> dict:
    """result.json of a finished job, checked; a failed job becomes TrainingFailed with the
    host's reason (timeout, oom, output_quota) or else the trainer's."""
    path = Path(out) / "result.json"
    result, problem = None, None
    try:
        result = _load(path)
    except FileNotFoundError:
        pass
    except _Malformed as exc:
        problem = str(exc)

    if launched.reason != "ok":
        reason = TRAINER_REASONS.get(launched.exit_code, launched.reason)
        message = None
        if launched.detail:  # the host stopped the job: its reason, not the job's claim
            reason, message = launched.reason, launched.detail
        elif result and result.get("reason") not in (None, "ok"):
            reason = result["reason"]
        message = message or (result or {}).get("message") or f"see {launched.log_path}"
        field = (result or {}).get("field") if not launched.detail else None
        field = field if isinstance(field, str) and _FIELD.fullmatch(field) else None
        raise TrainingFailed(
            f"training {reason} (exit {launched.exit_code} after {launched.wall_seconds:.1f}s): "
            f"{printable(message)}", reason=reason, field=field,
            fix=fix_for(reason, field, launched.log_path), log_path=str(launched.log_path))
    if problem:
        raise TrainingFailed(f"result.json is malformed: {printable(problem)}",
                             reason="malformed_result", field="result.json",
                             fix="the trainer must write result.json as "
                                 "runner/jobs/result.schema.json says")
    if result is None:
        raise TrainingFailed("the trainer exited 0 but wrote no result.json",
                             reason="missing_result", fix=f"read {launched.log_path}")
    if result.get("status") != "ok":
        raise TrainingFailed(f"result.json says status {result.get('status')!r} but the trainer "
                             "exited 0", reason="malformed_result", field="result.json.status",
                             fix="the trainer must write status ok with metrics")
    return result


def fix_for(reason: str, field: str | None, log_path) -> str:
    """The host's fix for a failed job: one per reason (a dataset's own for a manifest error
    that blames the dataset); the job log only for a crash the trainer gave no reason for."""
    if reason == "invalid_manifest" and field and field.split(".")[0] == "dataset":
        return DATASET_FIX
    return FIXES.get(reason, f"read the job log {log_path}")


class NotPlainFile(Exception):
    """A file the job wrote that is not a regular file one can open without following a
    link (a symlink, a FIFO, a device, ...)."""


def read_job_file(path: Path, *, offset: int = 0, limit: int) -> tuple[bytes, int]:
    """Up to `limit` bytes from `offset` of a file the job wrote, and the file's size.

    Opened without following a link or blocking on a FIFO, and read only if fstat says it is
    a regular file. Raises FileNotFoundError, or NotPlainFile with the reason."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:  # ELOOP: a link; ENXIO, EACCES, ...
        raise NotPlainFile(f"not read ({exc.strerror}): not a plain file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotPlainFile("is not a regular file: not read")
        chunks, want, at = [], min(limit, max(0, st.st_size - offset)), offset
        while want > 0:
            chunk = os.pread(fd, min(want, 1024**2), at)
            if not chunk:
                break
            chunks.append(chunk)
            at += len(chunk)
            want -= len(chunk)
        return b"".join(chunks), st.st_size
    finally:
        os.close(fd)


def _load(path: Path) -> dict:
    """Parse and validate result.json, or raise FileNotFoundError / _Malformed."""
    try:
        data, size = read_job_file(path, limit=MAX_RESULT_BYTES + 1)
    except NotPlainFile as exc:
        raise _Malformed(str(exc)) from None
    if size > MAX_RESULT_BYTES:
        raise _Malformed(f"is {size} bytes, over the {MAX_RESULT_BYTES} allowed")
    if len(data) > MAX_RESULT_BYTES:
        raise _Malformed(f"is over the {MAX_RESULT_BYTES} bytes allowed")
    depth = nesting_depth(data)
    if depth > MAX_RESULT_DEPTH:
        raise _Malformed(f"nests {depth} levels deep, over the {MAX_RESULT_DEPTH} allowed")
    try:
        result = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise _Malformed(f"is not valid JSON: {str(exc)[:200]}") from None
    error = _best_error(result)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top)"
        raise _Malformed(f"at {where[:200]}: {error.message[:300]}")
    return result


def nesting_depth(data: bytes) -> int:
    """How deep [ and { nest in a JSON text, found without parsing it (strings dropped)."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    steps = (1 if b in b"[{" else -1 for b in brackets)
    return max(accumulate(steps, initial=0))


@functools.cache
def _validator():
    import jsonschema  # lazy: ~30 ms, not on the dry run's path

    schema = resources.files("runner.jobs").joinpath("result.schema.json").read_text()
    return jsonschema.Draft202012Validator(json.loads(schema))


def _best_error(result):
    import jsonschema  # lazy: ~30 ms, not on the dry run's path

    return jsonschema.exceptions.best_match(_validator().iter_errors(result))
