"""What comes out of the jail is untrusted; this makes it safe for the host to read.

Lines: `printable` escapes control characters in every line of the job's output. Files:
`_scan_output` walks /job/out iteratively without following a link and measures it against
the output caps (the supervisor polls it while the job runs); `_hand_back`, after every
process of the job is gone, keeps only regular files and directories, clears setuid bits,
gives everything back to the host owner, and removes a tree over the caps whole and unread
(`_remove_all`)."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.sandbox import SandboxJob

# C0 controls but tab, DEL and C1 controls (ESC, CSI, OSC...) -> visible \xNN escapes.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}


def printable(text: str) -> str:
    """`text` with control characters made visible, so that output from a job cannot move
    the cursor, retitle or clear the operator's terminal, or forge lines in the log."""
    return text.translate(_CONTROL_ESCAPES)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(parent_fd: int, name: str) -> int:
    """Open directory `name` under `parent_fd` without following a link; if its mode shuts
    out its owner (a host that is not root), open it up first, through an O_PATH descriptor
    so that the chmod cannot land on anything but that directory."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                          dir_fd=parent_fd)
        try:
            os.chmod(f"/proc/self/fd/{path_fd}", 0o700)
        finally:
            os.close(path_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _scan_output(root: Path, job: SandboxJob, fix: Callable | None = None) -> str | None:
    """Walk the output tree iteratively (a stack of open directories, at most
    `max_output_depth` deep), never following a link and never opening anything but a
    directory; return why it is over the caps (bytes allocated, entries, depth), else None.
    `fix(dir_fd, name, st, rel)` is called for each entry (after its directory is opened, for
    a directory); the job may still be running, so vanished entries are skipped."""
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        return f"cannot open the output directory: {exc.strerror}"
    stack: list = []
    try:
        stack.append((root_fd, os.scandir(root_fd), "", 0))
    except OSError as exc:
        os.close(root_fd)
        return f"cannot list the output directory: {exc.strerror}"
    used, entries = 0, 0
    try:
        while stack:
            fd, it, rel, depth = stack[-1]
            try:
                entry = next(it, None)
            except OSError:
                entry = None
            if entry is None:
                stack.pop()
                it.close()
                os.close(fd)
                continue
            entries += 1
            if entries > job.max_output_entries:
                return f"/job/out holds more than {job.max_output_entries} entries"
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            used += st.st_blocks * 512
            if used > job.max_output_bytes:
                return f"/job/out is over its quota of {job.max_output_bytes} bytes"
            path = f"{rel}/{entry.name}" if rel else entry.name
            if not stat.S_ISDIR(st.st_mode):
                if fix is not None:
                    fix(fd, entry.name, st, path)
                continue
            if depth + 1 > job.max_output_depth:
                return f"/job/out is deeper than {job.max_output_depth} levels"
            try:
                sub = _open_dir(fd, entry.name) if fix else os.open(entry.name, _DIR_FLAGS,
                                                                    dir_fd=fd)
            except PermissionError:
                return "/job/out holds a directory the host cannot read"
            except OSError:  # gone, or swapped for a link or a file meanwhile
                continue
            try:
                if fix is not None:
                    fix(sub, None, st, path)
                stack.append((sub, os.scandir(sub), path, depth + 1))
            except OSError:
                os.close(sub)
    finally:
        for fd, it, _, _ in stack:
            it.close()
            os.close(fd)
    return None


def _remove_all(root: Path) -> None:
    """Empty `root` without recursion and without following links, however deep or wide the
    tree: each subdirectory is moved up into one quarantine folder at the top, its files are
    unlinked, and it is removed; nothing is read but directory listings."""
    root_fd = os.open(root, _DIR_FLAGS)
    quarantine = f".forge-quarantine-{uuid.uuid4().hex[:8]}"
    os.mkdir(quarantine, 0o700, dir_fd=root_fd)
    q_fd = os.open(quarantine, _DIR_FLAGS, dir_fd=root_fd)
    pending: list[str | None] = [None]  # None: root itself; else a name in the quarantine
    moved = 0
    try:
        while pending:
            name = pending.pop()
            fd = root_fd if name is None else _open_dir(q_fd, name)
            try:
                if name is not None:
                    os.fchmod(fd, 0o700)  # a job may leave it read-only
                busy = True
                while busy:  # until a listing comes back with nothing left to move
                    busy = False
                    with os.scandir(fd) as it:
                        for entry in it:
                            if name is None and entry.name == quarantine:
                                continue
                            busy = True
                            try:
                                if entry.is_dir(follow_symlinks=False):
                                    moved += 1
                                    os.rename(entry.name, f"d{moved}", src_dir_fd=fd,
                                              dst_dir_fd=q_fd)
                                    pending.append(f"d{moved}")
                                else:
                                    os.unlink(entry.name, dir_fd=fd)
                            except FileNotFoundError:
                                pass
            finally:
                if name is not None:
                    os.close(fd)
            if name is not None:
                os.rmdir(name, dir_fd=q_fd)
    finally:
        os.close(q_fd)
        os.rmdir(quarantine, dir_fd=root_fd)
        os.close(root_fd)


def _hand_back(root: Path, owner: os.stat_result, chown: bool, on_line,
               job: SandboxJob) -> str | None:
    """Make the job's output safe for the host to read, before the host reads any of it.

    Walks it iteratively without following links (`_scan_output`): only regular files and
    directories stay (a symlink could point a host reader at /root or /etc, a FIFO would hang
    it, a device would open the host's), modes lose setuid/setgid and open to their owner,
    and everything goes back to the host owner. A tree over the caps (bytes, entries,
    depth) is removed whole without being read, and the reason is returned. Runs after every
    process of the job is gone."""

    def fix(dir_fd: int, name: str | None, st: os.stat_result, rel: str) -> None:
        try:
            if name is None:  # a directory, opened as dir_fd
                if chown:
                    os.fchown(dir_fd, owner.st_uid, owner.st_gid)
                if stat.S_IMODE(st.st_mode) != (st.st_mode & 0o777 | 0o700):
                    os.fchmod(dir_fd, st.st_mode & 0o777 | 0o700)
                return
            if not stat.S_ISREG(st.st_mode):
                os.unlink(name, dir_fd=dir_fd)
                on_line(f"removed {printable(rel)[:300]}: only regular files and directories "
                        "leave the sandbox")
                return
            if chown:
                os.chown(name, owner.st_uid, owner.st_gid, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_IMODE(st.st_mode) != (st.st_mode & 0o777 | 0o600):
                path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    if stat.S_ISREG(os.fstat(path_fd).st_mode):
                        os.chmod(f"/proc/self/fd/{path_fd}", st.st_mode & 0o777 | 0o600)
                finally:
                    os.close(path_fd)
        except OSError:
            pass

    rejected = _scan_output(root, job, fix)
    if rejected:
        on_line(f"{rejected}: the output is removed unread")
        try:
            _remove_all(root)
        except OSError as exc:
            on_line(f"could not remove all of the output: {exc}")
    if chown:
        os.chown(root, owner.st_uid, owner.st_gid, follow_symlinks=False)
    return rejected
