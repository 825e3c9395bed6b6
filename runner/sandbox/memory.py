"""The memory cap (`SandboxJob.max_memory_bytes`): which mechanism enforces it on this host,
the job's cgroup v2 (made, read for OOM kills, removed), and what the supervisor watches when
there is no cgroup: the summed PSS of the job's processes plus what its private tmpfs mounts
hold (a file in /dev/shm is memory whether or not a process maps it; a cgroup already counts
it, as the kernel charges tmpfs pages to the cgroup of the process that writes them).

The RLIMIT_AS mechanism itself is a prlimit argument in the policy (`policy._policy`); the
watch runs in `supervisor._Supervisor`."""

from __future__ import annotations

import functools
import os
import signal
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from runner.sandbox.policy import TMPFS

if TYPE_CHECKING:
    from runner.sandbox import SandboxJob

def _memory_mechanism(job: SandboxJob, device: str) -> str:
    """How the memory cap is enforced: "cgroup2" (memory.max), "rlimit" (RLIMIT_AS per
    process, plus the supervisor's watch of the total), "watch" (the supervisor's watch
    alone: cuda jobs without a cgroup, since CUDA reserves far more address space than it
    uses) or "none" (no cap set)."""
    if job.max_memory_bytes is None:
        return "none"
    if _cgroup_base() is not None:
        return "cgroup2"
    return "rlimit" if device == "cpu" else "watch"


@functools.cache
def _cgroup_base() -> Path | None:
    """A cgroup v2 directory in which this process may create job cgroups with the memory
    controller: its own cgroup or the one above (systemd's delegation puts the service in a
    leaf below the delegated one). None when there is none (cgroup v1 hosts, no delegation)."""
    try:
        mount = next(line.split(" - ")[0].split()[4]
                     for line in Path("/proc/self/mountinfo").read_text().splitlines()
                     if " - cgroup2 " in line)
        rel = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
    except (OSError, StopIteration, IndexError):
        return None
    own = Path(mount) / rel.strip().lstrip("/")
    for base in (own, own.parent):
        if not base.is_relative_to(mount):
            break
        try:
            enabled = (base / "cgroup.subtree_control").read_text().split()
        except OSError:
            continue
        if "memory" in enabled and os.access(base, os.W_OK):
            return base
    return None


def _make_cgroup(job: SandboxJob) -> Path:
    """A fresh cgroup for one job: memory.max at the cap, no swap, and the OOM killer takes
    the whole job at once."""
    base = _cgroup_base()
    assert base is not None
    cg = base / f"forge-job-{uuid.uuid4().hex[:12]}"
    cg.mkdir(mode=0o755)
    try:
        (cg / "memory.max").write_text(str(job.max_memory_bytes))
        for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
            if (cg / name).exists():
                (cg / name).write_text(value)
    except OSError:
        _remove_cgroup(cg)
        raise
    return cg


def _cgroup_oom_kills(cg: Path) -> int:
    try:
        for line in (cg / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _remove_cgroup(cg: Path) -> None:
    for _ in range(50):  # the kernel empties it asynchronously after the last task exits
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def _namespace_memory(pids: list[int]) -> int:
    """Bytes of memory the given processes use together: the sum of their proportional set
    sizes (shared pages split between sharers), RSS where PSS is unreadable."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, ValueError, IndexError):
            try:
                total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * \
                    os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                pass
    return total


def _tmpfs_memory(pids: list[int], ns: tuple[int, int]) -> int:
    """Bytes the jail's private tmpfs mounts (/tmp, /dev/shm) hold, read through the root of
    one of the given processes of the job's pid namespace `ns` (never bwrap's init: the jail's
    mounts are all there once the job's own processes exist). The pidfd pins the process:
    a pid recycled meanwhile by a process of the host is never read. A tmpfs file that a
    process also maps counts in its PSS too: counted twice, on the side of the cap."""
    for pid in pids:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            st = os.stat(f"/proc/{pid}/ns/pid")
            if (st.st_dev, st.st_ino) != ns:
                continue
            used = 0
            for mount in TMPFS:
                fs = os.statvfs(f"/proc/{pid}/root{mount}")
                used += (fs.f_blocks - fs.f_bfree) * fs.f_frsize
            signal.pidfd_send_signal(pidfd, 0)  # still alive: the pid was ours throughout
            return used
        except OSError:
            continue
        finally:
            os.close(pidfd)
    return 0
