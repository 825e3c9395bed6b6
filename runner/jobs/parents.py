"""A parent checkpoint, seen from the host: its own files, read by its family's inspect()
(trainers/family.py), decide what it is.

- `register_parent()`: register a checkpoint of a family (a `file://` folder or archive, an
  `http(s)://` archive) from its small files alone (scGPT: args.json and vocab.json; scvi:
  forge.json; linear: model.json). The architecture, the genes and classes go into the
  artifact's metadata; a setting the family's trainer cannot honour (`pre_norm: true`, batch
  labels, DSBN, ...) is refused with its key named, never dropped.
- `state_problem()`: whether the operator's rule (`policy.parent_states`) lets a version in its
  lifecycle state be fine-tuned (a rejected or superseded one is not, by default).
- `check_parent()`: what a dry run knows about a registered parent before any debit, without
  torch and without the weights: the architecture its files give (which the config takes),
  the dataset's genes it matches, and which heads start fresh. Each problem is a typed reason.

Those files are the checkpoint's own (someone else's files): they are parsed as size-capped
JSON, never executed or unpickled, and a link or FIFO in their place is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from runner import settings
from runner.errors import ForgeError, InvalidInput, ParentStateRefused, WeightsIntegrityError
from runner.jobs import datasets, external_code, weights
from runner.registry import catalog
from trainers import family as families

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


def _family(name: str | None) -> families.Family:
    try:
        return families.get(name or "scgpt")
    except families.UnknownFamily:
        raise InvalidInput(f"no model family {name!r} on this host", field="family",
                           reason="unknown_family",
                           fix=f"use one of {', '.join(families.FAMILIES)}") from None


# --- reading the checkpoint's own files -------------------------------------------------------

def inspect(folder: Path, artifact: str, family: str | None = None
            ) -> tuple[families.Inspection, list[CheckpointProblem]]:
    """What a checkpoint folder's small files say, by its family's own reader (torch-free,
    never unpickling; links, FIFOs and oversized files refused), and its problems."""
    fam = _family(family)
    try:
        found = fam.inspect(Path(folder))
    except families.CheckpointError as exc:
        raise CheckpointProblem(f"{artifact}: {exc}", field=exc.field,
                                fix=f"a {fam.name} checkpoint folder holds "
                                    f"{', '.join(fam.checkpoint_files)} as plain files") from None
    problems = [CheckpointProblem(f"{artifact}: {p.field} {p.message}", reason=p.reason,
                                  field=p.field,
                                  fix=FIXES.get(p.reason, FIXES["invalid_checkpoint"]))
                for p in found.problems]
    return found, problems


def _stamp(folder: Path, family: str | None) -> tuple:
    """The files' identity (every entry of the folder, links not followed): a changed file is
    read again."""
    out = [family]
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        names = []
    for name in names:
        try:
            st = os.stat(folder / name, follow_symlinks=False)
            out.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None))
    return tuple(out)


@lru_cache(maxsize=16)
def _inspect_cached(folder: str, artifact: str, family: str | None, stamp: tuple):
    """inspect(), memoised per file identity: a whole-human vocab.json takes ~30 ms to parse,
    more than a warm dry run's whole budget. Callers must not mutate what it returns."""
    return inspect(Path(folder), artifact, family)


def local_files(parent: dict) -> Path | None:
    """The folder on this host holding the parent's args.json and vocab.json, or None when
    they are not here yet (an archive fetched at launch)."""
    if parent.get("origin_type") != "external":
        folder = weights.weights_dir(parent["id"])
        first = _family((parent.get("metadata") or {}).get("family")).checkpoint_files[0]
        return folder if (folder / first).is_file() else None
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
                    created_by: str = "operator", code: str | None = None) -> dict:
    """Register a checkpoint of `family` (trainers/family.py) as an external base model, from
    its own files: fetch it (checked against `sha256`, the tree hash, when given), read what
    the family's inspect() may read (small JSON files: never a pickle), refuse what its
    trainer cannot honour, and store what they say in the metadata.

    `code` (`REPO@COMMIT:ENTRYPOINT`): the model's own training code instead of a built-in
    family (runner/jobs/external_code.py): an origin the operator allows, the commit a ref
    names now (only the sha is recorded), checked and read like a plan's; the family is the
    one its card declares, recorded with the code on the version."""
    catalog.validate_artifact_id(artifact_id)
    external = _external_code(code) if code is not None else None
    fam = external.family if external is not None else _family(family)
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
    missing = [n for n in fam.checkpoint_files if not (folder / n).is_file()]
    if missing:
        raise CheckpointProblem(f"{origin_url} is not a {fam.name} checkpoint: no "
                                f"{', '.join(missing)}", field=missing[0],
                                fix=f"register a folder (or archive of one) holding "
                                    f"{', '.join(fam.checkpoint_files)}")
    with families.external_scope(None if external is None else fam):  # its card's reader
        info, problems = inspect(folder, artifact_id, fam.name)
    if problems:
        raise problems[0]
    cached = settings.cache_dir() / "weights"
    if folder.parent == cached and folder.name != tree:  # cached by URL: re-key by content
        target = cached / tree
        if not target.exists():
            os.replace(folder, target)
    metadata = {"family": fam.name, "framework": fam.framework, "task": "external",
                "architecture": info.architecture, "checkpoint": info.metadata}
    if info.label_names is not None:
        metadata["class_names"] = info.label_names
    version = None
    if external is not None:
        metadata["code"] = external.record()
        version = {"code_repo_url": external.repo_url, "code_commit_sha": external.sha,
                   "code_entrypoint": external.entrypoint}
    return catalog.register_model(
        artifact_id=artifact_id, title=title or f"{fam.name} checkpoint {artifact_id}",
        metadata=metadata, created_by=created_by, origin_type="external",
        origin_url=origin_url, content_hash=tree, version=version)


def _external_code(spec: str):
    """`REPO@COMMIT:ENTRYPOINT` pinned now, against the operator's code.allowed_origins."""
    from runner.config.compose import compose_resolved

    repo, commit, entrypoint = external_code.parse_spec(spec)
    allowed = list(compose_resolved()[1]["code"]["allowed_origins"])
    origin = external_code.check_origin(repo, allowed)  # before anything is fetched
    sha = external_code.resolve(origin, commit)
    return external_code.pin(origin, sha, entrypoint, allowed)


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
    family = meta.get("family")
    try:
        if family is None or family in families.FAMILIES:
            info, problems = _inspect_cached(str(folder), parent["id"], family,
                                             _stamp(folder, family))
        else:  # an external family: this call's own card (a name two cards may share), and
            info, problems = inspect(folder, parent["id"], family)  # lstat only: not cached
    except CheckpointProblem as exc:
        return {"inspected": True, "error": exc.to_dict()}, stored, [exc]
    problems = list(problems)
    arch = dict(info.architecture)
    for name, value in stored.items():  # the registry's record must be the files'
        if name in arch and arch[name] != value:
            problems.append(CheckpointProblem(
                f"{parent['id']}: the registry says {name}={value!r} but its args.json "
                f"says {arch[name]!r}", reason="architecture_mismatch", field=f"parent.{name}",
                fix=FIXES["architecture_mismatch"]))
    report = {"inspected": True, "family": family or "scgpt", "architecture": dict(arch)}
    if "vocab" in info.metadata:  # scGPT's: its vocabulary and the args no network reads
        report.update(vocab_size=info.metadata["vocab"]["size"],
                      specials=dict(info.metadata["vocab"].get("specials") or {}),
                      ignored_args=list(info.metadata.get("ignored_args") or []))
    content = _dataset_content(resolved, dataset)
    if content is None or "error" in content:
        report["genes"] = {"checked": False, "why": (content or {}).get(
            "error", "the dataset is not on this host yet (fetched at launch)")}
    elif info.genes is None:
        report["genes"] = {"checked": False, "why": "the checkpoint does not list its genes "
                           "(read from its weights inside the job)"}
    else:
        overlap = families.gene_overlap(info.genes, content["genes"])
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
        report["heads"] = _heads(resolved, meta, info.metadata, content)
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
    digest = hashlib.sha1(label.encode()).hexdigest()[:8]
    cache = settings.cache_dir() / "genes" / f"{key[:32]}-{digest}.json"
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
