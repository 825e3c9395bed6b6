"""`forge train` and `forge jobs submit` (runner/cli_train.py): forge's one dialect for
training, its options derived from the calls' declarations; and forge-train's `--agent`.
Real registry (SQLite), real code repository, the real forge-train path (train_app.run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from click.testing import CliRunner
from helpers import stand_in_weights
from test_dry_run import DATASET, PARENT, code_repo, dry, registry  # noqa: F401 (fixtures)

from runner import train_app
from runner.cli import main
from runner.registry import catalog

TRAIN = ["train", "--parent", PARENT, "--dataset", DATASET, "--agent", "a1"]


def forge(*args):
    return CliRunner().invoke(main, list(args))


class Ran(NamedTuple):
    exit_code: int
    output: str


def forge_process(*args) -> Ran:
    """`forge` as a person runs it, in its own process: a real (not dry) run goes through
    Hydra's app, which configures the process's logging; in the test process that would meet
    the handlers earlier tests' libraries (scvi-tools) left on streams pytest has closed."""
    done = subprocess.run([str(Path(sys.executable).with_name("forge")), *args],
                          capture_output=True, text=True, timeout=600)
    return Ran(done.returncode, done.stderr + done.stdout)  # stdout's last line last


@pytest.mark.usefixtures("registry")
def test_dry_run_prints_a_summary_and_the_next_command():
    out = forge(*TRAIN, "--dry-run", "training.lr=1e-4")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0] == "would launch: yes"
    assert lines[1].startswith("estimate: 1.00 credits") and "balance 10" in lines[1]
    assert lines[-1].startswith("next: forge train training.lr=1e-4 --parent") \
        and "--dry-run" not in lines[-1] and "--agent a1" in lines[-1]


@pytest.mark.usefixtures("registry")
def test_json_is_the_calls_result_and_a_refusal_says_why():
    out = forge(*TRAIN, "--dry-run", "--json", "--cap", "60")
    assert out.exit_code == 0, out.output
    printed = json.loads(out.output)
    assert printed["request_key"] == dry(wall_time_cap_min=60)["request_key"]
    assert printed["estimate"]["amount"] == "0.50" and len(out.output) < 4000
    poor = forge(*TRAIN[:-1], "nobody", "--dry-run")
    assert poor.exit_code == train_app.EXIT_WOULD_NOT_LAUNCH
    assert "would launch: no" in poor.output and "unknown_agent" in poor.output
    assert "next: fix the reasons" in poor.output


@pytest.mark.usefixtures("registry")
def test_cfg_job_prints_the_config_with_the_registrys_facts():
    catalog.register_model(
        artifact_id="model-scgpt-wide", title="wide", created_by="test",
        metadata={"family": "scgpt", "framework": "scgpt",
                  "architecture": {"n_layers": 2, "d_model": 64, "n_heads": 8}})
    stand_in_weights("model-scgpt-wide")
    out = forge("train", "--parent", "model-scgpt-wide", "--dataset", DATASET, "--agent", "a1",
                "--cfg", "job")
    assert out.exit_code == 0, out.output
    config = yaml.safe_load(out.output)
    assert config["parent"]["n_heads"] == 8 and config["parent"]["n_layers"] == 2  # registry's
    assert config == dry(parent="model-scgpt-wide", verbose=True)["config"]


def test_help_lists_only_what_a_caller_may_set():
    out = forge("train", "--help")
    assert out.exit_code == 0
    text = out.output
    for shown in ("training.lr=<number> (> 0)", "training.C=<number> (> 0)",
                  "training.precision=32|bf16-mixed|16-mixed|auto", "--agent", "--cap",
                  "--dry-run", "--cfg", "--verbose", "[default: 120"):
        assert shown in text, shown
    for hidden in ("Override anything", "pricing.", "sandbox.", "policy.", "hydra",
                   "--code-commit", "--mlflow-parent-run-id", "--config "):
        assert hidden not in text, hidden


@pytest.mark.usefixtures("registry")
def test_a_typo_gets_did_you_mean_and_exit_2():
    out = forge(*TRAIN, "--dry-run", "training.lrr=1")
    assert out.exit_code == train_app.EXIT_INVALID
    assert "did you mean training.lr?" in out.output
    bad = forge(*TRAIN, "--dry-run", "--cap", "0")  # click checks the declared bounds
    assert bad.exit_code == 2 and "--cap" in bad.output


@pytest.mark.usefixtures("registry")
def test_forge_train_takes_agent_as_forge_spells_it(capsys):
    argv = ["parent=scgpt_cbmc_base", "dataset=cbmc", "dry_run=true"]
    assert train_app.run([*argv, "--agent", "a1"]) == train_app.EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["agent_id"] == "a1" and printed["would_launch"] is True
    assert train_app.run([*argv, "--agent=a1"]) == train_app.EXIT_OK
    assert train_app.run([*argv, "--agent"]) == train_app.EXIT_INVALID
    assert "--agent needs a value" in capsys.readouterr().err


def test_jobs_submit_options_come_from_the_submit_declaration():
    out = forge("jobs", "submit", "--help")
    assert out.exit_code == 0
    for shown in ("--agent", "--cap", "--vram-cap-gb", "--device", "--devices",
                  "--allow-dirty", "--json"):
        assert shown in out.output, shown
    for hidden in ("--dry-run", "--verbose", "--code-commit", "--parent "):
        assert hidden not in out.output, hidden
    missing = forge("jobs", "submit", PARENT, DATASET)
    assert missing.exit_code == 2 and "agent_id is required" in missing.output


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("args", [["--dry-run"], []])
def test_forge_train_without_an_agent_refuses_clearly(args):
    run = forge_process if "--dry-run" not in args else forge
    out = run("train", "--parent", PARENT, "--dataset", DATASET, *args)
    assert out.exit_code == train_app.EXIT_INVALID, out.output
    assert "agent_id" in out.output


@pytest.mark.slow  # ~30 s on 2 shared cores: two linear jobs in the jail (the root, then ours)
@pytest.mark.sandbox
@pytest.mark.train
def test_a_real_run_prints_the_version_its_metric_its_cost_and_next(db_url, committed_code,
                                                                    monkeypatch):
    from test_family_seam import AGENT, DATASET, train_root

    from runner.jobs.datasets import builtin_citation
    from runner.registry import ledger

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    catalog.register_dataset(DATASET, "CBMC CITE-seq", builtin_citation("cbmc"))
    ledger.grant(AGENT, "10")
    root = train_root("model-linear-cli", "linear_cbmc_base")
    out = forge_process("train", "--parent", root["id"], "--dataset", DATASET,
                        "--agent", AGENT, "--cap", "5", "--vram-cap-gb", "1")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()  # the job's own lines ([sandbox] ...), then the summary
    first, last = next(line for line in lines if line.startswith("version ")), lines[-1]
    version = first.split()[1]
    assert first.startswith(f"version {version} v2 (candidate), test_macro_f1 0.9")
    assert "cost " in first and "credits" in first
    assert last == f"next: forge gate {version} --agent {AGENT}   or   forge models show " \
                   f"{version}"
    assert catalog.get_model_version(version)["parent_version_id"] == root["id"]
