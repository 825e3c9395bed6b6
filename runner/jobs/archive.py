"""Unpack a tar archive without letting it write outside its folder.

Python 3.11.4+ has tarfile's "data" filter, which refuses absolute names, `..`, links out of
the folder and device files. Older 3.11 releases (Debian 12 ships 3.11.2) lack it; there the
same rule is applied here: regular files and directories only, every name inside `dest`.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


class UnsafeArchive(ValueError):
    """A member would land outside the folder, or is not a plain file or directory."""


def extract_tar(tar: tarfile.TarFile, dest: str | Path) -> None:
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
