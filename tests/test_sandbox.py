"""The sandbox, with real bwrap and real processes.

Each job tries something from inside (tests/sandbox_jobs/sandbox_job.py) and writes what
happened to /job/out; the tests read that back and check the host side too."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from runner.errors import InvalidInput, SandboxUnavailable
from runner.sandbox import (
    LaunchResult,
    SandboxJob,
    VramUnavailable,
    check_free_vram,
    gpu_launch,
    sandbox_plan,
)

JOBS = Path(__file__).parent / "sandbox_jobs"
REPO = Path(__file__).resolve().parents[1]
SECRET_URL = "postgresql://u:secret@127.0.0.1:5432/forge"


def make_job(tmp_path: Path, *args: str, lines: list | None = None, **kw) -> SandboxJob:
    kw.setdefault("wall_time_cap_s", 30)
    kw.setdefault("grace_s", 1)
    return SandboxJob(module="sandbox_job", args=list(args), code_dir=JOBS,
                      output_dir=tmp_path / "out", log_path=tmp_path / "job.log",
                      on_line=(lines.append if lines is not None else lambda line: None), **kw)


def read_out(tmp_path: Path, name: str):
    return json.loads((tmp_path / "out" / name).read_text())


# --------------------------------------------------------------------------- from inside


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """One probe job: network, files, identity, environment and limits, seen from inside."""
    tmp = tmp_path_factory.mktemp("probe")
    registry = tmp / "registry"  # the registry DB: owned by the test, NOT an input
    registry.mkdir()
    (registry / "forge.db").write_text("SQLite format 3\0 fake registry")
    (tmp / "manifest.json").write_text('{"seed": 1}')
    (tmp / "data").mkdir()
    (tmp / "data" / "x.csv").write_text("a,b\n1,2\n")

    home = Path.home()
    py_roots = [os.path.abspath(p) for p in (sys.prefix, sys.base_prefix)]
    home_entries = [str(home / e) for e in os.listdir(home)
                    if not any(r.startswith(str(home / e)) for r in py_roots)]
    hidden = [str(registry / "forge.db"), str(registry), str(REPO / "runner"),
              str(REPO / "outputs"), str(REPO / ".git"), "/work/main/outputs", "/etc/shadow",
              "/run", "/var", "/home", *home_entries]

    saved = os.environ.get("FORGE_DB_URL")
    os.environ["FORGE_DB_URL"] = SECRET_URL  # a host secret the job must not see
    try:
        job = make_job(tmp, "probe", json.dumps(hidden),
                       inputs={"manifest.json": tmp / "manifest.json", "data": tmp / "data"},
                       env={"PROBE_BIG_WRITE": str(2 * 1024**2)},
                       max_file_size_bytes=1024**2)
        result = gpu_launch(job)
    finally:
        if saved is None:
            os.environ.pop("FORGE_DB_URL")
        else:
            os.environ["FORGE_DB_URL"] = saved
    assert result.reason == "ok", (tmp / "job.log").read_text()
    report = json.loads((tmp / "out" / "report.json").read_text())
    return {"result": result, "report": report, "hidden": hidden, "home_entries": home_entries}


@pytest.mark.sandbox
def test_no_network(probe):
    report = probe["report"]
    for target in ["127.0.0.1:5432", "1.1.1.1:53", "10.0.0.1:80"]:
        assert report["connect"][target] != "ok", target
    assert report["dns"].startswith("gaierror")
    # The barrier is the network namespace itself, not only the socket filter:
    assert report["interfaces"] == ["lo"]
    assert report["unix_socketpair"] == "ok"  # multiprocessing still works


@pytest.mark.sandbox
def test_host_servers_answer_the_host_but_not_the_job(tmp_path):
    """Real servers on the host, on 127.0.0.1 and on an abstract unix socket (which AF_UNIX,
    allowed for multiprocessing, could reach if the jail shared the host's network namespace),
    answer the host (the control) and are never reached from the jail."""
    import socketserver
    import threading

    class Greeter(socketserver.BaseRequestHandler):
        def handle(self):
            self.server.peers.append(self.client_address)
            self.request.sendall(b"hello\n")

    servers = {"tcp": socketserver.TCPServer(("127.0.0.1", 0), Greeter),
               "unix": socketserver.UnixStreamServer(f"\0forge-test-{uuid.uuid4().hex}", Greeter)}
    threads = []
    for server in servers.values():
        server.peers = []
        threads.append(threading.Thread(target=server.serve_forever, args=(0.05,)))
        threads[-1].start()
    addresses = {"tcp": list(servers["tcp"].server_address),
                 "unix": servers["unix"].server_address.decode()}  # leading NUL: abstract
    code = tmp_path / "code"
    code.mkdir()
    (code / "dial.py").write_text(
        "import json, socket, sys\n"
        "def dial(family, address):\n"
        "    try:\n"
        "        with socket.socket(family) as s:\n"
        "            s.settimeout(2)\n"
        "            s.connect(tuple(address) if family == socket.AF_INET else address)\n"
        "            return 'ok: ' + s.recv(16).decode()\n"
        "    except Exception as exc:\n"
        "        return f'{type(exc).__name__}: {exc}'\n"
        "a = json.loads(sys.argv[1])\n"
        "json.dump({'tcp': dial(socket.AF_INET, a['tcp']),\n"
        "           'unix': dial(socket.AF_UNIX, a['unix'])},\n"
        "          open('/job/out/dial.json', 'w'))\n")
    try:
        for kind, server in servers.items():  # the control: each server answers the host
            with socket.socket(server.address_family) as s:
                s.settimeout(2)
                s.connect(server.server_address)
                assert s.recv(16) == b"hello\n", kind
        job = SandboxJob(module="dial", args=[json.dumps(addresses)], code_dir=code,
                         output_dir=tmp_path / "out", log_path=tmp_path / "job.log",
                         wall_time_cap_s=30, grace_s=1, on_line=lambda line: None)
        result = gpu_launch(job)
    finally:
        for server, thread in zip(servers.values(), threads):
            server.shutdown()
            thread.join()
            server.server_close()
    assert result.reason == "ok", (tmp_path / "job.log").read_text()
    dialled = read_out(tmp_path, "dial.json")
    assert not any(outcome.startswith("ok") for outcome in dialled.values()), dialled
    # Each server saw the host's own connection and nothing from the jail.
    assert [len(server.peers) for server in servers.values()] == [1, 1]


@pytest.mark.sandbox
def test_writes_outside_job_out_fail(probe):
    writes = probe["report"]["write"]
    assert writes.pop("/job/out/inside.txt") == "ok"
    assert writes.pop("/tmp/inside.txt") == "ok"
    for path, outcome in writes.items():
        # Refused, or the place does not even exist in the jail (a checkout outside /work).
        assert outcome.startswith(("PermissionError", "OSError", "FileNotFoundError")), \
            (path, outcome)
    assert not (JOBS / "escape.txt").exists()


@pytest.mark.sandbox
def test_host_files_are_invisible(probe):
    visible = probe["report"]["visible"]
    assert visible.pop("/job/in/manifest.json") is True
    assert visible.pop("/job/in/data/x.csv") is True
    assert [path for path, seen in visible.items() if seen] == []
    listing = probe["report"]["listdir"]
    assert listing["/work/main"] in (None, [".venv"])  # only the interpreter's venv
    assert set(listing["/etc"]) <= {"alternatives", "fonts", "group", "hostname", "hosts",
                                    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime",
                                    "passwd"}
    assert listing["/run"] is None and listing["/home"] is None


@pytest.mark.sandbox
def test_environment_is_an_allowlist(probe):
    env = probe["report"]["env"]
    assert "FORGE_DB_URL" not in env
    assert not any("secret" in value for value in env.values())
    assert env["PYTHONPATH"] == "/job/code"
    assert env["PYTHONUNBUFFERED"] == "1" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["FORGE_VRAM_CAP_GB"] == "24" and env["FORGE_DEVICE"] == "cpu"
    assert env["PROBE_BIG_WRITE"] == str(2 * 1024**2)  # the job's own allowlisted key
    assert set(env) - {"PWD", "USER", "LOGNAME"} == {
        "PYTHONPATH", "HOME", "TMPDIR", "PATH", "LANG", "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE", "MLFLOW_DISABLE_TELEMETRY", "FORGE_VRAM_CAP_GB",
        "FORGE_DEVICE", "CUDA_VISIBLE_DEVICES", "PROBE_BIG_WRITE"}


@pytest.mark.sandbox
def test_job_is_not_root_and_has_no_capabilities(probe):
    report = probe["report"]
    assert report["uid"] != 0 and report["euid"] != 0
    status = report["status"]
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]:
        assert int(status[cap], 16) == 0, cap
    assert status["NoNewPrivs"] == "1"
    assert status["Groups"] == ""
    assert report["unshare_userns"] != "ok"  # no user namespace to regain capabilities in
    assert report["hostname"] == "forge-sandbox"
    assert report["pid"] < 10  # its own pid namespace


@pytest.mark.sandbox
def test_limits_apply(probe):
    rlimits = probe["report"]["rlimits"]
    assert rlimits["CORE"] == [0, 0]
    assert rlimits["NPROC"] == [512, 512]
    assert rlimits["FSIZE"] == [1024**2, 1024**2]
    assert "File too large" in probe["report"]["big_write"]


@pytest.mark.sandbox
def test_output_is_handed_back_to_the_host_owner(probe):
    result = probe["result"]
    out = Path(result.log_path).parent / "out"
    for path in [out, *out.iterdir()]:
        assert path.lstat().st_uid == os.getuid(), path


@pytest.mark.sandbox
def test_only_plain_files_leave_the_sandbox(tmp_path):
    lines: list[str] = []
    result = gpu_launch(make_job(tmp_path, "links", lines=lines))
    assert result.reason == "ok"
    out = tmp_path / "out"
    assert sorted(p.name for p in out.rglob("*")) == ["result.json", "setuid.bin", "sub"]
    mode = (out / "sub" / "setuid.bin").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID)
    assert sum("only regular files" in line for line in lines) == 3


# --------------------------------------------------------------------------- caps


@pytest.mark.sandbox
def test_fork_bomb_is_bounded(tmp_path):
    result = gpu_launch(make_job(tmp_path, "forkbomb", "2000", max_processes=64,
                                 wall_time_cap_s=20))
    report = read_out(tmp_path, "report.json")
    assert report["forked"] < 64 and report["errno"] == 11  # EAGAIN from RLIMIT_NPROC
    assert result.reason == "ok"
    subprocess.run(["true"], check=True)  # the host can still fork


def _host_pids_with(marker: str) -> dict[int, str]:
    """Live (non-zombie) host processes whose command line holds `marker`, and a sleep."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and b"sleep" in cmdline and state != "Z":
            found[int(entry)] = state
    return found


@pytest.mark.sandbox
def test_wall_time_cap_kills_the_whole_tree(tmp_path):
    marker = f"forge-test-{uuid.uuid4().hex}"
    seen: dict[int, str] = {}
    lines: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "spawned":  # the job and its sleepers are up: note their host pids
            seen.update(_host_pids_with(marker))

    job = make_job(tmp_path, "hang", marker, wall_time_cap_s=1.5, grace_s=1)
    job.on_line = on_line
    t0 = time.monotonic()
    result = gpu_launch(job)
    elapsed = time.monotonic() - t0

    assert result.reason == "timeout"
    assert 1.5 <= result.wall_seconds <= 1.5 + 1 + 1.0, result.wall_seconds
    assert elapsed <= 1.5 + 1 + 1.5
    assert len(seen) == 5, seen  # 3 sleepers, a launcher and its setsid'd grandchild
    assert _host_pids_with(marker) == {}  # no process of the job survived
    for pid in seen:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    assert (tmp_path / "out" / "sigterm.txt").exists()  # SIGTERM came first, with grace
    assert any("wall-time cap" in line for line in lines)


@pytest.mark.parametrize("args, code, reason", [
    (["exit", "0"], 0, "ok"),
    (["exit", "3"], 3, "error"),
    (["exit", "4"], 4, "oom"),  # the trainer's CUDA out-of-memory exit code
    (["kill_self", "11"], 128 + 11, "killed"),
    (["kill_self", "9"], 128 + 9, "oom"),  # SIGKILL not ours: the OOM killer's signature
])
@pytest.mark.sandbox
def test_exit_reasons(tmp_path, args, code, reason):
    result = gpu_launch(make_job(tmp_path, *args))
    assert (result.exit_code, result.reason) == (code, reason)


# --------------------------------------------------------------------------- a real job


@pytest.mark.slow
@pytest.mark.sandbox
def test_torch_training_job_completes(tmp_path):
    (tmp_path / "manifest.json").write_text('{"seed": 0}')
    lines: list[str] = []
    job = make_job(tmp_path, "train", "20", lines=lines, wall_time_cap_s=60,
                   inputs={"manifest.json": tmp_path / "manifest.json"})
    result = gpu_launch(job)
    assert result.reason == "ok", (tmp_path / "job.log").read_text()
    assert isinstance(result, LaunchResult) and result.exit_code == 0
    assert result.device == "cpu" and result.wall_seconds > 0
    assert result.started_at.tzinfo is not None and result.ended_at > result.started_at
    metrics = read_out(tmp_path, "result.json")
    assert metrics["steps"] == 20 and metrics["final_loss"] < 5
    assert (tmp_path / "out" / "model.pt").stat().st_size > 0
    assert [line for line in lines if line.startswith("step")][-1].startswith("step 19")


@pytest.mark.sandbox
def test_figures_render_without_fontconfig_errors(tmp_path):
    result = gpu_launch(make_job(tmp_path, "plot", wall_time_cap_s=120))
    log = (tmp_path / "job.log").read_text()
    assert result.reason == "ok", log
    assert (tmp_path / "out" / "figure.png").stat().st_size > 0
    assert "Fontconfig error" not in log


@pytest.mark.sandbox
def test_lines_arrive_live_and_are_logged(tmp_path):
    arrivals: list[tuple[float, str]] = []
    job = make_job(tmp_path, "lines", "3", "0.5")
    job.on_line = lambda line: arrivals.append((time.monotonic(), line))
    result = gpu_launch(job)
    done = time.monotonic()
    assert result.reason == "ok"
    got = [line.split()[1] for _, line in arrivals if line.startswith("line ")]
    assert got == ["0", "1", "2"]
    first = next(t for t, line in arrivals if line.startswith("line 0"))
    assert done - first >= 0.8  # line 0 was relayed while the job was still running
    log = (tmp_path / "job.log").read_text()
    assert "line 2" in log and "to stderr" in log  # stdout and stderr, merged


@pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="this host has a GPU")
@pytest.mark.sandbox
def test_cuda_request_without_gpu_runs_on_cpu(tmp_path):
    result = gpu_launch(make_job(tmp_path, "lines", "1", "0", device="cuda:0"))
    assert result.reason == "ok" and result.device == "cpu"
    env = read_out(tmp_path, "env.json")
    assert env["FORGE_DEVICE"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""


# --------------------------------------------------------------------------- refusals


def test_missing_bwrap_refuses_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_BWRAP", str(tmp_path / "no-bwrap"))
    with pytest.raises(SandboxUnavailable) as info:
        gpu_launch(make_job(tmp_path, "exit", "0"))
    assert "apt-get install -y bubblewrap" in str(info.value)
    assert info.value.reason == "sandbox_unavailable"
    assert not (tmp_path / "out").exists()  # nothing ran, not even unsandboxed


def test_bwrap_not_permitted_refuses_to_run(tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(SandboxUnavailable) as info:
        gpu_launch(make_job(tmp_path, "exit", "0"), bwrap=str(fake))
    assert "apt-get install -y bubblewrap" in str(info.value)
    assert "user.max_user_namespaces" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["code_dir", "output_dir", "inputs"])
def test_binds_never_contain_the_registry(tmp_path, monkeypatch, where):
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "forge"))
    monkeypatch.setenv("FORGE_DB_URL", f"sqlite:///{tmp_path / 'db' / 'forge.db'}")
    kw = {"code_dir": JOBS, "output_dir": tmp_path / "out", "inputs": {}}
    kw[where] = {"data": tmp_path} if where == "inputs" else tmp_path
    job = SandboxJob(module="sandbox_job", args=["exit", "0"], **kw)
    with pytest.raises(InvalidInput, match="registry DB"):
        sandbox_plan(job)
    with pytest.raises(InvalidInput):
        gpu_launch(job)
    # a dataset inside FORGE_HOME (its artifact store) is fine
    (tmp_path / "forge" / "artifacts").mkdir(parents=True)
    sandbox_plan(SandboxJob(module="m", code_dir=JOBS, output_dir=tmp_path / "o2",
                            inputs={"data": tmp_path / "forge" / "artifacts"}))


def test_vram_preflight(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 1024\n")  # MiB free
    smi.chmod(0o755)
    monkeypatch.setenv("FORGE_NVIDIA_SMI", str(smi))
    assert check_free_vram(0, 0.5) == 1.0
    with pytest.raises(VramUnavailable) as info:
        check_free_vram(0, 24)
    assert info.value.reason == "vram_unavailable" and info.value.field == "vram_cap_gb"


def test_plan_describes_without_launching(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_DB_URL", SECRET_URL)
    job = make_job(tmp_path, "exit", "0", inputs={"manifest.json": JOBS / "sandbox_job.py"})
    plan = sandbox_plan(job)
    assert json.loads(json.dumps(plan)) == plan
    assert not (tmp_path / "out").exists()
    mounts = {b["sandbox"]: b for b in plan["binds"]}
    assert mounts["/job/code"]["mode"] == "ro" and mounts["/job/in/manifest.json"]["mode"] == "ro"
    assert mounts["/job/out"] == {"host": str(tmp_path / "out"), "sandbox": "/job/out",
                                  "mode": "rw"}
    assert [b for b in plan["binds"] if b["mode"] == "rw"] == [mounts["/job/out"]]
    assert not any(b["host"] in ("/", "/work", str(REPO), "/root", "/home", "/etc")
                   for b in plan["binds"])
    assert "--unshare-net" in plan["argv"] and "--unshare-all" not in plan["argv"]
    assert "--clearenv" in plan["argv"] and "FORGE_DB_URL" not in plan["env_keys"]
    assert plan["device"] == "cpu" and plan["caps"]["wall_time_s"] == 30


def test_import_is_cheap():
    code = ("import sys, runner.sandbox; "
            "print([m for m in ('torch', 'lightning', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
