"""Unpack archives without letting them write outside their folder, or fill the disk.

- `unpack()`: an archive someone else made (a checkpoint's zip or tar, any compression),
  registered from outside. Opened only if it is a regular file (O_NONBLOCK, then fstat: a FIFO
  must not hang the host); regular files and directories only, every name inside `dest`,
  written by us with plain modes; the operator's caps (`Limits`: unpacked size, members,
  unpacked bytes per archive byte) are checked from the headers first, and the bytes really
  written are counted against them too, since headers can lie. Every refusal is typed:
  `archive_too_large`, `unsafe_archive`, `disk_full` (ENOSPC). The caller removes `dest`.
- `extract_tar()`: `git archive` output of the pinned code (runner/jobs/codepin.py), with
  tarfile's "data" filter where this Python has it.
- `build_dir()`: a folder built whole in a temporary folder beside it, then renamed into
  place, so that concurrent launches never see half of one (the code snapshots).
- `compile_tree()`: the bytecode of a snapshot's Python files, written beside them once, on
  the host, before the rename: the jail mounts the snapshot read-only and never writes
  bytecode (PYTHONDONTWRITEBYTECODE), so without it every job compiled every module again.
"""

from __future__ import annotations

import errno
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from runner.errors import DiskFull, ForgeError, InvalidConfig

GIB = 1024**3
CHUNK = 1 << 20
CAPS_FIX = "conf/registry/ (registry.{cap}) sets this cap: publish a smaller archive, or " \
           "raise the cap if you trust it"


class ArchiveRefused(ForgeError):
    """An archive that is not a regular file, holds a member that is not a plain file or
    directory inside its folder, is broken, or unpacks past the operator's caps."""

    reason = "unsafe_archive"


@dataclass(frozen=True)
class Limits:
    """The operator's caps on one archive (conf/registry/: registry.max_archive_*)."""

    max_bytes: int = 20 * GIB
    max_files: int = 100_000
    max_ratio: float = 200.0

    @classmethod
    def from_registry(cls, registry: dict) -> Limits:
        for key in ("max_archive_gb", "max_archive_files", "max_archive_ratio"):
            if not 0 < registry[key] < float("inf"):
                raise InvalidConfig(f"registry.{key} must be a number > 0, got "
                                    f"{registry[key]!r}", field=f"registry.{key}",
                                    fix="set it in conf/registry/")
        return cls(max_bytes=int(registry["max_archive_gb"] * GIB),
                   max_files=int(registry["max_archive_files"]),
                   max_ratio=float(registry["max_archive_ratio"]))


def operator_limits() -> Limits:
    """The caps in the operator's conf/ (conf/registry/, conf/local/), composed as a job's."""
    from runner.config.compose import compose_resolved  # Hydra: only when an archive comes

    return Limits.from_registry(compose_resolved(writable=False)[1]["registry"])


def open_regular(path: Path, field: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file; a FIFO or device is refused without
    blocking (O_NONBLOCK on the open, then fstat on what was opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ArchiveRefused(f"{path.name} cannot be opened: {exc.strerror}", field=field,
                             fix="point it at a zip or tar archive, or a folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ArchiveRefused(f"{path.name} is not a regular file", field=field,
                             fix="point it at a zip or tar archive, or a folder")
    return os.fdopen(fd, "rb")


def unpack(archive: Path, dest: Path, limits: Limits, *, field: str) -> None:
    """Unpack the zip or tar `archive` into the empty folder `dest` under `limits`."""
    with open_regular(archive, field) as f:
        budget = _Budget(limits, os.fstat(f.fileno()).st_size, field)
        try:
            if zipfile.is_zipfile(f):
                f.seek(0)
                with zipfile.ZipFile(f) as zf:
                    _unpack_zip(zf, Path(dest), budget)
            else:
                f.seek(0)
                with tarfile.open(fileobj=f, mode="r:*") as tf:
                    _unpack_tar(tf, Path(dest), budget)
        except ForgeError:
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"the disk filled up unpacking {archive.name} "
                               f"({budget.written} bytes written)", field=field,
                               fix="free space under FORGE_HOME (or FORGE_CACHE_DIR), then "
                                   "register it again") from None
            raise ArchiveRefused(f"{archive.name} cannot be unpacked: {exc}", field=field,
                                 fix="publish it as plain files and folders in a zip or "
                                     "tar archive") from None
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
                ValueError) as exc:  # a corrupt header or compressed stream
            raise ArchiveRefused(f"{archive.name} is broken: {exc}", field=field,
                                 fix="publish it again as a zip or tar archive") from None


class _Budget:
    """What one archive may still write: the caps, checked against the headers' sums and
    against the bytes really written."""

    def __init__(self, limits: Limits, archive_bytes: int, field: str):
        self.limits, self.field = limits, field
        self.by_ratio = int(limits.max_ratio * max(archive_bytes, 1))
        self.written = 0

    def refuse(self, what: str, cap: str) -> ArchiveRefused:
        return ArchiveRefused(f"the archive {what}", field=self.field,
                              reason="archive_too_large", fix=CAPS_FIX.format(cap=cap))

    def check_headers(self, members: int, size: int) -> None:
        if members > self.limits.max_files:
            raise self.refuse(f"holds more than {self.limits.max_files} members",
                              "max_archive_files")
        self._check_size(size, "would unpack to")

    def _check_size(self, size: int, verb: str) -> None:
        if size > self.limits.max_bytes:
            raise self.refuse(f"{verb} more than {self.limits.max_bytes} bytes",
                              "max_archive_gb")
        if size > self.by_ratio:
            raise self.refuse(f"{verb} more than {self.limits.max_ratio:g} times its own size "
                              f"({self.by_ratio} bytes)", "max_archive_ratio")

    def write(self, src: BinaryIO, target: Path) -> None:
        """Copy `src` into the new regular file `target`, counting every byte."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                self.written += len(chunk)
                self._check_size(self.written, "unpacked")  # headers can lie
                out.write(chunk)


def _target(dest: Path, name: str, field: str) -> Path:
    """Where member `name` goes: a relative path without `..`, inside `dest`."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\0" in name:
        raise ArchiveRefused(f"archive member {name[:200]!r} would land outside its folder",
                             field=field, fix="publish it with relative member names")
    return dest.joinpath(*path.parts) if path.parts else dest


def _not_plain(name: str, field: str) -> ArchiveRefused:
    return ArchiveRefused(f"archive member {name[:200]!r} is not a plain file or directory "
                          "(a link, a device, a FIFO)", field=field,
                          fix="publish the checkpoint as plain files and folders")


def _unpack_zip(zf: zipfile.ZipFile, dest: Path, budget: _Budget) -> None:
    infos = zf.infolist()
    budget.check_headers(len(infos), sum(i.file_size for i in infos))
    for info in infos:
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix mode recorded
        target = _target(dest, info.filename, budget.field)
        if info.is_dir() or kind == stat.S_IFDIR:
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
        elif kind in (0, stat.S_IFREG):
            with zf.open(info) as src:
                budget.write(src, target)
        else:
            raise _not_plain(info.filename, budget.field)


def _unpack_tar(tf: tarfile.TarFile, dest: Path, budget: _Budget) -> None:
    members, size = [], 0
    for member in tf:  # headers only; stops at the first cap it passes
        if not (member.isfile() or member.isdir()):
            raise _not_plain(member.name, budget.field)
        members.append(member)
        size += member.size if member.isfile() else 0
        budget.check_headers(len(members), size)
    for member in members:
        target = _target(dest, member.name, budget.field)
        if member.isdir():
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
        else:
            src = tf.extractfile(member)
            assert src is not None  # a regular file always has a reader
            with src:
                budget.write(src, target)


# --- the pinned code's `git archive` ------------------------------------------------------------

class UnsafeArchive(ValueError):
    """A member would land outside the folder, or is not a plain file or directory."""


def extract_tar(tar: tarfile.TarFile, dest: str | Path) -> None:
    """Python 3.11.4+ has tarfile's "data" filter, which refuses absolute names, `..`, links
    out of the folder and device files. Older 3.11 releases (Debian 12 ships 3.11.2) lack it;
    there the same rule is applied here: regular files and directories only, every name
    inside `dest`."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    root = os.path.realpath(dest)
    members = tar.getmembers()
    for member in members:
        target = os.path.realpath(os.path.join(root, member.name))
        if not (member.isfile() or member.isdir()) or \
                os.path.commonpath([root, target]) != root:
            raise UnsafeArchive(f"archive member {member.name!r} is not a plain file or "
                                "directory inside the archive's folder")
        member.mode &= 0o755  # no setuid/setgid/sticky, nothing group/world-writable
    tar.extractall(dest, members=members)


def build_dir(dest: Path, fill: Callable[[Path], None]) -> Path:
    """`dest`, filled by `fill(folder)` in a temporary folder beside it and renamed into
    place; kept as it is when it is there already (another launch built it first)."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name[:12]}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the sandbox's unprivileged uid must read it
    try:
        fill(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another launch put the same folder in place first
            if not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


COMPILE_TIMEOUT_S = 300.0


def compile_tree(folder: Path) -> bool:
    """Compile every .py under `folder` into its __pycache__, for this interpreter.

    Compiling parses; it runs nothing of the code. It runs in a child interpreter (isolated
    mode, a time limit), so that a hostile file (an external family's) can at worst leave
    the tree without bytecode, never stop or fill the host process. The .pyc files are
    hash-based (CHECKED_HASH): valid by the source's hash, not its mtime (which `git archive`
    sets to the commit's time); Python checks the hash on import, so a source other than
    the one compiled is compiled again (in memory) instead of running stale bytecode. Links
    are not followed into folders. A file that does not compile gets no .pyc (the job
    reports its SyntaxError as before). Returns whether every file compiled."""
    cmd = [sys.executable, "-I", "-m", "compileall", "-q", "-q",
           "--invalidation-mode", "checked-hash", str(folder)]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=COMPILE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
