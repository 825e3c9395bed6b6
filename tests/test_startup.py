"""A job's start (issue 30): the snapshot carries the bytecode of the package the jail runs,
compiled once on the host, which the jail uses without compiling anything or writing there;
the job log states the start's phases; a linear job never imports torch or Lightning; the
entrypoint imports no numpy, scipy or framework before it is ready. (The startup
benchmarks' smoke modes run in CI: benchmarks/smoke.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.util import cache_from_source
from pathlib import Path

import pytest

from runner.jobs import archive, codepin
from runner.sandbox import SandboxJob, gpu_launch
from trainers.runtime import PHASES

REPO = Path(__file__).resolve().parents[1]
HASH_FLAGS = {0b11: "checked-hash", 0b01: "unchecked-hash", 0b00: "timestamp"}


def _pyc_kind(source: Path) -> str | None:
    """How the .pyc beside `source` is validated, or None when it has none."""
    pyc = Path(cache_from_source(str(source)))
    if not pyc.is_file():
        return None
    flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
    return HASH_FLAGS.get(flags, f"flags {flags}")


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `folder`: relative path -> (size, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    """This checkout's code as a job gets it (tracked files, as they are)."""
    pin = codepin.pin_code(REPO)
    return codepin.snapshot(pin, tmp_path_factory.mktemp("code-cache"))


def test_the_snapshot_holds_checked_hash_bytecode_for_the_jail_package(snapshot):
    sources = sorted((snapshot / "trainers").rglob("*.py"))
    assert len(sources) > 20
    kinds = {str(s.relative_to(snapshot)): _pyc_kind(s) for s in sources}
    assert set(kinds.values()) == {"checked-hash"}, kinds
    assert _pyc_kind(snapshot / "runner" / "cli.py") is None  # the host's code: not the jail's


def test_compile_tree_skips_a_file_that_does_not_compile_and_runs_none(tmp_path):
    (tmp_path / "pkg").mkdir()
    good, bad = tmp_path / "pkg" / "good.py", tmp_path / "pkg" / "bad.py"
    marker = tmp_path / "ran"
    good.write_text(f"open({str(marker)!r}, 'w').write('x')\n")  # compiled, never run
    bad.write_text("def broken(:\n")
    assert archive.compile_tree(tmp_path) is False  # one file failed
    assert _pyc_kind(good) == "checked-hash" and _pyc_kind(bad) is None
    assert not marker.exists()
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "m.py").write_text("X = 1\n")
    assert archive.compile_tree(ok) is True


def test_the_entrypoint_imports_no_numpy_scipy_or_framework():
    code = ("import sys, trainers.entrypoint as e; "
            "print(sorted(m for m in ('numpy', *e.HEAVY) if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


TORCHMETRICS_WITHOUT_SCIPY_SIGNAL = """
import json, sys, types
from trainers.torchmetrics_import import import_torchmetrics
import_torchmetrics()
import torch, torchmetrics.audio
from torchmetrics.classification import MulticlassF1Score
out = {"after_torchmetrics": "scipy.signal" in sys.modules,
       "stand_ins": [name for name, mod in list(sys.modules.items())
                     if isinstance(mod, types.ModuleType)
                     and any(getattr(v, "__doc__", None) == "stands in while torchmetrics imports"
                             for v in list(vars(mod).values()))]}
f1 = MulticlassF1Score(num_classes=3, average="macro")
out["f1"] = float(f1(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 1])))
import scipy.signal  # the real one now, for whoever needs it
out["real"] = float(scipy.signal.windows.hamming(3)[1])
print(json.dumps(out))
"""


def test_torchmetrics_imports_without_scipy_signal_which_still_loads_later():
    """trainers/torchmetrics_import.py (a Lightning job's result says it loaded no
    scipy.signal: tests/test_trainer_entrypoint.py)."""
    done = subprocess.run([sys.executable, "-c", TORCHMETRICS_WITHOUT_SCIPY_SIGNAL],
                          capture_output=True, text=True, timeout=300, check=True, cwd=REPO)
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["after_torchmetrics"] is False  # torchmetrics, audio too, left it out
    assert out["stand_ins"] == []  # no module kept the placeholder
    assert out["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)  # torchmetrics works
    assert out["real"] == 1.0  # hamming(3) = [0.08, 1, 0.08]: the real scipy.signal


def test_an_invalid_manifest_still_states_jail_ready(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "family": "linear"}))
    done = subprocess.run([sys.executable, "-m", "trainers.entrypoint", str(manifest)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert re.search(r"^phase jail_ready \d+\.\d{3} \(\+0\.000 s\)$", done.stdout, re.M), \
        done.stdout
    assert json.loads((tmp_path / "out" / "result.json").read_text())["reason"] == \
        "invalid_manifest"
    assert "error: " in done.stderr  # the fast exit (no teardown) flushed what it printed


@pytest.mark.sandbox
@pytest.mark.train
def test_a_linear_job_states_its_phases_uses_the_bytecode_and_never_imports_torch(
        snapshot, tmp_path):
    from runner.jobs import datasets

    cbmc = datasets.loader_input("cbmc", datasets.fetch("cbmc"))
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({
        "family": "linear", "task": "finetune_celltype", "seed": 0, "output_dir": "/job/out",
        "metrics_path": "/job/out/metrics.jsonl",
        "dataset": {"name": "cbmc", "path": "/job/in/dataset", "format": "cbmc_mat"}}))
    before = _tree(snapshot)
    lines: list[str] = []
    out = tmp_path / "out"
    result = gpu_launch(SandboxJob(
        module="trainers.entrypoint", args=["/job/in/manifest.json"], code_dir=snapshot,
        output_dir=out, inputs={"manifest.json": manifest, "dataset": cbmc},
        env={"PYTHONVERBOSE": "1"}, on_line=lines.append, wall_time_cap_s=300))
    log = result.log_path.read_text(errors="replace")
    assert result.exit_code == 0, log[-3000:]
    done = json.loads((out / "result.json").read_text())
    assert done["status"] == "ok"

    # the phases in the job log and in the result; a linear job loads its data before
    # scikit-learn (the first data line comes before the slowest import)
    stated = re.findall(r"^phase (\w+) (\d+\.\d{3}) \(\+(\d+\.\d{3}) s\)$", log, re.M)
    assert [name for name, _, _ in stated] == ["jail_ready", "data_ready", "imports_done",
                                               "first_step"], stated
    assert sorted(name for name, _, _ in stated) == sorted(PHASES)
    assert log.index("phase data_ready") < log.index("finetune_celltype: ") < \
        log.index("phase imports_done")
    phases = done["timings"]["phases"]
    assert list(phases) == [name for name, _, _ in stated]
    assert list(phases.values()) == sorted(phases.values())
    assert result.started_at.timestamp() - 1 < phases["jail_ready"] < result.ended_at.timestamp()

    # imports: sklearn for the fit, never torch or Lightning
    imported = done["timings"]["imported"]
    assert "sklearn" in imported
    assert not {"torch", "pytorch_lightning", "lightning", "scvi"} & set(imported), imported

    # bytecode: every module of trainers/ came from the snapshot's .pyc, none was compiled
    loaded = re.findall(r"^# code object from '?(/job/code/[^'\s]+)'?$", log, re.M)
    assert any(p.endswith("/trainers/__pycache__/entrypoint.cpython-311.pyc")
               or "/trainers/__pycache__/entrypoint." in p for p in loaded), loaded
    assert [p for p in loaded if p.endswith(".py")] == []
    assert _tree(snapshot) == before  # and the jail wrote nothing there
