"""A parent checkpoint, seen from the host: its own files decide what it is.

- `register_parent()`: register an scGPT checkpoint (a `file://` folder or archive, an
  `http(s)://` archive) from its args.json and vocab.json alone. The architecture, the
  vocabulary's size, digest and special tokens go into the artifact's metadata; a setting
  this trainer cannot honour (`pre_norm: true`, batch labels, DSBN, ...) is refused with
  its key named, never dropped.
- `state_problem()`: whether the operator's rule (`policy.parent_states`) lets a version in its
  lifecycle state be fine-tuned (a rejected or superseded one is not, by default).
- `check_parent()`: what a dry run knows about a registered parent before any debit, without
  torch and without the weights: the architecture its args.json gives (which the config
  takes), the vocabulary's specials and gaps, the dataset's genes it matches, and which heads
  start fresh. Each problem is a typed reason.

args.json and vocab.json are the checkpoint's own (someone else's files): they are parsed as
size-capped JSON, never executed, and a symlink in their place is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from runner import settings
from runner.errors import ForgeError, InvalidInput, ParentStateRefused, WeightsIntegrityError
from runner.jobs import datasets, weights
from runner.registry import catalog
from trainers.scgpt import checkpoint_args

MAX_JSON_BYTES = 64 * 1024**2  # a whole-human vocab.json is ~1.5 MB
CHECKPOINT_FILES = ("args.json", "vocab.json", "best_model.pt")
FIXES = {
    "unsupported_checkpoint": "this trainer cannot build that network: use a checkpoint "
                              "trained without the setting",
    "invalid_checkpoint": "fix the checkpoint's args.json (scGPT's key names), then register "
                          "it again",
    "vocab_specials": "add the special tokens to vocab.json (scGPT's <pad> and <cls>), then "
                      "register it again",
    "vocab_gaps": "vocab.json's ids must number the gene embedding's rows 0..n-1",
    "architecture_mismatch": "the parent's args.json decides its architecture: drop the "
                             "setting, or register the checkpoint again if it changed",
    "gene_overlap": "fine-tune on a dataset whose gene names the parent's vocabulary uses "
                    "(symbols vs Ensembl ids?), or use a parent trained on these genes",
}


class CheckpointProblem(ForgeError):
    """A parent checkpoint this trainer cannot use as it is: `reason` says which rule."""

    reason = "invalid_checkpoint"


def _problem(p: checkpoint_args.Problem, artifact: str) -> CheckpointProblem:
    return CheckpointProblem(f"{artifact}: {p.field} {p.message}", reason=p.reason,
                             field=p.field, fix=FIXES[p.reason])


# --- reading the checkpoint's own files -------------------------------------------------------

def _read_json(path: Path):
    """A checkpoint's JSON file: not a link, a regular file under the cap, valid JSON."""
    try:  # O_NONBLOCK: a FIFO in its place must not hang the host
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointProblem(f"{path.parent} has no {path.name}", field=path.name,
                                fix="an scGPT checkpoint folder holds args.json, vocab.json "
                                    "and best_model.pt") from None
    except OSError as exc:
        raise CheckpointProblem(f"{path.name} cannot be read: {exc.strerror}", field=path.name,
                                fix="make it a plain file") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JSON_BYTES:
            raise CheckpointProblem(f"{path.name} is not a regular file under "
                                    f"{MAX_JSON_BYTES >> 20} MiB", field=path.name,
                                    fix="make it a plain JSON file")
        raw = f.read(MAX_JSON_BYTES + 1)
    try:
        return json.loads(raw), hashlib.sha256(raw).hexdigest()
    except ValueError as exc:
        raise CheckpointProblem(f"{path.name} is not valid JSON: {exc}", field=path.name,
                                fix="write it as JSON") from exc


def inspect(folder: Path, artifact: str) -> tuple[dict, list[CheckpointProblem]]:
    """args.json and vocab.json of a checkpoint folder -> (what they say, their problems)."""
    args, args_sha = _read_json(folder / "args.json")
    vocab, vocab_sha = _read_json(folder / "vocab.json")
    arch, arch_problems = checkpoint_args.read_args(args)
    vocab_info, vocab_problems = checkpoint_args.read_vocab(vocab)
    known = set(checkpoint_args.ARCH_FROM_ARGS) | set(checkpoint_args.UNSUPPORTED)
    info = {"architecture": arch,
            "vocab": {**vocab_info, "sha256": vocab_sha},
            "args_sha256": args_sha,
            "n_cls": args.get("n_cls") if isinstance(args, dict) else None,
            # the training script's own settings: no network depends on them
            "ignored_args": sorted(k for k in args if k not in known)
            if isinstance(args, dict) else []}
    problems = [_problem(p, artifact) for p in arch_problems + vocab_problems]
    return {**info, "_vocab": vocab if isinstance(vocab, dict) else {}}, problems


def _stamp(folder: Path) -> tuple:
    """The files' identity: a changed file is read again."""
    out = []
    for name in ("args.json", "vocab.json"):
        try:
            st = os.stat(folder / name, follow_symlinks=False)
            out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None))
    return tuple(out)


@lru_cache(maxsize=16)
def _inspect_cached(folder: str, artifact: str, stamp: tuple):
    """inspect(), memoised per file identity: a whole-human vocab.json takes ~30 ms to parse,
    more than a warm dry run's whole budget. Callers must not mutate what it returns."""
    return inspect(Path(folder), artifact)


def local_files(parent: dict) -> Path | None:
    """The folder on this host holding the parent's args.json and vocab.json, or None when
    they are not here yet (an archive fetched at launch)."""
    if parent.get("origin_type") != "external":
        folder = weights.weights_dir(parent["id"])
        return folder if (folder / "args.json").is_file() else None
    cached = settings.cache_dir() / "weights" / (parent.get("content_hash") or "-")
    if cached.is_dir():
        return cached
    parsed = urlparse(parent.get("origin_url") or "")
    if parsed.scheme == "file" and Path(parsed.path).is_dir():
        return Path(parsed.path)
    return None


# --- registration -------------------------------------------------------------------------------

def register_parent(artifact_id: str, origin_url: str, *, sha256: str | None = None,
                    title: str | None = None, family: str = "scgpt",
                    created_by: str = "operator") -> dict:
    """Register an scGPT checkpoint as an external base model, from its own files: fetch it
    (checked against `sha256`, the tree hash, when given), read args.json and vocab.json,
    refuse what this trainer cannot honour, and store what they say in the metadata."""
    catalog.validate_artifact_id(artifact_id)
    if urlparse(origin_url).scheme not in ("file", "http", "https"):
        raise InvalidInput(f"origin_url {origin_url!r} is not file://, http:// or https://",
                           field="origin_url", fix="point it at the checkpoint folder or "
                                                   "a tar/zip archive of it")
    folder = weights.fetch_external({"id": artifact_id, "origin_url": origin_url,
                                      "content_hash": sha256})
    tree = weights.tree_hash(weights.file_hashes(folder))
    if sha256 and tree != sha256:
        raise WeightsIntegrityError(f"{origin_url} hashes to {tree}, not {sha256}",
                                    field="sha256", fix="check the download, or the hash")
    missing = [n for n in CHECKPOINT_FILES if not (folder / n).is_file()]
    if missing:
        raise CheckpointProblem(f"{origin_url} is not an scGPT checkpoint: no "
                                f"{', '.join(missing)}", field=missing[0],
                                fix="register a folder (or archive of one) holding args.json, "
                                    "vocab.json and best_model.pt")
    info, problems = inspect(folder, artifact_id)
    if problems:
        raise problems[0]
    cached = settings.cache_dir() / "weights"
    if folder.parent == cached and folder.name != tree:  # cached by URL: re-key by content
        target = cached / tree
        if not target.exists():
            os.replace(folder, target)
    info.pop("_vocab")
    metadata = {"family": family, "framework": "scgpt", "task": "external",
                "architecture": info.pop("architecture"), "checkpoint": info}
    return catalog.register_model(
        artifact_id=artifact_id, title=title or f"scGPT checkpoint {artifact_id}",
        metadata=metadata, created_by=created_by, origin_type="external",
        origin_url=origin_url, content_hash=tree)


# --- the dry run's look ---------------------------------------------------------------------------

def state_problem(parent: dict, allowed: list[str]) -> ParentStateRefused | None:
    """A parent whose lifecycle state is not among the operator's `allowed` states."""
    state = parent["lifecycle_state"]
    if state in allowed:
        return None
    return ParentStateRefused(
        f"parent {parent['id']!r} is {state!r}; this host fine-tunes versions that are "
        f"{' or '.join(map(repr, allowed))} (policy.parent_states)", field="parent_artifact_id",
        state=state, allowed=list(allowed),
        fix="fine-tune an active or candidate version (its lineage names them), or the "
            f"operator adds {state!r} to policy.parent_states")


def check_parent(parent: dict, resolved: dict, dataset: dict | None
                 ) -> tuple[dict, dict, list[ForgeError]]:
    """(report, architecture the checkpoint gives, problems) for a registered parent.

    The architecture comes from its args.json when the files are on this host, else from the
    metadata registration stored; the metadata and the files must agree. The dataset's genes
    (read once per dataset file, cached) are matched against the vocabulary."""
    folder = local_files(parent)
    meta = parent.get("metadata") or {}
    stored = meta.get("architecture") or {}
    if folder is None:
        return ({"inspected": False,
                 "why": "the checkpoint's files are not on this host yet (fetched at launch)",
                 "architecture": stored}, stored, [])
    try:
        info, problems = _inspect_cached(str(folder), parent["id"], _stamp(folder))
    except CheckpointProblem as exc:
        return {"inspected": True, "error": exc.to_dict()}, stored, [exc]
    problems = list(problems)
    vocab = info["_vocab"]
    arch = dict(info["architecture"])
    for name, value in stored.items():  # the registry's record must be the files'
        if name in arch and arch[name] != value:
            problems.append(CheckpointProblem(
                f"{parent['id']}: the registry says {name}={value!r} but its args.json "
                f"says {arch[name]!r}", reason="architecture_mismatch", field=f"parent.{name}",
                fix=FIXES["architecture_mismatch"]))
    report = {"inspected": True, "architecture": dict(arch), "vocab_size": info["vocab"]["size"],
              "specials": dict(info["vocab"].get("specials") or {}),
              "ignored_args": list(info["ignored_args"])}
    content = _dataset_content(resolved, dataset)
    if content is None or "error" in content:
        report["genes"] = {"checked": False, "why": (content or {}).get(
            "error", "the dataset is not on this host yet (fetched at launch)")}
    else:
        overlap = checkpoint_args.gene_overlap(vocab, content["genes"])
        report["genes"] = overlap
        floor = resolved["policy"].get("min_gene_overlap", 0.0)
        if overlap["matched"] == 0 or overlap["fraction"] < floor:
            problems.append(CheckpointProblem(
                f"{parent['id']}'s vocabulary has {overlap['matched']} of the dataset's "
                f"{overlap['dataset_genes']} genes ({overlap['fraction']:.1%}), below "
                f"policy.min_gene_overlap {floor:.0%}; unmatched e.g. "
                f"{', '.join(overlap['unmatched_examples'][:5])}", reason="gene_overlap",
                field="policy.min_gene_overlap", fix=FIXES["gene_overlap"],
                matched=overlap["matched"], fraction=overlap["fraction"]))
        report["heads"] = _heads(resolved, meta, info, content)
    return report, arch, problems


def _heads(resolved: dict, meta: dict, info: dict, content: dict) -> dict:
    """Which parts of the network start from the parent and which start fresh."""
    heads = {"encoder": "from the parent (matched genes keep their embedding rows)"}
    if resolved["training"]["task"] != "finetune_celltype":
        return heads
    theirs = meta.get("class_names")
    ours = content.get("classes") or []
    if theirs and list(theirs) == list(ours):
        heads["classifier"] = f"from the parent ({len(ours)} classes, the same)"
    else:
        had = len(theirs) if theirs else info.get("n_cls")
        heads["classifier"] = (f"re-initialised: {len(ours)} classes in the dataset"
                               + (f", the parent's head has {had}" if had else
                                  ", the parent has no classifier head"))
    return heads


def _dataset_content(resolved: dict, dataset: dict | None) -> dict | None:
    """The dataset's genes and classes, read with the trainer's own loader from the local
    copy, cached by its sha256; None when it is not on this host yet."""
    data = resolved["dataset"]
    key = (dataset or {}).get("content_hash") or hashlib.sha256(
        json.dumps([data["source"], data["format"]]).encode()).hexdigest()
    label = data.get("label_key") or ""
    cache = settings.cache_dir() / "genes" / f"{key[:32]}-{hashlib.sha1(label.encode()).hexdigest()[:8]}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    path = datasets.local_copy(data["source"], settings.cache_dir(),
                               (dataset or {}).get("content_hash"))
    if path is None:
        return None
    from trainers.data.load import DatasetError, load  # numpy/scipy/anndata, never torch

    try:
        loaded = load(datasets.loader_input(data["source"], path), data["format"],
                      label_key=data.get("label_key"))
    except (DatasetError, OSError, ValueError) as exc:  # the job would fail on it too
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    content = {"genes": list(loaded.genes), "classes": list(loaded.label_names)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.part")
    tmp.write_text(json.dumps(content))
    tmp.replace(cache)
    return content
