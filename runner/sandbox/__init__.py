"""Run one training job inside a bubblewrap jail and supervise it to the end.

`gpu_launch(job)` is the only way training runs. The job gets:

- no network (own network namespace with only a loopback; a seccomp filter also refuses
  every socket family but AF_UNIX),
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
  PSS of the job's processes; either way a job over it is killed with reason `oom`,
- an output quota: about once a second the supervisor measures /job/out (iteratively, never
  following a link: bytes allocated, entries, depth) and kills the job with reason
  `output_quota` when it is over `max_output_bytes`, `max_output_entries` or
  `max_output_depth`,
- on a GPU host, only its own device node /dev/nvidiaN, plus /dev/nvidiactl and
  /dev/nvidia-uvm,
- a seccomp filter generated from a table (`_SECCOMP_RULES`): sockets other than AF_UNIX,
  io_uring, new user namespaces and the kernel keyring (keyctl, add_key, request_key) are
  refused; everything else is allowed (a denylist: an allowlist profile is not attempted).

Nothing else of the host is mounted: not /work (registry DB, outputs, tracking store),
not /root or /home, not /run, not host secrets in /etc. If bubblewrap is missing or not
permitted, `SandboxUnavailable` is raised; the job never runs unsandboxed.

Inside, the job finds its device in FORGE_DEVICE ("cpu", or "cuda:0": the one GPU it is
given is always index 0 there) and its VRAM cap in FORGE_VRAM_CAP_GB (the trainer applies it
with torch.cuda.set_per_process_memory_fraction); its output's host owner gets it back.

What the job leaves in /job/out is untrusted. After every process of the job is gone,
`_hand_back` walks it iteratively without following links and keeps only regular files and
directories (links, FIFOs, sockets and devices are removed, setuid bits cleared, everything
given back to the host owner); a tree over the caps is removed whole, unread, and the run's
reason becomes `output_quota`. Every line of the job's output is printed and logged with its
control characters escaped (`printable`). Not covered by the memory cap in RLIMIT_AS mode:
the private /tmp and /dev/shm tmpfs (up to `tmp_size_bytes` each).

Stdlib only at import time: the dry run calls `sandbox_plan()` without paying for torch.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import platform
import re
import secrets
import selectors
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from runner.errors import ForgeError, InvalidInput, SandboxUnavailable
from trainers.manifest import EXIT_OOM  # the trainer's exit code for out-of-memory

BWRAP_INSTALL = "apt-get install -y bubblewrap"
USERNS_SYSCTL = "sysctl -w kernel.unprivileged_userns_clone=1 user.max_user_namespaces=15000"
GIB = 1024**3

# Inside the jail.
JOB_ROOT = "/job"
CODE_DIR = "/job/code"
IN_DIR = "/job/in"
OUT_DIR = "/job/out"
HOME_DIR = "/tmp"
HOSTNAME = "forge-sandbox"

# Per-launch uids come from a range no host account uses, so two concurrent jobs never
# share RLIMIT_NPROC (which counts every task of a uid, threads included).
_UID_BASE = 1_900_000_000
_UID_SPAN = 1_000_000

# The few files of /etc a Python/torch process needs; no passwd/shadow/ssl/credentials.
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives",
              "fonts")  # fonts: fontconfig, for the figures the trainer draws
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
_INPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CUDA_DEVICE = re.compile(r"^cuda(?::(\d+))?$")

POLL_S = 1.0  # how often the supervisor measures /job/out and, without a cgroup, memory


class VramUnavailable(ForgeError):
    reason = "vram_unavailable"


def _default_on_line(line: str) -> None:
    print(f"[sandbox] {line}", file=sys.stderr, flush=True)


# C0 controls but tab, DEL and C1 controls (ESC, CSI, OSC...) -> visible \xNN escapes.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}


def printable(text: str) -> str:
    """`text` with control characters made visible, so that output from a job cannot move
    the cursor, retitle or clear the operator's terminal, or forge lines in the log."""
    return text.translate(_CONTROL_ESCAPES)


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
    env: dict[str, str] = field(default_factory=dict)  # allowlist; the reserved keys win
    log_path: str | Path | None = None  # default: <output_dir>.log next to output_dir
    on_line: Callable[[str], None] | None = None  # default: "[sandbox] line" to stderr
    grace_s: float = 10.0  # SIGTERM -> SIGKILL
    max_processes: int = 512  # RLIMIT_NPROC for the job's uid (counts threads too)
    max_file_size_bytes: int = 8 * GIB  # RLIMIT_FSIZE
    tmp_size_bytes: int = 4 * GIB  # size of the private /tmp and /dev/shm tmpfs each
    max_log_bytes: int = 256 * 1024**2  # the host log file stops growing past this
    max_memory_bytes: int | None = 16 * GIB  # cgroup memory.max, else RLIMIT_AS + watch
    max_output_bytes: int = 20 * GIB  # /job/out quota (allocated blocks)
    max_output_entries: int = 100_000  # files and directories in /job/out
    max_output_depth: int = 64  # directory levels below /job/out
    uid: int | None = None  # None: a fresh unprivileged uid per launch (host root only)

    def resolved_log_path(self) -> Path:
        if self.log_path is not None:
            return Path(self.log_path)
        out = Path(self.output_dir)
        return out.with_name(out.name + ".log")


@dataclass
class LaunchResult:
    """How a job ended. `device_seconds` is wall seconds x GPUs used; on cpu it equals
    wall seconds (one device: the host), so the ledger can settle either with one rule."""

    exit_code: int
    reason: str  # ok | timeout | killed | oom | output_quota | error
    started_at: datetime
    ended_at: datetime
    wall_seconds: float
    device_seconds: float
    device: str
    log_path: Path
    detail: str | None = None  # why the host stopped the job (timeout, oom, output_quota)

    def to_dict(self) -> dict:
        return {
            "exit_code": self.exit_code,
            "reason": self.reason,
            "started_at": self.started_at.isoformat(),
            "ended_at": self.ended_at.isoformat(),
            "wall_seconds": self.wall_seconds,
            "device_seconds": self.device_seconds,
            "device": self.device,
            "log_path": str(self.log_path),
            "detail": self.detail,
        }


# --------------------------------------------------------------------------- probe


_probed: set[str] = set()


def _bwrap_path(bwrap: str | None) -> str:
    return bwrap or os.environ.get("FORGE_BWRAP") or shutil.which("bwrap") or "/usr/bin/bwrap"


def _tool(name: str) -> str | None:
    """A util-linux tool from the system dirs (which the jail mounts too)."""
    return shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")


def _require_sandbox(bwrap: str | None) -> str:
    """Resolve bwrap and prove once (per path, per process) that it can build our jail."""
    path = _bwrap_path(bwrap)
    if path in _probed:
        return path
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise SandboxUnavailable(
            f"bubblewrap not found at {path}; training only runs inside the sandbox",
            fix=BWRAP_INSTALL, bwrap=path)
    for tool in ("setpriv", "prlimit"):
        if not _tool(tool):
            raise SandboxUnavailable(f"{tool} not found; the sandbox needs util-linux",
                                     fix="apt-get install -y util-linux")
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
                                 fix=BWRAP_INSTALL, bwrap=path) from exc
    finally:
        for fd in pass_fds:
            os.close(fd)
    if probe.returncode != 0:
        err = probe.stderr.strip()[-500:]
        fix = BWRAP_INSTALL
        if os.geteuid() != 0 or "namespace" in err.lower() or "permission" in err.lower():
            fix += f"; if user namespaces are disabled: {USERNS_SYSCTL}"
        raise SandboxUnavailable(f"bubblewrap at {path} cannot create the sandbox: {err}",
                                 fix=fix, bwrap=path)
    _probed.add(path)
    return path


# --------------------------------------------------------------------------- policy


_NAMESPACE_ARGS = (
    # Not --unshare-all: as root it adds a user namespace, and setpriv then fails (EINVAL).
    "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
    "--die-with-parent", "--new-session",
)


def _system_args() -> list[str]:
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _resolve_device(device: str) -> tuple[str, int | None]:
    """'cpu' -> ('cpu', None); 'cuda:N' -> ('cuda:N', N) if /dev/nvidiaN exists, else cpu."""
    if device == "cpu":
        return "cpu", None
    match = _CUDA_DEVICE.match(device)
    if not match:
        raise InvalidInput(f"device must be 'cpu' or 'cuda:N', got {device!r}", field="device")
    index = int(match.group(1) or 0)
    if f"/dev/nvidia{index}" not in _nvidia_nodes():
        return "cpu", None
    return f"cuda:{index}", index


def _nvidia_nodes() -> set[str]:
    """The NVIDIA device nodes of this host."""
    return set(glob.glob("/dev/nvidia*"))


def _gpu_nodes(index: int) -> list[str]:
    """The nodes a job on GPU `index` needs: its own /dev/nvidiaN, the control node and the
    unified-memory node. Never the other GPUs' nodes (nor nvidia-uvm-tools, nvidia-modeset:
    profiling and display, which CUDA compute does not need)."""
    present = _nvidia_nodes()
    return [n for n in (f"/dev/nvidia{index}", "/dev/nvidiactl", "/dev/nvidia-uvm")
            if n in present]


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


def _python_paths() -> list[str]:
    """The interpreter's trees (venv and base install), by the paths the venv refers to."""
    paths: list[str] = []
    for p in (sys.prefix, sys.base_prefix):
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if q not in paths:
                paths.append(q)
    return paths


def _mkdirs(path: str, made: set[str]) -> list[str]:
    """--dir for each missing ancestor of `path`, mode 0755 (bwrap's default is 0700)."""
    args: list[str] = []
    parts = Path(path).parts[1:-1]
    for i in range(len(parts)):
        d = "/" + "/".join(parts[: i + 1])
        if d not in made:
            made.add(d)
            args += ["--perms", "0755", "--dir", d]
    return args


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _sandbox_uid(job: SandboxJob) -> int | None:
    if os.geteuid() != 0:
        return None  # bwrap runs in a user namespace and already drops every capability
    if job.uid is not None:
        if job.uid == 0:
            raise InvalidInput("the sandbox never runs a job as root", field="uid")
        return job.uid
    return _UID_BASE + secrets.randbelow(_UID_SPAN)


def _job_env(job: SandboxJob, device: str, uid: int | None) -> dict[str, str]:
    env = {str(k): str(v) for k, v in job.env.items()}
    env.update({
        "PYTHONPATH": CODE_DIR,
        "HOME": HOME_DIR,
        "TMPDIR": "/tmp",
        "PATH": f"{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "FORGE_VRAM_CAP_GB": f"{job.vram_cap_gb:g}",
        # The jail holds one GPU's node at most, so CUDA enumerates that one as device 0.
        "FORGE_DEVICE": "cpu" if device == "cpu" else "cuda:0",
        "CUDA_VISIBLE_DEVICES": "" if device == "cpu" else "0",
    })
    if uid is not None:
        env["USER"] = env["LOGNAME"] = "forge"
    return env


# The seccomp filter as a table: syscall -> what happens to it; anything not named is
# allowed. An action is "allow" or an errno; a tuple tests the call's first argument (low 32
# bits): (test, operand, action when it holds, action when not), test "==" or "&" (any bit).
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
AF_UNIX, CLONE_NEWUSER = 1, 0x10000000
_SECCOMP_RULES: dict[str, str | int | tuple] = {
    "socket": ("==", AF_UNIX, "allow", EAFNOSUPPORT),  # no network; multiprocessing needs AF_UNIX
    "io_uring_setup": EPERM,  # io_uring can open sockets past this filter
    "unshare": EPERM,  # no new namespaces: a user namespace would regain capabilities
    "clone": ("&", CLONE_NEWUSER, EPERM, "allow"),
    "clone3": ENOSYS,  # its flags are in memory BPF cannot read; libc falls back to clone
    "keyctl": EPERM,  # the kernel keyring is not namespaced: no host session keys
    "add_key": EPERM,
    "request_key": EPERM,
}
# Per architecture: the AUDIT_ARCH value and the syscall numbers of the table's names.
_SYSCALLS = {
    "x86_64": (0xC000003E, {"socket": 41, "clone": 56, "unshare": 272, "add_key": 248,
                            "request_key": 249, "keyctl": 250, "io_uring_setup": 425,
                            "clone3": 435}),
    "aarch64": (0xC00000B7, {"socket": 198, "clone": 220, "unshare": 97, "add_key": 217,
                             "request_key": 218, "keyctl": 219, "io_uring_setup": 425,
                             "clone3": 435}),
}


def _seccomp_program(arch: str | None = None) -> bytes | None:
    """Classic BPF for bwrap --seccomp, compiled from `_SECCOMP_RULES`: each rule is one
    block `if nr == N: <block>` whose jump over it is the block's length, so no offset is
    counted by hand. None on an architecture without numbers here."""
    arch = arch or platform.machine()
    if arch not in _SYSCALLS:
        return None
    audit, numbers = _SYSCALLS[arch]
    LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0: low 32 bits)

    def ret(action) -> tuple:
        return (RET, 0, 0, ALLOW if action == "allow" else ERRNO | action)

    prog = [
        (LD_ABS, 0, 0, ARCH),
        (JEQ, 1, 0, audit),
        (RET, 0, 0, KILL),  # a foreign syscall ABI (e.g. int 0x80)
        (LD_ABS, 0, 0, NR),
    ]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | ENOSYS)]  # the x32 ABI
    for name, rule in _SECCOMP_RULES.items():
        if isinstance(rule, tuple):
            test, operand, yes, no = rule
            block = [(LD_ABS, 0, 0, ARG0), (JEQ if test == "==" else JSET, 0, 1, operand),
                     ret(yes), ret(no)]  # both paths return: A (now arg0) is not reused
        else:
            block = [ret(rule)]
        prog += [(JEQ, 0, len(block), numbers[name]), *block]
    prog.append((RET, 0, 0, ALLOW))
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def _synthetic_etc(uid: int | None) -> dict[str, bytes]:
    """passwd/group/hosts that name only the jail's own users, not the host's."""
    passwd = "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n"
    group = "root:x:0:\n"
    if uid is not None:
        passwd += f"forge:x:{uid}:{uid}:forge job:{HOME_DIR}:/usr/sbin/nologin\n"
        group += f"forge:x:{uid}:\n"
    hosts = f"127.0.0.1 localhost {HOSTNAME}\n::1 localhost\n"
    return {"/etc/passwd": passwd.encode(), "/etc/group": group.encode(),
            "/etc/hosts": hosts.encode(), "/etc/hostname": f"{HOSTNAME}\n".encode()}


def _policy(job: SandboxJob, device: str, uid: int | None, fd: Callable[[str], str],
            memory: str = "none", cgroup: str = "<cgroup>") -> dict:
    """The whole policy: bwrap argv (with `fd(name)` standing for passed descriptors, and
    `cgroup` for the job's cgroup directory when `memory` is "cgroup2"), plus a
    description of it. Pure: touches nothing on the host."""
    args: list[str] = [*_NAMESPACE_ARGS, "--hostname", HOSTNAME]
    binds: list[dict] = []
    made: set[str] = set()

    def bind(kind: str, host: str, inside: str, mode: str) -> None:
        nonlocal args
        args += _mkdirs(inside, made) + [kind, host, inside]
        binds.append({"host": host, "sandbox": inside, "mode": mode})

    args += _system_args()
    bound = [p for p in _SYSTEM_DIRS if os.path.isdir(p) and not os.path.islink(p)]
    binds += [{"host": p, "sandbox": p, "mode": "ro"} for p in bound]
    for name in _ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            bind("--ro-bind", f"/etc/{name}", f"/etc/{name}", "ro")
    for path in _synthetic_etc(uid):
        args += _mkdirs(path, made) + ["--perms", "0644", "--ro-bind-data", fd(path), path]
        binds.append({"host": "(generated)", "sandbox": path, "mode": "ro"})

    args += ["--proc", "/proc", "--dev", "/dev"]
    for tmp in ("/tmp", "/dev/shm"):
        args += ["--perms", "1777", "--size", str(job.tmp_size_bytes), "--tmpfs", tmp]
    made.update({"/proc", "/dev", "/tmp", "/dev/shm"})
    if device != "cpu":
        bind("--ro-bind", "/sys", "/sys", "ro")  # NVML and the CUDA runtime read it
    elif os.path.isdir("/sys/devices/system/cpu"):  # cpu topology for torch/OpenMP
        bind("--ro-bind", "/sys/devices/system/cpu", "/sys/devices/system/cpu", "ro")

    for path in _python_paths():  # after the /tmp tmpfs, so a venv under /tmp stays visible
        if not _under(path, bound):
            bind("--ro-bind", path, path, "ro")

    args += ["--perms", "0755", "--dir", JOB_ROOT, "--perms", "0755", "--dir", IN_DIR]
    made.update({JOB_ROOT, IN_DIR})
    bind("--ro-bind", str(Path(job.code_dir).resolve()), CODE_DIR, "ro")
    for name, host in sorted(job.inputs.items()):
        bind("--ro-bind", str(Path(host).resolve()), f"{IN_DIR}/{name}", "ro")
    bind("--bind", str(Path(job.output_dir).resolve()), OUT_DIR, "rw")

    gpu_nodes: list[str] = []
    if device != "cpu":
        gpu_nodes = _gpu_nodes(int(device.split(":")[1]))
        for node in gpu_nodes:
            bind("--dev-bind", node, node, "dev")

    env = _job_env(job, device, uid)
    args += ["--chdir", OUT_DIR, "--clearenv"]
    for key, value in sorted(env.items()):
        args += ["--setenv", key, value]
    seccomp = _seccomp_program()
    if seccomp is not None:
        args += ["--seccomp", fd("seccomp")]
    args += ["--info-fd", fd("info")]

    command = [sys.executable, "-m", job.module, *map(str, job.args)]
    if uid is not None:
        setpriv = _tool("setpriv") or "/usr/bin/setpriv"
        command = [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                   "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *command]
    limits = {"nproc": job.max_processes, "fsize": job.max_file_size_bytes, "core": 0}
    if memory == "rlimit":
        limits["as"] = job.max_memory_bytes
    prlimit = [_tool("prlimit") or "/usr/bin/prlimit", *(f"--{k}={v}" for k, v in limits.items()),
               "--"]
    enter: list[str] = []  # the shell moves itself into the job's cgroup, then execs the rest
    if memory == "cgroup2":
        enter = [_tool("sh") or "/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"', f"{cgroup}/cgroup.procs"]
    return {
        "argv": [*enter, *prlimit, "<bwrap>", *args, "--", *command],
        "namespaces": ["net", "pid", "ipc", "uts", "cgroup", "mount"],
        "network": "none (own network namespace, loopback only; seccomp: AF_UNIX sockets only)"
                   if seccomp else "none (own network namespace, loopback only)",
        "binds": binds,
        "tmpfs": {"/tmp": job.tmp_size_bytes, "/dev/shm": job.tmp_size_bytes},
        "command": command,
        "uid": uid if uid is not None else os.geteuid(),
        "capabilities": "none (bounding set cleared, no_new_privs)",
        "seccomp": seccomp is not None,
        "seccomp_rules": {name: _describe_rule(rule) for name, rule in _SECCOMP_RULES.items()}
                         if seccomp is not None else {},
        "device": device,
        "gpu_nodes": gpu_nodes,
        "env_keys": sorted(env),
        "caps": {
            "wall_time_s": job.wall_time_cap_s,
            "grace_s": job.grace_s,
            "vram_gb": job.vram_cap_gb,
            "max_processes": job.max_processes,
            "max_file_size_bytes": job.max_file_size_bytes,
            "core_dump_bytes": 0,
            "memory": {"bytes": job.max_memory_bytes, "mechanism": memory},
            "output": {"bytes": job.max_output_bytes, "entries": job.max_output_entries,
                       "depth": job.max_output_depth},
        },
    }


def _describe_rule(rule) -> str:
    def action(a) -> str:
        return "allow" if a == "allow" else f"errno {a}"
    if isinstance(rule, tuple):
        test, operand, yes, no = rule
        return f"arg0 {test} {operand:#x}: {action(yes)}, else {action(no)}"
    return action(rule)


# --------------------------------------------------------------------------- memory


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


def sandbox_plan(job: SandboxJob, *, bwrap: str | None = None) -> dict:
    """What `gpu_launch(job)` would do, as plain data, without launching or probing.
    The uid shown is a placeholder when a fresh one is drawn per launch."""
    _validate(job, planned=True)
    device, _ = _resolve_device(job.device)
    uid = None if os.geteuid() != 0 else (job.uid if job.uid is not None else _UID_BASE)
    plan = _policy(job, device, uid, fd=lambda name: f"<fd:{name}>",
                   memory=_memory_mechanism(job, device))
    plan["argv"] = [_bwrap_path(bwrap) if a == "<bwrap>" else a for a in plan["argv"]]
    plan["log_path"] = str(job.resolved_log_path())
    return plan


def _protected_paths() -> list[Path]:
    """Host paths no bind may contain: FORGE_HOME (registry DB, mlflow.db, artifact store)
    and a SQLite registry file wherever FORGE_DB_URL puts it."""
    from runner import settings  # stdlib only

    paths = [settings.forge_home()]
    url = settings.db_url()
    if url.startswith("sqlite") and ":///" in url:
        paths.append(Path(url.split(":///", 1)[1]).resolve())
    return paths


def _validate(job: SandboxJob, planned: bool = False) -> None:
    """`planned`: a dry run's job, whose code snapshot and inputs are not made yet."""
    if not job.module or not all(p.isidentifier() for p in job.module.split(".")):
        raise InvalidInput(f"not a python module name: {job.module!r}", field="module")
    if not planned and not Path(job.code_dir).is_dir():
        raise InvalidInput(f"code_dir {job.code_dir} is not a directory", field="code_dir")
    for name, host in job.inputs.items():
        if not _INPUT_NAME.match(name):
            raise InvalidInput(f"input name {name!r} must match {_INPUT_NAME.pattern}",
                               field="inputs")
        if not planned and not Path(host).exists():
            raise InvalidInput(f"input {name!r}: {host} does not exist", field="inputs")
    protected = _protected_paths()
    binds = [("code_dir", job.code_dir), ("output_dir", job.output_dir),
             *(("inputs", host) for host in job.inputs.values())]
    for name, host in binds:
        p = Path(host).resolve()
        for keep in protected:
            if keep == p or keep.is_relative_to(p):
                raise InvalidInput(
                    f"{name} {p} would expose {keep} (registry DB, tracking store) to the job",
                    field=name, fix="bind a snapshot of the code and only the job's own files")
    if job.wall_time_cap_s <= 0 or job.grace_s < 0:
        raise InvalidInput("wall_time_cap_s must be > 0 and grace_s >= 0",
                           field="wall_time_cap_s")


# --------------------------------------------------------------------------- launch


def gpu_launch(job: SandboxJob, *, bwrap: str | None = None) -> LaunchResult:
    """Run `job` in the jail, stream its output, enforce its caps, and say how it ended.

    Blocks until every process of the job is gone (bwrap's --die-with-parent is tied to the
    calling thread, which this keeps alive). Raises SandboxUnavailable (no usable bubblewrap),
    VramUnavailable (GPU short of the cap) or InvalidInput before anything runs; never runs
    the job outside the sandbox."""
    _validate(job)
    bwrap_path = _require_sandbox(bwrap)
    device, gpu_index = _resolve_device(job.device)
    if gpu_index is not None:
        check_free_vram(gpu_index, job.vram_cap_gb)
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
    n_gpus = 0 if device == "cpu" else 1
    stopped = supervisor.stopped
    if stopped is None and rejected:
        stopped = ("output_quota", rejected)
    if timed_out and stopped is None:
        stopped = ("timeout", f"wall-time cap of {job.wall_time_cap_s:g}s reached")
    return LaunchResult(
        exit_code=code, reason=stopped[0] if stopped else _reason(code),
        started_at=started_at, ended_at=ended_at, wall_seconds=wall,
        device_seconds=wall * max(n_gpus, 1), device=device, log_path=log_path,
        detail=stopped[1] if stopped else None)


def _reason(code: int) -> str:
    if code == 0:
        return "ok"
    # bwrap reports a job killed by signal N as 128+N; 137 = SIGKILL, the OOM killer's.
    if code in (EXIT_OOM, 128 + signal.SIGKILL, -signal.SIGKILL):
        return "oom"
    if code < 0 or code > 128:
        return "killed"
    return "error"


# --------------------------------------------------------------------------- output


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
            used = _namespace_memory(self._members())
            if used > self.job.max_memory_bytes:
                self._stop("oom", f"the job's processes use {used} bytes together, over its "
                                  f"memory cap of {self.job.max_memory_bytes}: killed")

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
