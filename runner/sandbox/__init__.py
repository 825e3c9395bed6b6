"""Run one training job inside a bubblewrap jail and supervise it to the end.

`gpu_launch(job)` is the only way training runs. The job gets:

- no network beyond its own loopback: its own network namespace holds only `lo`, so the
  TCP a multi-device job's process group needs (gloo on CPU, NCCL's bootstrap on GPUs)
  stays inside the job; the seccomp filter refuses every socket family but AF_UNIX,
  AF_INET, AF_INET6 and route netlink (getifaddrs), and the jail is never built with inet
  sockets allowed and no network namespace of its own,
- its code snapshot at /job/code and its inputs at /job/in/<name>, read-only,
- one writable directory, /job/out, plus a private size-capped /tmp and /dev/shm,
- the system (/usr and a few files of /etc) and the Python environment, read-only,
- a cleared environment with an explicit allowlist,
- an unprivileged uid with no capabilities and no_new_privs (when the host side is root),
- limits on processes, file size and core dumps; a wall-time cap enforced here with
  SIGTERM, a grace period, then SIGKILL of the whole pid namespace; a VRAM pre-flight,
- a memory cap (`max_memory_bytes`): cgroup v2 `memory.max` where this host lets us make a
  child cgroup with the memory controller, else RLIMIT_AS per process (cpu jobs; CUDA
  reserves more address space than it uses) plus a once-a-second watch here of the summed
  PSS of the job's processes and what its /tmp and /dev/shm hold; either way a job over it
  is killed with reason `oom`, and the tmpfs counts (the cgroup charges tmpfs pages to the
  job that writes them),
- an output quota: about once a second the supervisor measures /job/out (iteratively, never
  following a link: bytes allocated, entries, depth) and kills the job with reason
  `output_quota` when it is over `max_output_bytes`, `max_output_entries` or
  `max_output_depth`,
- on a GPU host, only its own device nodes /dev/nvidiaN (`devices` of them from N), plus
  /dev/nvidiactl and /dev/nvidia-uvm,
- a seccomp filter generated from a table (`seccomp._SECCOMP_RULES`): sockets other than
  AF_UNIX, AF_INET, AF_INET6 and NETLINK_ROUTE, io_uring, new user namespaces and the
  kernel keyring (keyctl, add_key, request_key) are refused; everything else is allowed (a
  denylist: an allowlist profile is not attempted).

Nothing else of the host is mounted: not /work (registry DB, outputs, tracking store),
not /root or /home, not /run, not host secrets in /etc. If bubblewrap is missing or not
permitted, `SandboxUnavailable` is raised; the job never runs unsandboxed.

Inside, the job finds its device in FORGE_DEVICE ("cpu", or "cuda:0": the GPUs it is given
are always indices 0.. there, CUDA_VISIBLE_DEVICES lists them) and its VRAM cap per GPU in
FORGE_VRAM_CAP_GB (the trainer applies it with torch.cuda.set_per_process_memory_fraction);
its output's host owner gets it back.

What the job leaves in /job/out is untrusted. After every process of the job is gone,
`output._hand_back` walks it iteratively without following links and keeps only regular
files and directories (links, FIFOs, sockets and devices are removed, setuid bits cleared,
everything given back to the host owner); a tree over the caps is removed whole, unread, and
the run's reason becomes `output_quota`. Every line of the job's output is printed and
logged with its control characters escaped (`printable`).

Stdlib only at import time: the dry run calls `sandbox_plan()` without paying for torch.

Where things live:

- here: the public surface: `SandboxJob` (one job), `LaunchResult` (how it ended),
  `sandbox_plan` (the policy as data, for the dry run), `gpu_launch` (the run, start to
  end), the VRAM pre-flight (`check_free_vram`, `VramUnavailable`), the GPU nodes a job
  would lack (`missing_gpu_nodes`), and re-exported for other packages: `unavailable` (the
  cached bwrap probe, from `supervisor`), `printable` (from `output`), `IN_DIR` (from
  `policy`), `EXIT_OOM`;
- `policy`: what the jail looks like: the bwrap arguments (mounts, synthetic /etc, env,
  uid, rlimits, GPU device nodes) and the validation of a job (protected paths);
- `seccomp`: the seccomp BPF program, compiled from its syscall table;
- `memory`: the memory cap's mechanism, the job's cgroup v2, the PSS sum the watch reads;
- `supervisor`: the bwrap probe, the supervisor (output relay, wall-time cap, output quota
  and memory watch, killing the pid namespace), exit code -> reason;
- `output`: the job's output made safe for the host: escaped lines, the no-follow scan of
  /job/out, the hand-back of ownership and the removal of a tree over the caps.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from runner.errors import ForgeError
from runner.sandbox.memory import (
    _cgroup_oom_kills,
    _make_cgroup,
    _memory_mechanism,
    _remove_cgroup,
)
from runner.sandbox.output import _hand_back, printable
from runner.sandbox.policy import (
    _UID_BASE,
    IN_DIR,
    _needed_gpu_nodes,
    _nvidia_nodes,
    _policy,
    _resolve_device,
    _sandbox_uid,
    _synthetic_etc,
    _validate,
)
from runner.sandbox.seccomp import _seccomp_program
from runner.sandbox.supervisor import (
    _bwrap_path,
    _reason,
    _require_sandbox,
    _Supervisor,
    unavailable,
)
from trainers.manifest import EXIT_OOM  # the trainer's exit code for out-of-memory ("oom")

__all__ = ["EXIT_OOM", "IN_DIR", "LaunchResult", "SandboxJob", "VramUnavailable",
           "check_free_vram", "gpu_launch", "missing_gpu_nodes", "printable", "sandbox_plan",
           "unavailable"]

GIB = 1024**3


class VramUnavailable(ForgeError):
    reason = "vram_unavailable"


def _default_on_line(line: str) -> None:
    print(f"[sandbox] {line}", file=sys.stderr, flush=True)


@dataclass(kw_only=True)
class SandboxJob:
    """One job: `python -m module *args` inside the jail."""

    module: str
    code_dir: str | Path  # bound read-only at /job/code, first on PYTHONPATH
    output_dir: str | Path  # writable at /job/out; use a fresh one: files already there
    #                           stay host-owned, read-only to the job
    args: list[str] = field(default_factory=list)
    inputs: dict[str, str | Path] = field(default_factory=dict)  # name -> /job/in/<name>, ro
    wall_time_cap_s: float = 7200.0
    vram_cap_gb: float = 24.0
    device: str = "cpu"  # "cpu" or "cuda:N"; cuda on a host without that GPU runs on cpu
    devices: int = 1  # processes of a multi-device job; on cuda:N, GPUs N..N+devices-1
    env: dict[str, str] = field(default_factory=dict)  # allowlist; the reserved keys win
    log_path: str | Path | None = None  # default: <output_dir>.log next to output_dir
    on_line: Callable[[str], None] | None = None  # default: "[sandbox] line" to stderr
    grace_s: float = 10.0  # SIGTERM -> SIGKILL
    max_processes: int = 512  # RLIMIT_NPROC for the job's uid (counts threads too)
    max_file_size_bytes: int = 8 * GIB  # RLIMIT_FSIZE
    tmp_size_bytes: int = 4 * GIB  # /tmp and /dev/shm each; what they hold counts as memory
    max_log_bytes: int = 256 * 1024**2  # the host log file stops growing past this
    max_memory_bytes: int | None = 16 * GIB  # cgroup memory.max, else RLIMIT_AS + watch
    max_output_bytes: int = 20 * GIB  # /job/out quota (allocated blocks)
    max_output_entries: int = 100_000  # files and directories in /job/out
    max_output_depth: int = 64  # directory levels below /job/out
    uid: int | None = None  # None: a fresh unprivileged uid per launch (host root only)
    # Set by the host to stop the job early (its scheduler cancelled it): SIGTERM, the grace
    # period, SIGKILL, as at the wall-time cap; the result's reason is then "cancelled".
    stop: threading.Event | None = None

    def resolved_log_path(self) -> Path:
        if self.log_path is not None:
            return Path(self.log_path)
        out = Path(self.output_dir)
        return out.with_name(out.name + ".log")


@dataclass
class LaunchResult:
    """How a job ended. The ledger bills `wall_seconds` x the devices the plan priced."""

    exit_code: int
    reason: str  # ok | timeout | cancelled | killed | oom | output_quota | error
    started_at: datetime
    ended_at: datetime
    wall_seconds: float
    device: str
    log_path: Path
    detail: str | None = None  # why the host stopped the job (timeout, cancelled, oom, ...)


def check_free_vram(index: int, cap_gb: float) -> float:
    """Free memory of GPU `index` in GiB (NVML via nvidia-smi); raise if it is below the cap."""
    smi = os.environ.get("FORGE_NVIDIA_SMI") or shutil.which("nvidia-smi") or "nvidia-smi"
    cmd = [smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", str(index)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True)
        free_gb = float(out.stdout.strip().splitlines()[0]) / 1024  # MiB -> GiB
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
        raise VramUnavailable(f"cannot read free memory of cuda:{index} with nvidia-smi: {exc}",
                              field="device", fix="check the NVIDIA driver (nvidia-smi)") from exc
    if free_gb < cap_gb:
        raise VramUnavailable(
            f"cuda:{index} has {free_gb:.1f} GiB free, the job's VRAM cap is {cap_gb:g} GiB",
            field="vram_cap_gb", fix="lower vram_cap_gb or wait for the GPU to free up",
            free_gb=round(free_gb, 2))
    return free_gb


def missing_gpu_nodes(index: int, count: int = 1) -> list[str]:
    """The device nodes a job on GPUs `index`..`index + count - 1` needs that this host
    lacks. Without them the jail cannot give the job its GPUs (it would run on the CPU, or
    CUDA would fail inside), so the host refuses such a job before any debit."""
    present = _nvidia_nodes()
    return [n for n in _needed_gpu_nodes(index, count) if n not in present]


def sandbox_plan(job: SandboxJob, *, bwrap: str | None = None) -> dict:
    """What `gpu_launch(job)` would do, as plain data, without launching or probing.
    The uid shown is a placeholder when a fresh one is drawn per launch."""
    _validate(job, planned=True)
    device, _ = _resolve_device(job.device, job.devices)
    uid = None if os.geteuid() != 0 else (job.uid if job.uid is not None else _UID_BASE)
    plan = _policy(job, device, uid, fd=lambda name: f"<fd:{name}>",
                   memory=_memory_mechanism(job, device))
    plan["argv"] = [_bwrap_path(bwrap) if a == "<bwrap>" else a for a in plan["argv"]]
    plan["log_path"] = str(job.resolved_log_path())
    return plan


def gpu_launch(job: SandboxJob, *, bwrap: str | None = None) -> LaunchResult:
    """Run `job` in the jail, stream its output, enforce its caps, and say how it ended.

    Blocks until every process of the job is gone (bwrap's --die-with-parent is tied to the
    calling thread, which this keeps alive). Raises SandboxUnavailable (no usable bubblewrap),
    VramUnavailable (GPU short of the cap) or InvalidInput before anything runs; never runs
    the job outside the sandbox."""
    _validate(job)
    bwrap_path = _require_sandbox(bwrap)
    device, gpu_index = _resolve_device(job.device, job.devices)
    if gpu_index is not None:
        for index in range(gpu_index, gpu_index + job.devices):
            check_free_vram(index, job.vram_cap_gb)
    uid = _sandbox_uid(job)

    out = Path(job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    owner = out.stat()
    if uid is not None:
        os.chown(out, uid, uid)
    log_path = job.resolved_log_path()
    log_path.parent.mkdir(parents=True, exist_ok=True)

    data = dict(_synthetic_etc(uid))
    seccomp = _seccomp_program()
    if seccomp is not None:
        data["seccomp"] = seccomp
    memory = _memory_mechanism(job, device)
    on_line = job.on_line or _default_on_line
    cgroup = None
    if memory == "cgroup2":
        try:
            cgroup = _make_cgroup(job)
        except OSError as exc:  # delegated, yet refused: fall back, never run uncapped
            memory = "rlimit" if device == "cpu" else "watch"
            on_line(f"cannot make a cgroup for the memory cap ({exc.strerror}): using {memory}")
    supervisor = None
    child_fds: dict[str, int] = {}
    info_r, info_w = os.pipe()
    child_fds["info"] = info_w
    try:
        for name, payload in data.items():  # each payload is far below a pipe's buffer
            r, w = os.pipe()
            os.write(w, payload)
            os.close(w)
            child_fds[name] = r
        plan = _policy(job, device, uid, fd=lambda name: str(child_fds[name]), memory=memory,
                       cgroup=str(cgroup))
        argv = [bwrap_path if a == "<bwrap>" else a for a in plan["argv"]]
        with open(log_path, "wb") as log:
            started_at = datetime.now(UTC)
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, pass_fds=list(child_fds.values()),
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
            for fd_ in child_fds.values():
                os.close(fd_)
            child_fds.clear()
            supervisor = _Supervisor(proc, info_r, log, on_line, job, out,
                                     watch_memory=memory in ("rlimit", "watch"))
            try:
                timed_out = supervisor.run(deadline=t0 + job.wall_time_cap_s)
            finally:
                supervisor.kill_all()
                supervisor.close()
            wall = time.monotonic() - t0
            ended_at = datetime.now(UTC)
    finally:
        for fd_ in child_fds.values():
            os.close(fd_)
        os.close(info_r)
        if cgroup is not None:
            if _cgroup_oom_kills(cgroup) and supervisor is not None and not supervisor.stopped:
                detail = (f"over the memory cap of {job.max_memory_bytes} bytes "
                          "(cgroup memory.max): killed")
                supervisor.stopped = ("oom", detail)
            _remove_cgroup(cgroup)
        rejected = _hand_back(out, owner, chown=uid is not None, on_line=on_line, job=job)

    code = proc.returncode
    stopped = supervisor.stopped
    if stopped is None and rejected:
        stopped = ("output_quota", rejected)
    if timed_out and stopped is None:
        stopped = ("timeout", f"wall-time cap of {job.wall_time_cap_s:g}s reached")
    return LaunchResult(
        exit_code=code, reason=stopped[0] if stopped else _reason(code),
        started_at=started_at, ended_at=ended_at, wall_seconds=wall,
        device=device, log_path=log_path,
        detail=stopped[1] if stopped else None)

