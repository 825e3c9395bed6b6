"""Running the jail: the one-time probe that bubblewrap can build it (`_require_sandbox`),
then, for each job, the supervisor that relays its output and enforces from outside the
wall-time cap, the output quota and (without a cgroup) the memory watch, and the mapping
from bwrap's exit code to a reason (`_reason`). `gpu_launch` starts bwrap and drives these.
"""

from __future__ import annotations

import copy
import json
import os
import selectors
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import SandboxUnavailable
from runner.sandbox.memory import _namespace_memory, _tmpfs_memory
from runner.sandbox.output import _scan_output, printable
from runner.sandbox.policy import _NAMESPACE_ARGS, _system_args, _tool
from runner.sandbox.seccomp import _seccomp_program
from trainers.manifest import EXIT_OOM  # the trainer's exit code for out-of-memory

if TYPE_CHECKING:
    from runner.sandbox import SandboxJob

BWRAP_INSTALL = "apt-get install -y bubblewrap"
USERNS_SYSCTL = "sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000"

POLL_S = 1.0  # how often the supervisor measures /job/out and, without a cgroup, memory


# --------------------------------------------------------------------------- probe


_probed: set[str] = set()
# A failed probe's answer, per bwrap path: kept a short while, so that the dry runs of a busy
# host run bwrap once, and an operator who fixes the host (installs it, enables user
# namespaces) is seen without a restart.
_failed: dict[str, tuple[float, SandboxUnavailable]] = {}
FAILED_PROBE_TTL_S = 30.0


def _bwrap_path(bwrap: str | None) -> str:
    return bwrap or os.environ.get("FORGE_BWRAP") or shutil.which("bwrap") or "/usr/bin/bwrap"


def unavailable(bwrap: str | None = None) -> SandboxUnavailable | None:
    """Why no job can run in the sandbox on this host now (no usable bubblewrap), or None:
    the probe `gpu_launch` makes, run at most once per bwrap path (a success for the
    process's life, a failure for FAILED_PROBE_TTL_S), so a dry run can ask it cheaply."""
    path = _bwrap_path(bwrap)
    if path in _probed:
        return None
    failed = _failed.get(path)
    if failed is not None and time.monotonic() - failed[0] < FAILED_PROBE_TTL_S:
        return copy.copy(failed[1])  # each caller raises its own (tracebacks stay apart)
    try:
        _require_sandbox(path)
    except SandboxUnavailable as exc:
        _failed[path] = (time.monotonic(), exc.with_traceback(None))
        return copy.copy(exc)
    _failed.pop(path, None)
    return None


def _require_sandbox(bwrap: str | None) -> str:
    """Resolve bwrap and prove once (per path, per process) that it can build our jail."""
    path = _bwrap_path(bwrap)
    if path in _probed:
        return path
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SandboxUnavailable(
            f"bubblewrap not found at {path}; training only runs inside the sandbox",
            field="FORGE_BWRAP", fix=BWRAP_INSTALL, bwrap=path)
    for tool in ("setpriv", "prlimit"):
        if not _tool(tool):
            raise SandboxUnavailable(f"{tool} not found; the sandbox needs util-linux",
                                     field="sandbox.backend", fix="apt-get install -y util-linux")
    argv = [path, *_NAMESPACE_ARGS, *_system_args(), "--proc", "/proc", "--dev", "/dev"]
    seccomp = _seccomp_program()
    pass_fds: list[int] = []
    if seccomp is not None:  # the same filter the jobs get, so the probe proves it loads
        r, w = os.pipe()
        os.write(w, seccomp)
        os.close(w)
        pass_fds.append(r)
        argv += ["--seccomp", str(r)]
    try:
        probe = subprocess.run([*argv, "--", "/usr/bin/true"], capture_output=True, text=True,
                               timeout=30, env={"PATH": "/usr/bin:/bin"}, pass_fds=pass_fds,
                               check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxUnavailable(f"cannot run bubblewrap at {path}: {exc}",
                                 field="FORGE_BWRAP", fix=BWRAP_INSTALL, bwrap=path) from exc
    finally:
        for fd in pass_fds:
            os.close(fd)
    if probe.returncode != 0:
        err = probe.stderr.strip()[-500:]
        fix = BWRAP_INSTALL
        if os.geteuid() != 0 or "namespace" in err.lower() or "permission" in err.lower():
            fix += f"; if user namespaces are disabled: {USERNS_SYSCTL}"
        raise SandboxUnavailable(f"bubblewrap at {path} cannot create the sandbox: {err}",
                                 field="FORGE_BWRAP", fix=fix, bwrap=path)
    _probed.add(path)
    return path


# --------------------------------------------------------------------------- supervise


class _Supervisor:
    """Relays output line by line (control characters escaped), enforces the wall-time cap
    on the whole pid namespace, and about once a second the output quota and, without a
    cgroup, the memory cap.

    The job's processes are found by their pid namespace. An open fd on that namespace
    keeps its inode from being reused by another sandbox, and signals go through pidfds,
    so a recycled pid is never hit."""

    def __init__(self, proc: subprocess.Popen, info_fd: int, log, on_line, job: SandboxJob,
                 out: Path, watch_memory: bool = False):
        self.proc, self.info_fd, self.log, self.on_line, self.job = proc, info_fd, log, on_line, job
        self.out, self.watch_memory = out, watch_memory
        self.stopped: tuple[str, str] | None = None  # (reason, detail) when a cap was hit
        self.pending = b""
        self.logged = 0
        self.info = b""
        self.init_pid: int | None = None  # the namespace's init (bwrap's child)
        self.init_pidfd: int | None = None
        self.ns: tuple[int, int] | None = None  # (st_dev, st_ino) of the pid namespace
        self.ns_fd: int | None = None

    # -- output
    def _emit(self, raw: bytes) -> None:
        """One line of the job's output, escaped, to the log (within max_log_bytes) and
        to on_line."""
        line = printable(raw.decode("utf-8", "replace").rstrip("\r"))
        if self.logged < self.job.max_log_bytes:
            data = (line + "\n").encode()
            self.log.write(data[: self.job.max_log_bytes - self.logged])
            self.logged += len(data)
            if self.logged >= self.job.max_log_bytes:
                self.log.write(b"\n[sandbox] log truncated at max_log_bytes\n")
        self.on_line(line)

    def _feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        if len(self.pending) > 65536:  # a very long line without newline: pass it on
            lines.append(self.pending)
            self.pending = b""
        for line in lines:
            self._emit(line)
        self.log.flush()

    def _flush(self) -> None:
        if self.pending:
            line, self.pending = self.pending, b""
            self._emit(line)
        self.log.flush()

    # -- caps measured from outside
    def _check_caps(self) -> None:
        over = _scan_output(self.out, self.job)
        if over:
            self._stop("output_quota", f"{over}: the job is killed")
            return
        if self.watch_memory and self.ns is not None:
            members = self._members()
            used = _namespace_memory(members)
            held = _tmpfs_memory([p for p in members if p != self.init_pid], self.ns)
            if used + held > self.job.max_memory_bytes:
                self._stop("oom", f"the job's processes use {used} bytes and its /tmp and "
                                  f"/dev/shm hold {held}, together over its memory cap of "
                                  f"{self.job.max_memory_bytes}: killed")

    def _stop(self, reason: str, detail: str) -> None:
        self.stopped = (reason, detail)
        self.on_line(detail)
        self.kill_all()

    def _read_info(self) -> bool:
        chunk = os.read(self.info_fd, 4096)
        self.info += chunk
        if chunk:
            return True
        try:
            self._track(int(json.loads(self.info)["child-pid"]))
        except (ValueError, KeyError):
            pass
        return False

    def _track(self, init_pid: int) -> None:
        """Pin the namespace's init and its pid namespace, if it is still bwrap's child."""
        try:
            pidfd = os.pidfd_open(init_pid)
        except OSError:
            return
        try:
            ns_fd = os.open(f"/proc/{init_pid}/ns/pid", os.O_RDONLY)
        except OSError:
            os.close(pidfd)
            return
        if _ppid(init_pid) != self.proc.pid:  # gone and recycled before we pinned it
            os.close(pidfd)
            os.close(ns_fd)
            return
        st = os.fstat(ns_fd)
        self.init_pid, self.init_pidfd, self.ns_fd = init_pid, pidfd, ns_fd
        self.ns = (st.st_dev, st.st_ino)

    def run(self, deadline: float) -> bool:
        """Returns True if the job hit its wall-time cap."""
        sel = selectors.DefaultSelector()
        stdout = self.proc.stdout.fileno()
        sel.register(stdout, selectors.EVENT_READ, "out")
        sel.register(self.info_fd, selectors.EVENT_READ, "info")
        timed_out, kill_at, exited_at = False, None, None
        next_check = time.monotonic() + POLL_S
        while True:
            now = time.monotonic()
            if now >= next_check and self.stopped is None and self.proc.poll() is None:
                self._check_caps()
                next_check = time.monotonic() + POLL_S
                now = time.monotonic()
            stop = self.job.stop
            if stop is not None and stop.is_set() and self.stopped is None and not timed_out:
                kill_at = now + self.job.grace_s
                self.stopped = ("cancelled", "cancelled by the host (its scheduler stopped the "
                                             "job): SIGTERM, then SIGKILL "
                                             f"in {self.job.grace_s:g}s")
                self.on_line(self.stopped[1])
                self.signal_jobs(signal.SIGTERM)
            if not timed_out and self.stopped is None and now >= deadline:
                timed_out, kill_at = True, now + self.job.grace_s
                self.on_line(f"wall-time cap of {self.job.wall_time_cap_s:g}s reached: "
                             f"SIGTERM, SIGKILL in {self.job.grace_s:g}s")
                self.signal_jobs(signal.SIGTERM)
            if kill_at is not None and now >= kill_at:
                self.kill_all()
                kill_at = None
            if self.proc.poll() is not None:
                exited_at = exited_at or now
                if stdout not in sel.get_map() or now - exited_at > 5:  # drained, or stuck
                    break
            wake = min(deadline if not timed_out else now + 0.5, now + 0.5,
                       kill_at if kill_at is not None else now + 0.5, max(now, next_check))
            if not sel.get_map():
                time.sleep(max(0.0, wake - now))
                continue
            for key, _ in sel.select(timeout=max(0.0, wake - now)):
                if key.data == "info":
                    if not self._read_info():
                        sel.unregister(self.info_fd)
                    continue
                chunk = os.read(stdout, 65536)
                if chunk:
                    self._feed(chunk)
                else:
                    sel.unregister(stdout)
        sel.close()
        self._flush()
        return timed_out

    # -- signals
    def _members(self) -> list[int]:
        """Host pids of the live processes in the job's pid namespace. Zombies are dead:
        bwrap's init is left as one for the host's pid 1 to reap, on its own schedule."""
        if self.ns is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    st = os.stat(f"/proc/{entry}/ns/pid")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == self.ns and _state(int(entry)) not in ("Z", "X", None):
                    pids.append(int(entry))
        return pids

    def _signal_member(self, pid: int, sig: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:  # the pidfd pins the process; check it is (still) ours before signalling
            st = os.stat(f"/proc/{pid}/ns/pid")
            if (st.st_dev, st.st_ino) == self.ns:
                signal.pidfd_send_signal(pidfd, sig)
        except OSError:
            pass
        finally:
            os.close(pidfd)

    def signal_jobs(self, sig: int) -> None:
        """Send `sig` to every process of the job but bwrap's init (which ignores it)."""
        for pid in self._members():
            if pid != self.init_pid:
                self._signal_member(pid, sig)

    def kill_all(self) -> None:
        """SIGKILL the namespace's init (the kernel then kills every process in it) and
        bwrap; wait until no process of the job is left. Idempotent."""
        if self.ns is None and self.proc.poll() is None:
            # bwrap has not reported its child yet: its children file names it.
            try:
                path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
                self._track(int(Path(path).read_text().split()[0]))
            except (OSError, IndexError, ValueError):
                pass
        if self.init_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for _ in range(250):  # the kernel tears the namespace down asynchronously
            left = self._members()
            if not left:
                break
            for pid in left:
                self._signal_member(pid, signal.SIGKILL)
            time.sleep(0.02)

    def close(self) -> None:
        for fd in (self.init_pidfd, self.ns_fd):
            if fd is not None:
                os.close(fd)
        self.init_pidfd = self.ns_fd = None


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]; [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def _reason(code: int) -> str:
    if code == 0:
        return "ok"
    # bwrap reports a job killed by signal N as 128+N; 137 = SIGKILL, the OOM killer's.
    if code in (EXIT_OOM, 128 + signal.SIGKILL, -signal.SIGKILL):
        return "oom"
    if code < 0 or code > 128:
        return "killed"
    return "error"
