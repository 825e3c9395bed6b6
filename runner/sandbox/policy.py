"""What the jail looks like, as data: the bwrap arguments for one job, and the checks that
refuse a job before anything is built.

`_policy` is pure (it touches nothing on the host); `sandbox_plan` shows its result and
`gpu_launch` runs it. It holds the namespaces, the read-only system and Python trees, a few
files of /etc plus a synthetic passwd/group/hosts, the private /tmp and /dev/shm, the job's
code, inputs and output, its GPUs' device nodes, the cleared environment, the job's uid
(setpriv) and its rlimits (prlimit). The seccomp filter it passes is built in `seccomp`; it
lets a multi-device job's process group use TCP over loopback, so `_policy` refuses to build
a jail that would allow inet sockets without its own network namespace.
`_validate` refuses bad module and input names, and any bind that would expose FORGE_HOME or
the registry DB (`_protected_paths`).
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from runner import settings
from runner.errors import InvalidInput, SandboxUnavailable
from runner.sandbox.seccomp import (
    _SECCOMP_RULES,
    _describe_rule,
    _seccomp_program,
    inet_allowed,
)

if TYPE_CHECKING:
    from runner.sandbox import SandboxJob

# Inside the jail.
JOB_ROOT = "/job"
CODE_DIR = "/job/code"
IN_DIR = "/job/in"
OUT_DIR = "/job/out"
HOME_DIR = "/tmp"
HOSTNAME = "forge-sandbox"
TMPFS = ("/tmp", "/dev/shm")  # private, size-capped; counted in the memory cap (memory.py)

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


def _tool(name: str) -> str | None:
    """A util-linux tool from the system dirs (which the jail mounts too)."""
    return shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")


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


def _resolve_device(device: str, count: int = 1) -> tuple[str, int | None]:
    """'cpu' -> ('cpu', None); 'cuda:N' -> ('cuda:N', N) if /dev/nvidiaN (and the `count` - 1
    GPUs after it, for a multi-device job) exist, else cpu."""
    if device == "cpu":
        return "cpu", None
    match = _CUDA_DEVICE.match(device)
    if not match:
        raise InvalidInput(f"device must be 'cpu' or 'cuda:N', got {device!r}", field="device")
    index = int(match.group(1) or 0)
    present = _nvidia_nodes()
    if any(f"/dev/nvidia{i}" not in present for i in range(index, index + count)):
        return "cpu", None
    return f"cuda:{index}", index


def _nvidia_nodes() -> set[str]:
    """The NVIDIA device nodes of this host."""
    return set(glob.glob("/dev/nvidia*"))


def _needed_gpu_nodes(index: int, count: int = 1) -> list[str]:
    """The nodes a job on GPUs `index`..`index + count - 1` needs: its own /dev/nvidiaN, the
    control node and the unified-memory node. Never the other GPUs' nodes (nor
    nvidia-uvm-tools, nvidia-modeset: profiling and display, which CUDA compute does not
    need)."""
    own = [f"/dev/nvidia{i}" for i in range(index, index + count)]
    return [*own, "/dev/nvidiactl", "/dev/nvidia-uvm"]


def _gpu_nodes(index: int, count: int = 1) -> list[str]:
    """Those of the needed nodes this host has (the ones the jail binds)."""
    present = _nvidia_nodes()
    return [n for n in _needed_gpu_nodes(index, count) if n in present]


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
        # The jail holds only its own GPUs' nodes, so CUDA enumerates them from device 0.
        "FORGE_DEVICE": "cpu" if device == "cpu" else "cuda:0",
        "CUDA_VISIBLE_DEVICES": "" if device == "cpu" else ",".join(map(str, range(job.devices))),
    })
    if uid is not None:
        env["USER"] = env["LOGNAME"] = "forge"
    return env


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
    for tmp in TMPFS:
        args += ["--perms", "1777", "--size", str(job.tmp_size_bytes), "--tmpfs", tmp]
    made.update({"/proc", "/dev", *TMPFS})
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
        gpu_nodes = _gpu_nodes(int(device.split(":")[1]), job.devices)
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
    if (seccomp is None or inet_allowed()) and "--unshare-net" not in args:
        # inet sockets (for a process group over loopback) are safe only in a network
        # namespace of the job's own, which holds nothing but lo
        raise SandboxUnavailable(
            "the job could open inet sockets, but its jail has no network namespace of its "
            "own (--unshare-net)", reason="network_not_isolated",
            fix="keep --unshare-net in the sandbox's namespace arguments")

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
        enter = [_tool("sh") or "/bin/sh", "-c", 'echo 0 > "$0" && exec "$@"',
                 f"{cgroup}/cgroup.procs"]
    return {
        "argv": [*enter, *prlimit, "<bwrap>", *args, "--", *command],
        "namespaces": ["net", "pid", "ipc", "uts", "cgroup", "mount"],
        "network": "loopback only (own network namespace holding just lo; seccomp: AF_UNIX, "
                   "AF_INET, AF_INET6 and NETLINK_ROUTE sockets only)"
                   if seccomp else "loopback only (own network namespace holding just lo)",
        "devices": job.devices,
        "binds": binds,
        "tmpfs": {tmp: job.tmp_size_bytes for tmp in TMPFS},
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


def _protected_paths() -> list[Path]:
    """Host paths no bind may contain: FORGE_HOME (registry DB, mlflow.db, artifact store)
    and a SQLite registry file wherever FORGE_DB_URL puts it."""
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
    if isinstance(job.devices, bool) or not isinstance(job.devices, int) or job.devices < 1:
        raise InvalidInput(f"devices must be an integer >= 1, got {job.devices!r}",
                           field="devices")
    if job.wall_time_cap_s <= 0 or job.grace_s < 0:
        raise InvalidInput("wall_time_cap_s must be > 0 and grace_s >= 0",
                           field="wall_time_cap_s")
