"""Jobs that tests/test_sandbox.py runs inside the sandbox: `python -m sandbox_job CMD ...`.

Each one tries something and writes what happened to /job/out; the test judges it.
Stdlib only (`train` imports torch inside the function)."""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

OUT = "/job/out"


def _write(name: str, data) -> None:
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


def _attempt(fn) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - what failed is the report
        return f"{type(exc).__name__}: {exc}"


def _connect(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=2):
        pass


def _write_file(path: str) -> None:
    with open(path, "a") as f:
        f.write("escaped\n")


def probe(hidden_json: str) -> None:
    """Network, filesystem, identity, environment and limits, seen from inside."""
    report: dict = {"connect": {}, "write": {}, "visible": {}}
    for host, port in [("127.0.0.1", 5432), ("1.1.1.1", 53), ("10.0.0.1", 80)]:
        report["connect"][f"{host}:{port}"] = _attempt(lambda h=host, p=port: _connect(h, p))
    report["dns"] = _attempt(lambda: socket.getaddrinfo("example.com", 80))
    with open("/proc/net/dev") as f:
        report["interfaces"] = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    report["unix_socketpair"] = _attempt(lambda: [s.close() for s in socket.socketpair()])
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.unshare(0x10000000)  # CLONE_NEWUSER
    report["unshare_userns"] = "ok" if rc == 0 else f"errno {ctypes.get_errno()}"

    for path in ["/job/code/escape.txt", "/job/code/sandbox_job.py", "/job/in/manifest.json",
                 "/job/in/data/escape.txt", "/usr/escape.txt", "/etc/escape.txt",
                 "/etc/passwd", "/escape.txt", "/root/escape.txt", "/work/escape.txt",
                 "/job/out/inside.txt", "/tmp/inside.txt"]:
        report["write"][path] = _attempt(lambda p=path: _write_file(p))
    for path in json.loads(hidden_json) + ["/job/in/manifest.json", "/job/in/data/x.csv"]:
        report["visible"][path] = os.path.exists(path)
    report["listdir"] = {d: sorted(os.listdir(d)) if os.path.isdir(d) else None
                         for d in ["/", "/root", "/work", "/work/main", "/home", "/etc", "/run"]}

    with open("/proc/self/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    report["status"] = {k: status[k].strip() for k in
                        ["Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
                         "CapAmb", "NoNewPrivs", "Seccomp"]}
    report["uid"], report["euid"] = os.getuid(), os.geteuid()
    report["hostname"] = socket.gethostname()
    report["pid"] = os.getpid()
    report["env"] = dict(os.environ)
    report["rlimits"] = {name: resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))
                         for name in ["NPROC", "FSIZE", "CORE"]}
    big = int(os.environ["PROBE_BIG_WRITE"])
    report["big_write"] = _attempt(lambda: Path("/job/out/big.bin").write_bytes(b"\0" * big))
    _write("report.json", report)
    print("probe done")


def forkbomb(limit: str) -> None:
    """Fork up to `limit` sleeping children (linear, never recursive) and count refusals,
    so it cannot hurt the host even if RLIMIT_NPROC were missing; the wall cap backs it."""
    forked, error = 0, None
    for _ in range(int(limit)):
        try:
            pid = os.fork()
        except OSError as exc:
            error = exc.errno
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        forked += 1
    _write("report.json", {"forked": forked, "errno": error})
    print(f"forked {forked}, then errno {error}")


def hang(marker: str) -> None:
    """Outlive the wall-time cap: spawn sleepers, note SIGTERM but keep going."""
    def on_term(signum, frame):
        with open(os.path.join(OUT, "sigterm.txt"), "w") as f:
            f.write("got SIGTERM\n")

    signal.signal(signal.SIGTERM, on_term)
    sleep = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    kids = [subprocess.Popen([sys.executable, "-c", sleep, marker]) for _ in range(3)]
    grandkid = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                f"'import time; time.sleep(600)', {marker!r}], start_new_session=True); "
                "time.sleep(600)")
    kids.append(subprocess.Popen([sys.executable, "-c", grandkid, marker]))
    _write("pids.json", [os.getpid()] + [k.pid for k in kids])  # pids inside the namespace
    time.sleep(0.5)
    print("spawned", flush=True)
    while True:
        time.sleep(1)


def lines(n: str, gap: str) -> None:
    for i in range(int(n)):
        print(f"line {i} {time.time():.3f}")  # no flush: PYTHONUNBUFFERED must do it
        time.sleep(float(gap))
    print("to stderr", file=sys.stderr)
    _write("env.json", dict(os.environ))


def exit_with(code: str) -> None:
    print(f"exiting with {code}")
    sys.exit(int(code))


def kill_self(signum: str) -> None:
    os.kill(os.getpid(), int(signum))


def links() -> None:
    """Leave things in /job/out that a host reader must not trust."""
    os.symlink("/root/.npmrc", os.path.join(OUT, "checkpoint.pt"))
    os.symlink("/etc", os.path.join(OUT, "etc"))
    os.mkfifo(os.path.join(OUT, "result.fifo"))
    os.makedirs(os.path.join(OUT, "sub"))
    with open(os.path.join(OUT, "sub", "setuid.bin"), "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(os.path.join(OUT, "sub", "setuid.bin"), 0o6755)
    _write("result.json", {"ok": True})


def train(steps: str) -> None:
    import torch

    with open("/job/in/manifest.json") as f:
        manifest = json.load(f)
    torch.manual_seed(manifest["seed"])
    x = torch.randn(256, 8)
    y = x @ torch.arange(8.0).unsqueeze(1) + 0.5
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(int(steps)):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.4f}")
    torch.save(model.state_dict(), os.path.join(OUT, "model.pt"))
    _write("result.json", {"final_loss": loss.item(), "steps": int(steps),
                           "device": os.environ["FORGE_DEVICE"]})


def plot() -> None:
    """A figure with text, as the trainer draws its confusion matrix (fonts via fontconfig)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_title("cell types")
    fig.savefig(os.path.join(OUT, "figure.png"))


def keyring() -> None:
    """Reach the kernel keyring: the session keyring's id, a new key, a lookup."""
    libc = ctypes.CDLL(None, use_errno=True)
    nr = {"x86_64": (250, 248, 249), "aarch64": (219, 217, 218)}[os.uname().machine]
    keyctl, add_key, request_key = nr
    KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING = 0, -3

    def call(*args) -> str:
        rc = libc.syscall(*args)
        return "ok" if rc >= 0 else f"errno {ctypes.get_errno()}"

    _write("report.json", {
        "keyctl": call(keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0),
        "add_key": call(add_key, b"user", b"forge-probe", b"x", 1, KEY_SPEC_SESSION_KEYRING),
        "request_key": call(request_key, b"user", b"forge-probe", None, 0),
    })


def memory(mib: str, procs: str, hold_s: str) -> None:
    """`procs` processes each touch `mib` MiB in 32 MiB steps, then hold it `hold_s` seconds;
    an allocation refused is reported in refused-<i>.json, as the trainer would see it."""
    def hog(i: int) -> None:
        held = []
        try:
            for _ in range(int(mib) // 32):
                held.append(bytearray(b"\1") * (32 * 1024**2))  # touched, not just reserved
        except MemoryError:
            _write(f"refused-{i}.json", {"held_mib": 32 * len(held)})
            return
        print(f"hog {i} holds {mib} MiB", flush=True)
        time.sleep(float(hold_s))

    kids = []
    for i in range(1, int(procs)):
        pid = os.fork()
        if pid == 0:
            hog(i)
            os._exit(0)
        kids.append(pid)
    hog(0)
    for pid in kids:
        os.waitpid(pid, 0)


def tmpfs(folder: str, tmpfs_mib: str, mib: str, hold_s: str) -> None:
    """Write `tmpfs_mib` MiB into the jail's tmpfs `folder` (/tmp or /dev/shm), then hold
    `mib` MiB of process memory too, for `hold_s` seconds."""
    with open(os.path.join(folder, "held.bin"), "wb") as f:
        f.writelines(b"\1" * (16 * 1024**2) for _ in range(int(tmpfs_mib) // 16))
    # said before the process memory: a cap the two exceed together may stop the job while
    # the bytearray is still being filled (under load, before any later line)
    print(f"{folder} holds {tmpfs_mib} MiB", flush=True)
    held = bytearray(b"\1") * (int(mib) * 1024**2)  # touched, not just reserved
    print(f"the process holds {len(held) >> 20} MiB too", flush=True)
    time.sleep(float(hold_s))
    _write("result.json", {"held": True})


def fill(mib: str, hold_s: str) -> None:
    """Write `mib` MiB to /job/out in 16 MiB files (RLIMIT_FSIZE caps each file, not the sum)."""
    for i in range(int(mib) // 16):
        with open(os.path.join(OUT, f"fill-{i}.bin"), "wb") as f:
            f.write(os.urandom(16 * 1024**2))
    print(f"wrote {mib} MiB", flush=True)
    time.sleep(float(hold_s))


def deep(levels: str, hold_s: str) -> None:
    """A directory chain `levels` deep, with a file at the bottom and a result.json on top."""
    fd = os.open(OUT, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(int(levels)):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    with open(os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "w") as f:
        f.write("deep\n")
    os.close(fd)
    _write("result.json", {"levels": int(levels)})
    print(f"made {levels} levels", flush=True)
    time.sleep(float(hold_s))


def escapes() -> None:
    """Terminal control sequences: colour, clear screen, window title (OSC), a C1 CSI, BEL."""
    sys.stdout.write("red \x1b[31mtext\x1b[0m\x1b[2J\x1b]0;owned\x07 csi \u009b6n\tend\n")
    sys.stdout.write("carriage\rreturn and \x00nul and \x7fdel\n")
    sys.stdout.flush()


if __name__ == "__main__":
    commands = {"probe": probe, "forkbomb": forkbomb, "hang": hang, "lines": lines,
                "exit": exit_with, "kill_self": kill_self, "links": links, "train": train,
                "plot": plot, "keyring": keyring, "memory": memory, "fill": fill, "deep": deep,
                "escapes": escapes, "tmpfs": tmpfs}
    commands[sys.argv[1]](*sys.argv[2:])
