"""Model weights on disk: resolve a parent's weights for a job, store a new version's weights.

A model's weights are a folder in scGPT layout (args.json, vocab.json, best_model.pt). Its
`content_hash` is a tree hash: sha256 over the sorted `sha256  relative/path` lines of its
files, so the same bytes under the same names always give the same id.

Internal weights live in `FORGE_HOME/artifacts/models/{id}/weights/`; files above a size
threshold go to the content-addressed blob store `FORGE_HOME/blobs/sha256/ab/abcd...` and the
weights folder keeps `blobs.json` naming them. External weights come from `origin_url`
(`file://` folder or archive, `http(s)://` archive) into the cache and must match the
registered hash before any job sees them.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import stat
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from runner import settings
from runner.errors import DiskFull, NotFound, WeightsIntegrityError
from runner.jobs import archive
from runner.registry.catalog import validate_artifact_id

BLOB_INDEX = "blobs.json"
CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_hash(files: dict[str, str]) -> str:
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def version_dir(artifact_id: str) -> Path:
    """A model version's folder: its weights/ and the files kept beside them (code.diff)."""
    return settings.forge_home() / "artifacts" / "models" / validate_artifact_id(artifact_id)


def weights_dir(artifact_id: str) -> Path:
    return version_dir(artifact_id) / "weights"


def blob_path(sha: str) -> Path:
    return settings.forge_home() / "blobs" / "sha256" / sha[:2] / sha


def stored_file(artifact_id: str, name: str) -> Path:
    """A file of a version's stored weights: in its weights folder, or the blob it names."""
    folder = weights_dir(artifact_id)
    index = folder / BLOB_INDEX
    if not (folder / name).is_file() and index.is_file():
        sha = json.loads(index.read_text()).get(name)
        if isinstance(sha, str):
            return blob_path(sha)
    return folder / name


def store(artifact_id: str, checkpoint: Path, blob_threshold_mb: float = 50) -> dict:
    """Copy a finished checkpoint folder into the registry's weights store.

    Returns the `weights` metadata: {sha256 (tree hash), files, size_bytes, path, blobs?}.
    """
    files = file_hashes(checkpoint)
    if not files:
        raise WeightsIntegrityError(f"checkpoint folder {checkpoint} is empty", field="checkpoint",
                                    fix="the trainer must write its checkpoint before registration")
    dest = weights_dir(artifact_id)
    dest.mkdir(parents=True, exist_ok=True)
    blobs, size = {}, 0
    for name, sha in files.items():
        src = checkpoint / name
        size += src.stat().st_size
        if src.stat().st_size > blob_threshold_mb * 1024 * 1024:
            target = blob_path(sha)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp")
                shutil.copyfile(src, tmp)
                os.replace(tmp, target)
            blobs[name] = sha
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / name)
    if blobs:
        (dest / BLOB_INDEX).write_text(json.dumps(blobs, indent=2, sort_keys=True))
    out = {"sha256": tree_hash(files), "files": files, "size_bytes": size, "path": str(dest)}
    if blobs:
        out["blob"] = "sha256"
    return out


def remove(artifact_id: str) -> None:
    """Undo store() when registration fails (blobs stay: they are shared by content)."""
    shutil.rmtree(version_dir(artifact_id), ignore_errors=True)


def materialize(artifact: dict, dest: Path) -> Path:
    """Put a model's weights in `dest` (a fresh folder) as plain files, verified by hash."""
    if artifact["origin_type"] == "external":
        source = fetch_external(artifact)
    else:
        source = weights_dir(artifact["id"])
        if not source.is_dir():
            raise NotFound(f"weights of {artifact['id']!r} are missing at {source}",
                           field="parent_artifact_id",
                           fix="restore FORGE_HOME/artifacts or re-register the model")
    dest.mkdir(parents=True, exist_ok=True)
    blobs = {}
    if (source / BLOB_INDEX).exists():
        blobs = json.loads((source / BLOB_INDEX).read_text())
    for path in source.rglob("*"):
        if path.is_file() and path.name != BLOB_INDEX:
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, target)
    for name, sha in blobs.items():
        _link_or_copy(blob_path(sha), dest / name)
    _verify(artifact, file_hashes(dest))
    return dest


def _verify(artifact: dict, files: dict[str, str]) -> None:
    expected = artifact.get("content_hash")
    actual = tree_hash(files)
    if expected and actual != expected:
        raise WeightsIntegrityError(
            f"weights of {artifact['id']!r} hash to {actual[:12]}..., registry says "
            f"{expected[:12]}...", field="content_hash",
            fix="the weights changed since registration: restore them or register a new version")


# --- before a debit: what the host can tell without unpickling ---------------------------------

def check(artifact: dict, *, hash_limit_bytes: float) -> tuple[dict, list[WeightsIntegrityError]]:
    """(report, problems): whether `materialize(artifact)` would find the weights the registry
    recorded, told from the files alone (never unpickled). Every file must be there as a
    regular file the host can open; their total size must be the recorded `size_bytes`; and,
    when they total at most `hash_limit_bytes`, their sha256 must give the registered
    content_hash (a file's hash is kept per file identity, so a second look is free).
    Weights fetched at launch (an http(s) or file:// archive not unpacked yet) are not here
    to check: their download and hash are checked by the launch."""
    name = artifact["id"]
    try:
        files = _local_files(artifact)
    except WeightsIntegrityError as exc:
        return {"checked": False}, [exc]
    if files is None:
        return {"checked": False, "why": "an archive, unpacked and checked at launch"}, []
    recorded_meta = (artifact.get("metadata") or {}).get("weights") or {}
    recorded = recorded_meta.get("files") if isinstance(recorded_meta.get("files"), dict) else {}
    problems: list[WeightsIntegrityError] = []
    if absent := sorted(set(recorded) - set(files)):
        problems.append(_weights_problem(name, "weights_missing", f"{', '.join(absent)} missing"))
    extra = sorted(set(files) - set(recorded)) if recorded else []
    if extra:  # materialize() hashes every file it finds: the tree hash would differ
        problems.append(_weights_problem(name, "weights_integrity",
                                         f"{', '.join(extra)} not in the registry's record"))
    sizes, unreadable, gone = {}, [], []
    for rel, path in files.items():
        try:
            sizes[rel] = _regular_size(path)
        except FileNotFoundError:
            gone.append(rel)
        except OSError as exc:
            unreadable.append(f"{rel} ({exc.strerror or exc})")
    if gone:
        problems.append(_weights_problem(name, "weights_missing", f"{', '.join(gone)} missing"))
    if unreadable:
        problems.append(_weights_problem(name, "weights_unreadable",
                                         f"{', '.join(unreadable)} cannot be read"))
    total = sum(sizes.values())
    report = {"checked": True, "files": len(files), "size_bytes": total, "hashed": False}
    if problems:
        return report, problems
    expected_size = recorded_meta.get("size_bytes")
    if isinstance(expected_size, int) and total != expected_size:
        return report, [_weights_problem(
            name, "weights_size", f"{total} bytes on disk, the registry recorded "
            f"{expected_size}", size_bytes=total, recorded_bytes=expected_size)]
    expected = artifact.get("content_hash")
    if expected and total <= hash_limit_bytes:
        hashes = {rel: _cached_sha256(str(path), _identity(path)) for rel, path in files.items()}
        report["hashed"] = True
        if tree_hash(hashes) != expected:
            changed = sorted(rel for rel, sha in hashes.items() if recorded.get(rel) != sha)
            detail = f" ({', '.join(changed)} changed)" if recorded and changed else ""
            problems.append(_weights_problem(
                name, "weights_integrity",
                f"their sha256 differs from the registry's {expected[:12]}...{detail}"))
    return report, problems


def _local_files(artifact: dict) -> dict[str, Path] | None:
    """name -> the file on this host that materialize() would put there under that name;
    None when the weights come as an archive fetched or unpacked at launch."""
    if artifact["origin_type"] == "external":
        url = artifact.get("origin_url") or ""
        key = artifact.get("content_hash") or hashlib.sha256(url.encode()).hexdigest()
        folder = settings.cache_dir() / "weights" / key
        parsed = urllib.parse.urlparse(url)
        if not folder.is_dir():
            if parsed.scheme != "file":
                return None
            folder = Path(urllib.request.url2pathname(parsed.path))
            if not os.path.lexists(folder):
                raise _weights_problem(artifact["id"], "weights_missing",
                                       "the file:// origin the registry names is gone")
            if not folder.is_dir():
                return None
    else:
        folder = weights_dir(artifact["id"])
        if not folder.is_dir():
            raise _weights_problem(artifact["id"], "weights_missing",
                                   "the stored weights folder is gone")
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
             if p.name != BLOB_INDEX and not p.is_dir()}
    if (folder / BLOB_INDEX).exists():
        try:
            blobs = json.loads((folder / BLOB_INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise _weights_problem(artifact["id"], "weights_unreadable",
                                   f"{BLOB_INDEX} cannot be read ({exc})") from None
        files.update({rel: blob_path(sha) for rel, sha in blobs.items()
                      if isinstance(rel, str) and isinstance(sha, str)})
    return files


def _regular_size(path: Path) -> int:
    """The size of a regular file the host can open; OSError otherwise. O_NONBLOCK: a FIFO in
    its place must not hang the dry run."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    return info.st_size


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _cached_sha256(path: str, identity: tuple) -> str:
    """file_sha256, kept per file identity (a rewritten file has another mtime/ctime)."""
    return file_sha256(Path(path))


def _weights_problem(artifact_id: str, reason: str, what: str,
                     **details) -> WeightsIntegrityError:
    fixes = {
        "weights_missing": "the operator restores the model's weights (FORGE_HOME/artifacts, "
                           "the blob store, or the origin the registry names); else train "
                           "from another parent",
        "weights_unreadable": "the operator makes each weights file a plain file the host "
                              "can read; else train from another parent",
        "weights_size": "the weights changed since registration: the operator restores them, "
                        "or registers them as a new model; else train from another parent",
        "weights_integrity": "the weights changed since registration: the operator restores "
                             "them, or registers them as a new model; else train from another "
                             "parent",
    }
    return WeightsIntegrityError(f"weights of {artifact_id!r}: {what}", reason=reason,
                                 field="parent_artifact_id", fix=fixes[reason], **details)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def fetch_external(artifact: dict) -> Path:
    """Download or locate an external model's weights; cached by its registered hash.

    An archive is someone else's: it is unpacked under the operator's caps
    (runner/jobs/archive.py) into a private staging folder, which is removed whatever fails."""
    url = artifact.get("origin_url") or ""
    parsed = urllib.parse.urlparse(url)
    key = artifact.get("content_hash") or hashlib.sha256(url.encode()).hexdigest()
    cached = settings.cache_dir() / "weights" / key
    if cached.is_dir():
        return cached
    if parsed.scheme == "file":
        local = Path(urllib.request.url2pathname(parsed.path))
        if local.is_dir():
            return local  # verified after it is materialized
        if not os.path.lexists(local):
            raise NotFound(f"origin_url {url} does not exist", field="origin_url",
                           fix="point origin_url at the model's checkpoint folder or archive")
        return _unpack_into_cache(artifact, local, cached, archive.operator_limits())
    if parsed.scheme in ("http", "https"):
        limits = archive.operator_limits()
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / (Path(parsed.path).name or "download")
            _download(url, local, limits.max_bytes)
            return _unpack_into_cache(artifact, local, cached, limits)
    raise WeightsIntegrityError(f"unsupported origin_url {url!r}", field="origin_url",
                                fix="use a file:// folder or archive, or an http(s):// archive")


def _download(url: str, dest: Path, max_bytes: int) -> None:
    """`url` into `dest`, at most `max_bytes` (the unpacked cap bounds the archive too)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            while chunk := r.read(CHUNK):
                if f.tell() + len(chunk) > max_bytes:
                    raise archive.ArchiveRefused(
                        f"{url} is larger than {max_bytes} bytes", field="origin_url",
                        reason="archive_too_large",
                        fix=archive.CAPS_FIX.format(cap="max_archive_gb"))
                f.write(chunk)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"the disk filled up downloading {url}", field="origin_url",
                           fix="free space in the cache (FORGE_CACHE_DIR), then retry") from None
        raise NotFound(f"origin_url {url} could not be downloaded: {exc}", field="origin_url",
                       fix="check the URL and the network") from None


def _unpack_into_cache(artifact: dict, source: Path, cached: Path, limits) -> Path:
    """Unpack `source` into a fresh staging folder beside `cached`, verify, then rename it
    into place; the staging folder never outlives the call."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{cached.name}.partial-", dir=cached.parent))
    try:
        archive.unpack(source, staging, limits, field="origin_url")
        entries = list(staging.iterdir())
        root = entries[0] if len(entries) == 1 and entries[0].is_dir() else staging
        _verify(artifact, file_hashes(root))
        root.chmod(0o755)  # mkdtemp's 0700: jobs run as an unprivileged uid
        try:
            os.replace(root, cached)
        except OSError:  # another registration put the same weights in place first
            if not cached.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached
