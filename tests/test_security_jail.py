"""The trust boundary, jail side: each test is one attack by a job, on real bubblewrap.

A job is untrusted: its code and everything it writes (result.json, the checkpoint, the
metrics stream, its output lines, the shape of /job/out). Jail-level attacks run the
sandbox directly (tests/sandbox_jobs/sandbox_job.py); attacks on what the host reads back go
through `train_model_version` with a stand-in trainer (tests/conftest.py fake_code_repo), a
real registry and a real MLflow store, and must end as a typed error with the allocation
settled, or as a clean registration. A host that hangs fails the test (`host_deadline`).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import AGENT, BASE_ID, DATASET_ID, STAND_IN_TRAINER, fake_code_repo
from test_sandbox import make_job as sandbox_make_job

from runner import sandbox
from runner.errors import ForgeError, InvalidInput, SandboxUnavailable, TrainingFailed
from runner.registry import catalog, db, recovery, schema
from runner.sandbox import SandboxJob, gpu_launch, memory, policy, sandbox_plan, seccomp

JOBS = Path(__file__).parent / "sandbox_jobs"
MIB = 1024**2


@contextmanager
def host_deadline(seconds: float):
    """Fail, rather than hang, if the host blocks: SIGALRM raises in the main thread, and
    keeps firing every 5 s in case something swallows it."""
    def expired(*_):
        raise TimeoutError(f"the host did not return within {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds, 5)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def make_job(tmp_path: Path, *args: str, **kw) -> SandboxJob:
    """test_sandbox's probe job, with a longer cap: these jobs fill disks and memory."""
    kw.setdefault("wall_time_cap_s", 60)
    return sandbox_make_job(tmp_path, *args, **kw)


# --------------------------------------------------------------------------- in the jail


@pytest.mark.sandbox
def test_kernel_keyring_is_denied(tmp_path):
    result = gpu_launch(make_job(tmp_path, "keyring"))
    assert result.reason == "ok", (tmp_path / "job.log").read_text()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == {"keyctl": "errno 1", "add_key": "errno 1", "request_key": "errno 1"}


@pytest.mark.sandbox
def test_output_over_quota_kills_the_job(tmp_path):
    lines: list[str] = []
    with host_deadline(60):
        result = gpu_launch(make_job(tmp_path, "fill", "160", "30", lines=lines,
                                     max_output_bytes=64 * MIB))
    assert result.reason == "output_quota" and "quota" in result.detail
    assert result.wall_seconds < 20  # killed at the next measurement, not at the wall cap
    assert list((tmp_path / "out").iterdir()) == []  # removed, unread
    assert any("over its quota" in line for line in lines)


@pytest.mark.sandbox
def test_too_many_entries_in_out_is_over_quota(tmp_path):
    result = gpu_launch(make_job(tmp_path, "forkbomb", "0", max_output_entries=2))
    # forkbomb 0 writes only report.json: within 2 entries, so the run is fine ...
    assert result.reason == "ok"
    (tmp_path / "out2").mkdir()
    result = gpu_launch(SandboxJob(module="sandbox_job", args=["links"], code_dir=JOBS,
                                   output_dir=tmp_path / "out2", log_path=tmp_path / "j2.log",
                                   on_line=lambda line: None, max_output_entries=2))
    # ... links leaves 6 entries: over the cap, so nothing of it is read or kept
    assert result.reason == "output_quota"
    assert list((tmp_path / "out2").iterdir()) == []


@pytest.mark.parametrize("hold_s", ["0", "3"])  # exits at once (hand-back) / lingers (watch)
@pytest.mark.sandbox
def test_deep_tree_in_out_is_removed_unread(tmp_path, hold_s):
    lines: list[str] = []
    with host_deadline(60):
        result = gpu_launch(make_job(tmp_path, "deep", "1200", hold_s, lines=lines))
    assert result.reason == "output_quota", (tmp_path / "job.log").read_text()
    assert "deeper than 64 levels" in result.detail
    assert list((tmp_path / "out").iterdir()) == []
    assert any("removed unread" in line for line in lines)


@pytest.mark.sandbox
def test_hand_back_keeps_a_tree_within_the_caps(tmp_path):
    """The walk that rejects deep trees keeps a normal one whole (64 levels is allowed)."""
    result = gpu_launch(make_job(tmp_path, "deep", "63", "0"))
    assert result.reason == "ok" and result.detail is None
    bottom = tmp_path / "out" / Path(*["d"] * 63) / "bottom.txt"
    assert bottom.read_text() == "deep\n" and bottom.stat().st_uid == os.getuid()


def _memory_report(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "out").glob("refused-*"))]


@pytest.mark.sandbox
def test_memory_over_cap_across_processes_is_oom(tmp_path):
    """Three processes of 320 MiB each: every one is under a 512 MiB cap, together they
    are not. Killed from outside (cgroup memory.max, or the supervisor's watch)."""
    lines: list[str] = []
    with host_deadline(60):
        result = gpu_launch(make_job(tmp_path, "memory", "320", "3", "30", lines=lines,
                                     max_memory_bytes=512 * MIB))
    assert result.reason == "oom", (tmp_path / "job.log").read_text()
    assert result.wall_seconds < 20
    assert "memory cap" in result.detail


@pytest.mark.sandbox
def test_memory_over_cap_in_one_process_is_refused_or_oom(tmp_path):
    plan = sandbox_plan(make_job(tmp_path, "memory", "1024", "1", "0",
                                 max_memory_bytes=512 * MIB))
    assert plan["caps"]["memory"]["bytes"] == 512 * MIB
    with host_deadline(60):
        result = gpu_launch(make_job(tmp_path, "memory", "1024", "1", "0",
                                     max_memory_bytes=512 * MIB))
    if plan["caps"]["memory"]["mechanism"] == "cgroup2":
        assert result.reason == "oom"
    else:  # RLIMIT_AS: the allocation fails inside, as the trainer's MemoryError -> exit 4
        assert plan["caps"]["memory"]["mechanism"] == "rlimit"
        assert f"--as={512 * MIB}" in plan["argv"]
        assert [r["held_mib"] for r in _memory_report(tmp_path)] == [pytest.approx(448, abs=64)]


@pytest.mark.slow
@pytest.mark.sandbox
def test_torch_trains_under_the_default_memory_cap(tmp_path):
    (tmp_path / "manifest.json").write_text('{"seed": 0}')
    job = make_job(tmp_path, "train", "5", inputs={"manifest.json": tmp_path / "manifest.json"})
    assert job.max_memory_bytes == 16 * 1024**3
    assert sandbox_plan(job)["caps"]["memory"]["mechanism"] in ("cgroup2", "rlimit")
    result = gpu_launch(job)
    assert result.reason == "ok", (tmp_path / "job.log").read_text()


@pytest.mark.sandbox
def test_escape_sequences_are_escaped_in_lines_and_log(tmp_path):
    lines: list[str] = []
    result = gpu_launch(make_job(tmp_path, "escapes", lines=lines))
    assert result.reason == "ok"
    log = (tmp_path / "job.log").read_text()
    for text in ("\n".join(lines), log):
        assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
        assert "\x00" not in text and "\x7f" not in text and "\r" not in text
        assert r"red \x1b[31mtext\x1b[0m\x1b[2J\x1b]0;owned\x07 csi \x9b6n" + "\tend" in text
        assert r"carriage\x0dreturn and \x00nul and \x7fdel" in text


NET_PROBE = r'''
import errno, json, socket, sys

def attempt(fn):
    try:
        return "ok: " + str(fn())
    except OSError as exc:
        return errno.errorcode.get(exc.errno, f"{type(exc).__name__}: {exc}")

def lines(path):
    with open(path) as f:
        return f.read().splitlines()

def tcp_connect(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect((host, port))
    return "connected"

def udp_send(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return s.sendto(b"x", (host, port))

def loopback_pair(family, host):
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((host, 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()[:2], timeout=3) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                return peer.recv(4).decode()

def open_socket(family, kind, proto):
    socket.socket(family, kind, proto).close()
    return "opened"

targets = json.loads(sys.argv[1])
report = {
    "interfaces": sorted(l.split(":")[0].strip() for l in lines("/proc/net/dev")[2:]),
    "routes": [l.split() for l in lines("/proc/net/route")[1:] if l.strip()],
    "ipv6_routes": [l.split() for l in lines("/proc/net/ipv6_route") if l.strip()],
    "if_nameindex": attempt(socket.if_nameindex),
    "connect": {f"{h}:{p}": attempt(lambda h=h, p=p: tcp_connect(h, p)) for h, p in targets},
    "udp": {f"{h}:{p}": attempt(lambda h=h, p=p: udp_send(h, p)) for h, p in targets
            if ":" not in h},
    "loopback_tcp": attempt(lambda: loopback_pair(socket.AF_INET, "127.0.0.1")),
    "loopback_tcp6": attempt(lambda: loopback_pair(socket.AF_INET6, "::1")),
    "raw_icmp": attempt(lambda: open_socket(socket.AF_INET, socket.SOCK_RAW, 1)),
    "packet": attempt(lambda: open_socket(socket.AF_PACKET, socket.SOCK_RAW, 0)),
    "netlink": {str(p): attempt(lambda p=p: open_socket(socket.AF_NETLINK, socket.SOCK_RAW, p))
                for p in (0, 4, 9, 12, 15, 16)},  # route, sock_diag, audit, netfilter,
}                                                 # kobject_uevent, generic
json.dump(report, open("/job/out/net.json", "w"), indent=1)
'''


def _host_address() -> str | None:
    """This host's own address on its default route (eth0's), if it has one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: picks the route, sends nothing
            return s.getsockname()[0]
        except OSError:
            return None


@pytest.mark.sandbox
def test_the_jail_network_is_loopback_only(tmp_path):
    """Inet sockets are allowed (a multi-device job's process group talks TCP over loopback),
    so the barrier is the job's own network namespace: its only interface is lo, no route
    leads anywhere else, a TCP connect to any non-loopback address (the host's own included,
    where a real server listens) fails with ENETUNREACH, while a loopback listen/connect pair
    works. Packet sockets and every netlink protocol but NETLINK_ROUTE (what getifaddrs uses)
    are still refused by the seccomp filter (EAFNOSUPPORT)."""
    import socket
    import socketserver
    import threading

    class Greeter(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"hello\n")

    server = socketserver.TCPServer(("0.0.0.0", 0), Greeter)  # every host address
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,))
    thread.start()
    host = _host_address()
    targets = [("10.0.0.1", 80), ("192.0.2.1", 80), ("2001:db8::1", 80)]
    if host is not None:
        targets.append((host, port))
    code = tmp_path / "code"
    code.mkdir()
    (code / "net_probe.py").write_text(NET_PROBE)
    try:
        if host is not None:  # the control: the server answers the host on that address
            with socket.create_connection((host, port), timeout=3) as s:
                assert s.recv(16) == b"hello\n"
        job = SandboxJob(module="net_probe", args=[json.dumps(targets)], code_dir=code,
                         output_dir=tmp_path / "out", log_path=tmp_path / "job.log",
                         on_line=lambda line: None, wall_time_cap_s=60)
        with host_deadline(90):
            result = gpu_launch(job)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert result.reason == "ok", (tmp_path / "job.log").read_text()
    report = json.loads((tmp_path / "out" / "net.json").read_text())

    assert report["interfaces"] == ["lo"] and report["if_nameindex"] == "ok: [(1, 'lo')]"
    assert report["routes"] == []  # IPv4: not even a route via lo in the main table
    RTF_REJECT = 0x0200
    for _dest, prefix, *_, flags, iface in report["ipv6_routes"]:
        assert iface == "lo", report["ipv6_routes"]
        if int(prefix, 16) == 0:  # a default route exists only as the kernel's unreachable
            assert int(flags, 16) & RTF_REJECT, report["ipv6_routes"]
    for target, outcome in report["connect"].items():
        assert outcome == "ENETUNREACH", (target, outcome)
    for target, outcome in report["udp"].items():
        assert outcome == "ENETUNREACH", (target, outcome)
    assert report["loopback_tcp"] == "ok: ping"  # refused (EAFNOSUPPORT) before multi-device
    assert report["loopback_tcp6"] in ("ok: ping", "EADDRNOTAVAIL")  # ::1 where IPv6 is on
    assert report["raw_icmp"] == "EPERM"  # inet, but raw needs CAP_NET_RAW, which it lacks
    assert report["packet"] == "EAFNOSUPPORT"
    assert report["netlink"] == {"0": "ok: opened", "4": "EAFNOSUPPORT", "9": "EAFNOSUPPORT",
                                 "12": "EAFNOSUPPORT", "15": "EAFNOSUPPORT",
                                 "16": "EAFNOSUPPORT"}


# --------------------------------------------------------------------------- policy


FAKE_NODES = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia3", "/dev/nvidiactl",
              "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset",
              "/dev/nvidia-caps"]


def test_only_the_assigned_gpu_node_is_bound(tmp_path, monkeypatch):
    real_glob = policy.glob.glob
    monkeypatch.setattr(policy.glob, "glob", lambda pattern, *a, **k: list(FAKE_NODES)
                        if pattern == "/dev/nvidia*" else real_glob(pattern, *a, **k))
    plan = sandbox_plan(make_job(tmp_path, "exit", "0", device="cuda:2"))
    assert plan["device"] == "cuda:2"
    assert plan["gpu_nodes"] == ["/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    dev_binds = [plan["argv"][i + 1] for i, a in enumerate(plan["argv"]) if a == "--dev-bind"]
    assert dev_binds == plan["gpu_nodes"]
    for other in set(FAKE_NODES) - set(plan["gpu_nodes"]):
        assert other not in plan["argv"]
    env = {plan["argv"][i + 1]: plan["argv"][i + 2]
           for i, a in enumerate(plan["argv"]) if a == "--setenv"}
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["FORGE_DEVICE"] == "cuda:0"
    # a GPU the host does not have: cpu, no node at all
    plan = sandbox_plan(make_job(tmp_path, "exit", "0", device="cuda:7"))
    assert plan["device"] == "cpu" and plan["gpu_nodes"] == []


def test_a_multi_device_job_gets_its_own_gpus_only(tmp_path, monkeypatch):
    """devices=2 on cuda:1: GPUs 1 and 2, seen inside as 0 and 1 (NCCL's path is gloo's:
    the same jail, loopback only); asking past the host's last GPU runs on none of them."""
    real_glob = policy.glob.glob
    monkeypatch.setattr(policy.glob, "glob", lambda pattern, *a, **k: list(FAKE_NODES)
                        if pattern == "/dev/nvidia*" else real_glob(pattern, *a, **k))
    plan = sandbox_plan(make_job(tmp_path, "exit", "0", device="cuda:1", devices=2))
    assert plan["device"] == "cuda:1" and plan["devices"] == 2
    assert plan["gpu_nodes"] == ["/dev/nvidia1", "/dev/nvidia2", "/dev/nvidiactl",
                                 "/dev/nvidia-uvm"]
    dev_binds = [plan["argv"][i + 1] for i, a in enumerate(plan["argv"]) if a == "--dev-bind"]
    assert dev_binds == plan["gpu_nodes"]
    assert "/dev/nvidia0" not in plan["argv"] and "/dev/nvidia3" not in plan["argv"]
    env = {plan["argv"][i + 1]: plan["argv"][i + 2]
           for i, a in enumerate(plan["argv"]) if a == "--setenv"}
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["FORGE_DEVICE"] == "cuda:0"
    plan = sandbox_plan(make_job(tmp_path, "exit", "0", device="cuda:2", devices=3))
    assert plan["device"] == "cpu" and plan["gpu_nodes"] == []  # the host has nvidia0..3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidInput):
            sandbox_plan(make_job(tmp_path, "exit", "0", devices=bad))


def test_inet_sockets_are_never_allowed_without_a_network_namespace(tmp_path, monkeypatch):
    """The seccomp filter allows AF_INET/AF_INET6 because the jail's network namespace holds
    only lo: a jail without --unshare-net is refused whole, before anything runs."""
    job = make_job(tmp_path, "exit", "0")
    plan = sandbox_plan(job)
    assert "--unshare-net" in plan["argv"] and "net" in plan["namespaces"]
    assert plan["network"].startswith("loopback only")
    assert plan["seccomp_rules"]["socket"] == (
        "arg0 in {0x1, 0x2, 0xa}: allow, else (arg0 == 0x10: (arg2 == 0x0: allow, "
        "else errno 97), else errno 97)")
    assert seccomp.inet_allowed()
    shared = tuple(a for a in policy._NAMESPACE_ARGS if a != "--unshare-net")
    monkeypatch.setattr(policy, "_NAMESPACE_ARGS", shared)
    for attempt in (lambda: sandbox_plan(job), lambda: gpu_launch(job)):
        with pytest.raises(SandboxUnavailable) as err:
            attempt()
        assert err.value.reason == "network_not_isolated"
    assert not (tmp_path / "job.log").exists()  # refused before bwrap started
    # no seccomp filter on this architecture: sockets of every family, so refused too
    monkeypatch.setattr(policy, "_seccomp_program", lambda: None)
    with pytest.raises(SandboxUnavailable):
        sandbox_plan(job)
    # an AF_UNIX-only table may share the host's network namespace (the old rule)
    monkeypatch.setattr(policy, "_seccomp_program", seccomp._seccomp_program)
    monkeypatch.setitem(seccomp._SECCOMP_RULES, "socket",
                        (0, "==", seccomp.AF_UNIX, "allow", seccomp.EAFNOSUPPORT))
    assert not seccomp.inet_allowed()
    assert "--unshare-net" not in sandbox_plan(job)["argv"]


def test_memory_cap_mechanism_in_the_plan(tmp_path, monkeypatch):
    job = make_job(tmp_path, "exit", "0", max_memory_bytes=2 * 1024**3)
    monkeypatch.setattr(memory, "_cgroup_base", lambda: None)  # a host without delegation
    plan = sandbox_plan(job)
    assert plan["caps"]["memory"] == {"bytes": 2 * 1024**3, "mechanism": "rlimit"}
    assert f"--as={2 * 1024**3}" in plan["argv"]
    monkeypatch.setattr(memory, "_cgroup_base", lambda: tmp_path / "cg")  # one with it
    plan = sandbox_plan(job)
    assert plan["caps"]["memory"]["mechanism"] == "cgroup2"
    assert plan["argv"][1:4] == ["-c", 'echo 0 > "$0" && exec "$@"', "<cgroup>/cgroup.procs"]
    assert not any(a.startswith("--as=") for a in plan["argv"])


def test_nesting_depth_ignores_brackets_in_strings():
    from runner.jobs.handback import nesting_depth

    assert nesting_depth(b'{"a": "[[[[{{{{\\"[[", "b": [1, {"c": []}]}') == 4
    assert nesting_depth(b"[" * 5000) == 5000 and nesting_depth(b"") == 0


def _run_bpf(program: bytes, arch: int, nr: int, *args: int) -> int:
    """A classic-BPF interpreter for the instructions the filter uses; `args` are the
    syscall's arguments (missing ones 0)."""
    prog = [struct.unpack("<HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    data = struct.pack("<iI", nr, arch) + struct.pack("<Q", 0) + struct.pack(
        "<6Q", *(list(args) + [0] * 6)[:6])
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code in (0x15, 0x35, 0x45):
            hit = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if hit else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {code:#x}")
        pc += 1


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_seccomp_filter_follows_its_table(arch):
    program = seccomp._seccomp_program(arch)
    audit, numbers = seccomp._SYSCALLS[arch]
    ALLOW, EPERM = 0x7FFF0000, 0x00050001
    for name in ("keyctl", "add_key", "request_key", "unshare", "io_uring_setup"):
        assert _run_bpf(program, audit, numbers[name]) == EPERM, name
    EAFNOSUPPORT = 0x00050000 | 97
    for family in (1, 2, 10):  # AF_UNIX, AF_INET, AF_INET6 (loopback only: the netns)
        assert _run_bpf(program, audit, numbers["socket"], family, 1, 0) == ALLOW, family
    assert _run_bpf(program, audit, numbers["socket"], 16, 3, 0) == ALLOW  # NETLINK_ROUTE
    for protocol in (4, 9, 12, 15, 16):  # sock_diag, audit, netfilter, uevent, generic
        assert _run_bpf(program, audit, numbers["socket"], 16, 3, protocol) == EAFNOSUPPORT
    for family in (17, 3, 4, 5, 38, 40, 44):  # packet, ax25, ipx, appletalk, alg, vsock, xdp
        assert _run_bpf(program, audit, numbers["socket"], family, 3, 0) == EAFNOSUPPORT
    assert _run_bpf(program, audit, numbers["clone"], 0x10000000) == EPERM
    assert _run_bpf(program, audit, numbers["clone"], 0x11) == ALLOW
    assert _run_bpf(program, audit, numbers["clone3"]) == 0x00050000 | 38
    assert _run_bpf(program, audit, 0) == ALLOW  # read / io_setup: anything not in the table
    assert _run_bpf(program, 0x40000003, numbers["keyctl"]) == 0x80000000  # foreign ABI


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_the_compiled_filter_agrees_with_its_table(arch):
    """Every rule over a grid of arguments: the BPF program does what `rule_action` says the
    table means (nested tests, "in" sets, bit tests, the jumps between them)."""
    program = seccomp._seccomp_program(arch)
    audit, numbers = seccomp._SYSCALLS[arch]

    def code(action) -> int:
        return 0x7FFF0000 if action == "allow" else 0x00050000 | action

    for name in seccomp._SECCOMP_RULES:
        for arg0 in (*range(48), 0x11, 0x10000000, 0x10000011, 0xFFFFFFFF):
            for arg2 in (0, 4, 9, 0x10000000):
                args = (arg0, 1, arg2)
                assert _run_bpf(program, audit, numbers[name], *args) == \
                    code(seccomp.rule_action(name, *args)), (name, args)


# --------------------------------------------------------------------------- what comes back


def _train(**kw):
    args = {"agent_id": AGENT, "wall_time_cap_min": 5, "vram_cap_gb": 1, "allow_dirty": False,
            "overrides": ["training.max_epochs=1"]}
    args.update(kw)
    return train_model_version_(**args)


def train_model_version_(**args):
    from runner.api import train_model_version

    return train_model_version(BASE_ID, DATASET_ID, **args)


def _allocations(url: str) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(schema.resource_allocations)).mappings()]


def _host_run(run_id: str):
    from runner.config.compose import compose_config, to_plain
    from runner.jobs import tracking

    client = tracking.client(to_plain(compose_config())["tracking"]["tracking_uri"])
    return client.get_run(run_id), client


def _fails_typed(url: str, reason: str) -> dict:
    """The call failed with `reason`; the books balance and nothing was registered."""
    allocs = _allocations(url)
    assert len(allocs) == 1 and allocs[0]["status"] == "failed", allocs
    alloc = allocs[0]
    assert alloc["debited"] == alloc["actual_cost"] + alloc["refunded"]
    assert recovery.check() == []
    assert [a["id"] for a in catalog.list_artifacts("model")] == [BASE_ID]
    run, _ = _host_run(alloc["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["forge.outcome"] == reason
    return alloc


def _home_holds(text: str) -> list[str]:
    """Files under FORGE_HOME (weights store, MLflow artifacts, runs) that contain `text`."""
    home = Path(os.environ["FORGE_HOME"])
    return [str(p) for p in home.rglob("*")
            if p.is_file() and not p.is_symlink() and text.encode() in p.read_bytes()]


TRAINER_OK = STAND_IN_TRAINER.replace("METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.6}')


def _trainer(result_json: str) -> str:
    """A stand-in that writes a checkpoint and then `result_json` (Python source) verbatim."""
    return f"""
    import json, sys, pathlib
    m = json.load(open(sys.argv[1]))
    out = pathlib.Path(m["output_dir"])
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "best_model.pt").write_bytes(b"weights")
    (out / "result.json").write_text({result_json})
    """


GOOD = '{"status": "ok", "metrics": {"test_macro_f1": 0.5, "test_accuracy": 0.6}'


@pytest.mark.sandbox
def test_deeply_nested_result_json_is_malformed(sqlite_registry, tmp_path, monkeypatch):
    body = _trainer(f"'{GOOD}, \"extra\": ' + '[' * 100000 + ']' * 100000 + '}}'")
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    with host_deadline(120), pytest.raises(TrainingFailed) as err:
        _train()
    assert err.value.reason == "malformed_result" and "levels deep" in str(err.value)
    _fails_typed(sqlite_registry, "malformed_result")


@pytest.mark.parametrize("checkpoint", ["[]", '"checkpoint"', '{"dir": 5}'])
@pytest.mark.sandbox
def test_checkpoint_of_the_wrong_type_is_malformed(sqlite_registry, tmp_path, monkeypatch,
                                                    checkpoint):
    body = _trainer(f"'{GOOD}, \"checkpoint\": {checkpoint}}}'")
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    with host_deadline(120), pytest.raises(TrainingFailed) as err:
        _train()
    assert err.value.reason == "malformed_result", err.value
    _fails_typed(sqlite_registry, "malformed_result")


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.sandbox
def test_checkpoint_dir_outside_out_is_never_copied(sqlite_registry, tmp_path, monkeypatch,
                                                     where):
    secret = tmp_path / "host-secret"  # a host folder the job names as its checkpoint
    secret.mkdir()
    (secret / "best_model.pt").write_text("HOST-SECRET-4a7f")
    # out = FORGE_HOME/runs/<allocation>/out, FORGE_HOME = tmp_path/home
    target = "../../../../host-secret" if where == "relative" else str(secret)
    body = _trainer(f"'{GOOD}, \"checkpoint\": {{\"dir\": \"{target}\"}}}}'")
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    with host_deadline(120), pytest.raises(TrainingFailed) as err:
        _train()
    assert err.value.reason == "malformed_result" and "checkpoint" in str(err.value)
    _fails_typed(sqlite_registry, "malformed_result")
    assert _home_holds("HOST-SECRET-4a7f") == []


@pytest.mark.sandbox
def test_deep_tree_in_out_fails_typed_on_the_launch_path(sqlite_registry, tmp_path,
                                                         monkeypatch, capfd):
    body = TRAINER_OK + """
    import os
    fd = os.open(out / "checkpoint", os.O_RDONLY)
    for _ in range(1200):
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    """
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    with host_deadline(120), pytest.raises(TrainingFailed) as err:
        _train()
    assert err.value.reason == "output_quota" and "deeper than 64" in str(err.value)
    alloc = _fails_typed(sqlite_registry, "output_quota")
    out = Path(os.environ["FORGE_HOME"]) / "runs" / alloc["id"] / "out"
    assert not out.exists() or list(out.iterdir()) == []


METRIC_LINES = """
    m.setdefault("metrics_path", m["output_dir"] + "/metrics.jsonl")
    def metric(key, value, step=0):
        with open(m["metrics_path"], "a") as f:
            f.write(json.dumps({"key": key, "value": value, "step": step, "ts": 1}) + "\\n")
"""


@pytest.mark.sandbox
def test_fifo_swapped_into_the_metrics_stream_does_not_hang_the_host(
        sqlite_registry, tmp_path, monkeypatch, capfd):
    body = TRAINER_OK.replace('print("trained", flush=True)', "") + METRIC_LINES + """
    import os, time
    metric("val_loss", 0.75)
    time.sleep(4.5)                      # the relay reads it (every 2 s) ...
    stream = m["metrics_path"]
    os.replace(stream, stream + ".old")  # ... then finds a FIFO in its place
    os.mkfifo(stream)
    os.makedirs(out / "mlruns" / "0")    # and the same in the old file-store channel
    os.mkfifo(out / "mlruns" / "0" / "meta.yaml")
    time.sleep(4.5)
    """
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    t0 = time.monotonic()
    with host_deadline(90):
        result = _train()
    assert time.monotonic() - t0 < 60
    run, client = _host_run(result["mlflow"]["run_id"])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0.75]
    assert "metrics.jsonl is not a regular file" in capfd.readouterr().err
    assert catalog.get_model_version(result["artifact_id"])["lifecycle_state"] == "candidate"


@pytest.mark.sandbox
def test_metrics_link_to_a_root_only_host_file_is_never_followed(
        sqlite_registry, tmp_path, monkeypatch, capfd):
    # Root-only host files in both metric formats: the stream's JSON lines, and MLflow's
    # file store ("timestamp value step") for the old channel.
    jsonl, plain = tmp_path / "secret.jsonl", tmp_path / "secret-metric"
    jsonl.write_text(json.dumps({"key": "leaked_secret", "value": 31337, "step": 0, "ts": 1})
                     + "\n")
    plain.write_text("1700000000000 31337 0\n")
    for path in (jsonl, plain):
        path.chmod(0o600)
    body = TRAINER_OK.replace('print("trained", flush=True)', "") + METRIC_LINES + f"""
    import os, time
    metric("val_loss", 0.5)
    time.sleep(4.5)
    os.remove(m["metrics_path"])
    os.symlink({str(jsonl)!r}, m["metrics_path"])
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    from mlflow.tracking import MlflowClient
    store = MlflowClient((out / "mlruns").as_uri())
    run = store.create_run(store.create_experiment("x")).info
    store.log_metric(run.run_id, "leak", 1.0)
    leak = out / "mlruns" / run.experiment_id / run.run_id / "metrics" / "leak"
    leak.unlink()
    leak.symlink_to({str(plain)!r})
    time.sleep(4.5)                      # two relay passes with both links in place
    """
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    with host_deadline(120):
        result = _train()
    run, _ = _host_run(result["mlflow"]["run_id"])
    assert "leaked_secret" not in run.data.metrics and "leak" not in run.data.metrics
    assert 31337 not in run.data.metrics.values()
    assert run.data.metrics["val_loss"] == 0.5  # the stream itself was relayed
    assert "metrics.jsonl not read" in capfd.readouterr().err


@pytest.mark.sandbox
def test_metric_with_an_invalid_name_is_skipped_and_the_run_registers(
        sqlite_registry, tmp_path, monkeypatch, capfd):
    body = TRAINER_OK + METRIC_LINES + """
    metric("bad%name", 1.0)
    metric("val_loss", 0.25)
    metric("train_loss", float("nan"))
    """
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    with host_deadline(120):
        result = _train()
    run, _ = _host_run(result["mlflow"]["run_id"])
    assert run.data.metrics["val_loss"] == 0.25
    assert "bad%name" not in run.data.metrics and "train_loss" not in run.data.metrics
    err = capfd.readouterr().err
    assert "[metrics] metric 'bad%name' skipped" in err
    assert "a value that is not a finite number skipped" in err
    assert catalog.get_model_version(result["artifact_id"])["lifecycle_state"] == "candidate"


@pytest.mark.sandbox
def test_a_host_stop_is_not_overridden_by_the_jobs_claim(sqlite_registry, tmp_path, monkeypatch):
    """A job killed for its output may have written result.json saying something else."""
    body = """
    import json, sys, pathlib, os
    m = json.load(open(sys.argv[1]))
    out = pathlib.Path(m["output_dir"])
    (out / "result.json").write_text(json.dumps({"status": "failed", "reason": "nan_loss",
                                                 "message": "\\x1b]0;pwned\\x07 it was NaN"}))
    for i in range(64):
        (out / f"f{i}.bin").write_bytes(os.urandom(1024**2))
    """
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    real = sandbox.SandboxJob

    def small_quota(**kw):
        kw["max_output_bytes"] = 16 * MIB
        return real(**kw)

    monkeypatch.setattr(sandbox, "SandboxJob", small_quota)
    with host_deadline(120), pytest.raises(ForgeError) as err:
        _train()
    assert isinstance(err.value, TrainingFailed) and err.value.reason == "output_quota"
    assert "\x1b" not in str(err.value)
    _fails_typed(sqlite_registry, "output_quota")


@pytest.mark.sandbox
def test_the_jobs_failure_message_reaches_the_caller_escaped(sqlite_registry, tmp_path,
                                                              monkeypatch):
    body = """
    import json, sys, pathlib
    m = json.load(open(sys.argv[1]))
    (pathlib.Path(m["output_dir"]) / "result.json").write_text(json.dumps(
        {"status": "failed", "reason": "nan_loss", "message": "\x1b]0;pwned\x07\x1b[2J NaN"}))
    sys.exit(3)
    """
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, body)))
    with host_deadline(120), pytest.raises(TrainingFailed) as err:
        _train()
    assert err.value.reason == "nan_loss"
    assert "\x1b" not in str(err.value) and r"\x1b]0;pwned\x07\x1b[2J NaN" in str(err.value)
    _fails_typed(sqlite_registry, "nan_loss")


def test_import_stays_cheap():
    import subprocess

    code = ("import sys, runner.sandbox, runner.jobs.handback; "
            "print([m for m in ('torch', 'lightning', 'mlflow', 'jsonschema') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
