"""The family seam (trainers/family.py) as the host meets it: the import contract that keeps
runner/ off the family packages fails on a planted import; a training key or task of another
family, or a family this host lacks, is refused before any debit; describe_options and the
skill's schema list every family; the linear family trains, registers and is gated end to end;
and a family added by its folder and one registry line (tests/families/centroid) trains and
is gated with no edit under runner/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from helpers import count_rows, operator_conf, scratch_code_repo, stand_in_weights

from runner import api
from runner.errors import ForgeError, InvalidOverride
from runner.jobs.datasets import builtin_citation
from runner.jobs.launch import launch
from runner.jobs.plan import TrainRequest, prepare
from runner.registry import catalog, ledger
from trainers import family as families

REPO = Path(__file__).resolve().parents[1]
DATASET = "dataset-geo-GSE100866"
FAMILY_CONTRACT = ("the host reaches a model family only through trainers.family (by name, "
                   "never by import)")
MOVEMENT = ("resource_allocations", "token_ledger", "token_accounts", "artifacts",
            "model_versions", "events", "world_model_improvements")


def movement(url: str) -> dict:
    rows = count_rows(url)
    return {k: rows[k] for k in MOVEMENT}


# --- 1. the import contract ---------------------------------------------------------------------

def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_family_import_contract_fails_on_a_planted_import(tmp_path):
    for name in ("runner", "trainers"):
        shutil.copytree(REPO / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")

    clean = _lint_imports(tmp_path)
    text = " ".join(clean.stdout.split())
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-2000:]
    assert f"{FAMILY_CONTRACT} KEPT" in text and "0 broken" in text

    # in runner/jobs/, a layer of its own: the family contract is the only one it breaks
    (tmp_path / "runner" / "jobs" / "planted.py").write_text("import trainers.scgpt.model\n")
    planted = _lint_imports(tmp_path)
    text = " ".join(planted.stdout.split())
    assert planted.returncode != 0
    assert f"{FAMILY_CONTRACT} BROKEN" in text and "1 broken" in text, text[-3000:]
    assert "runner.jobs.planted -> trainers.scgpt.model" in text

    # the grep a reviewer would run: runner/ names no family package in an import
    imports = re.compile(r"^\s*(import|from)\s+trainers\.(" + "|".join(families.FAMILIES)
                         + r")\b")
    found = subprocess.run(["grep", "-rn", "--include=*.py", "trainers\\.", "runner/"],
                           cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    assert found  # the grep itself works: runner/ does import trainers.family and the manifest
    assert [line for line in found if imports.match(line.split(":", 2)[2])] == []


# --- 2. keys, tasks and families refused before any debit ---------------------------------------

LINEAR, SCGPT, NOPE = "model-linear-by-hand", "model-scgpt-by-hand", "model-nope-by-hand"


@pytest.fixture
def parents(db_url, tmp_path, monkeypatch):
    """A linear, an scGPT and an unknown-family parent (stand-in weights: nothing trains from
    them), CBMC, agent a1 with 10 credits, a one-commit repository as the code to pin."""
    scratch_code_repo(tmp_path, monkeypatch)
    for artifact_id, family, framework in ((LINEAR, "linear", "scikit-learn"),
                                           (SCGPT, "scgpt", "scgpt"), (NOPE, "nope", "pytorch")):
        catalog.register_model(artifact_id=artifact_id, title=artifact_id, created_by="test",
                               metadata={"family": family, "framework": framework})
        stand_in_weights(artifact_id)
    catalog.register_dataset(DATASET, "CBMC", builtin_citation("cbmc"))
    ledger.grant("a1", "10")
    return db_url


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("parent, override, field, family", [
    (LINEAR, "training.max_seq_len=65", "training.max_seq_len", "scgpt"),
    (SCGPT, "training.C=0.5", "training.C", "linear"),
    (LINEAR, "training.n_samples_per_label=5", "training.n_samples_per_label", "scvi"),
])
def test_a_key_of_another_family_is_refused_naming_it(parents, dry_run, parent, override,
                                                      field, family):
    before = movement(parents)
    with pytest.raises(InvalidOverride) as info:
        api.train_model_version(parent, DATASET, None, "a1", overrides=[override],
                                dry_run=dry_run)
    err = info.value
    assert err.field == field and err.details["override"] == override
    assert f"is a setting of family {family}, not of " in err.message, err.message
    assert movement(parents) == before and ledger.balance("a1") == Decimal("10")


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_task_of_another_family_is_refused(parents, dry_run):
    before = movement(parents)
    with pytest.raises(InvalidOverride) as info:
        api.train_model_version(SCGPT, DATASET, None, "a1", overrides=["training=pretrain_scvi"],
                                dry_run=dry_run)
    assert info.value.field == "training.task" and info.value.details["problem"] == "family"
    assert "'pretrain_scvi' is not a task of family scgpt" in info.value.message
    assert movement(parents) == before and ledger.balance("a1") == Decimal("10")


@pytest.mark.parametrize("dry_run", [True, False])
def test_an_unknown_family_is_refused(parents, dry_run):
    before = movement(parents)
    with pytest.raises(ForgeError) as info:
        api.train_model_version(NOPE, DATASET, None, "a1", dry_run=dry_run)
    assert info.value.reason == "unknown_family", info.value.to_dict()
    assert "'nope'" in info.value.message
    assert movement(parents) == before and ledger.balance("a1") == Decimal("10")


def test_the_right_family_keys_would_launch(parents):
    """The control: each parent's own keys pass the same dry run."""
    for parent, override in ((LINEAR, "training.C=0.5"), (SCGPT, "training.max_seq_len=65")):
        result = api.train_model_version(parent, DATASET, None, "a1", overrides=[override],
                                         dry_run=True)
        assert result["config"]["parent"]["family"] == families.get(
            "linear" if parent == LINEAR else "scgpt").name
        key, value = override.removeprefix("training.").split("=")
        assert result["config"]["training"][key] == type(result["config"]["training"][key])(
            value)


# --- 3. what a caller is told -------------------------------------------------------------------

def test_describe_options_and_the_skill_schema_list_every_family(parents):
    import jsonschema

    options = api.describe_options()
    assert set(options["families"]) == set(families.FAMILIES)
    for fam in families.all_families():
        shown = options["families"][fam.name]
        assert shown["training_keys"] == list(fam.training_keys())
        assert set(shown["defaults"]) == set(fam.tasks)
        for task in fam.tasks:
            assert shown["defaults"][task] == json.loads(json.dumps(fam.defaults(task)))
    assert options["families"]["linear"]["defaults"]["finetune_celltype"]["C"] == 1.0
    assert options["families"]["scgpt"]["defaults"]["pretrain_mgm"]["max_seq_len"] == 129
    assert "pretrain_scvi" in options["families"]["scvi"]["tasks"]
    models = {m["id"]: m.get("family") for m in options["artifacts"]["models"]}
    assert models == {LINEAR: "linear", SCGPT: "scgpt", NOPE: "nope"}

    schema = api.TRAIN_SKILL.input_schema
    for fam in families.all_families():
        for task in fam.tasks:
            training = {k: v for k, v in fam.defaults(task).items() if v is not None}
            jsonschema.validate({"parent_artifact_id": LINEAR, "dataset_artifact_id": DATASET,
                                 "agent_id": "a1",
                                 "training_config": {"training": {"task": task, **training}}},
                                schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema does check: not a key at all
        jsonschema.validate({"parent_artifact_id": LINEAR, "dataset_artifact_id": DATASET,
                             "agent_id": "a1", "training_config": {"training": {"Cee": 1}}},
                            schema)


# --- 4. the linear family end to end ------------------------------------------------------------

AGENT = "agent-seam"


def _registry_for_roots(monkeypatch, code: Path) -> None:
    monkeypatch.setenv("FORGE_CODE_REPO", str(code))
    catalog.register_dataset(DATASET, "CBMC CITE-seq", builtin_citation("cbmc"))
    ledger.grant(AGENT, "10")


def train_root(root_id: str, option: str, cap: int = 5) -> dict:
    """Version 1 from scratch, as runner/demo.py ensure_base does: plan, debit, sandbox,
    registration, settlement."""
    plan = prepare(TrainRequest(root_id, DATASET, AGENT, wall_time_cap_min=cap,
                                from_scratch=True, parent_option=option))
    assert not plan.problems, [p.to_dict() for p in plan.problems]
    launch(plan)
    return catalog.get_model_version(root_id)


def _tracking_uri() -> str:
    from runner.config.compose import compose_config, to_plain

    return to_plain(compose_config())["tracking"]["tracking_uri"]


def _test_cells():
    import pandas as pd

    from runner.jobs.datasets import fetch
    from trainers.data.load import load, split_cells

    data = load(fetch("cbmc"), "cbmc_mat")
    split = split_cells(data.n_cells, data.labels, 0.1, 0.1, 0)
    cells = pd.DataFrame(data.rows(split.test).astype("float32"), columns=data.genes)
    truth = [data.label_names[c] for c in data.labels[split.test]]
    return cells, truth


@pytest.mark.slow  # ~50 s on 2 shared cores: three jobs in the jail (root, candidate, gate)
@pytest.mark.sandbox
@pytest.mark.train
def test_linear_trains_registers_and_is_gated(db_url, committed_code, monkeypatch):
    import mlflow

    _registry_for_roots(monkeypatch, committed_code)
    root = train_root("model-linear-seam", "linear_cbmc_base")
    assert root["version_number"] == 1 and root["metadata"]["family"] == "linear"

    result = api.train_model_version(root["id"], DATASET, None, AGENT, wall_time_cap_min=5,
                                     vram_cap_gb=1)
    version = catalog.get_model_version(result["artifact_id"])
    assert result["version_number"] == 2 and result["lifecycle_state"] == "candidate"
    assert version["parent_version_id"] == root["id"]
    assert version["metadata"]["family"] == "linear"
    assert version["metadata"]["framework"] == "scikit-learn"
    metrics = result["eval_metrics"]
    # measured by the host on the held-out cells: exactly the baseline the job refitted
    assert metrics["test_macro_f1"] == metrics["baseline"]["test_macro_f1"]
    assert round(metrics["test_macro_f1"], 4) == 0.9095

    monkeypatch.setenv("MLFLOW_TRACKING_URI", _tracking_uri())
    cells, truth = _test_cells()
    predicted = mlflow.pyfunc.load_model(result["mlflow"]["model_uri"]).predict(cells)
    assert list(predicted.columns) == ["cell_type"] and len(predicted) == len(truth) == 862
    accuracy = sum(p == t for p, t in zip(predicted["cell_type"], truth)) / len(truth)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-9)

    decision = api.evaluate_candidate(result["artifact_id"], AGENT, "default")
    assert decision["decision"] == "rejected", decision["notes"]
    [vs_parent] = [c for c in decision["comparisons"] if c["comparator_role"] == "parent"]
    assert vs_parent["comparator_artifact_id"] == root["id"]
    assert vs_parent["delta"] == 0.0 and vs_parent["ci_low"] == vs_parent["ci_high"] == 0.0
    assert catalog.get_model_version(result["artifact_id"])["lifecycle_state"] == "rejected"


# --- 5. adding a family is a folder -------------------------------------------------------------

FAMILY_DIR = Path(__file__).resolve().parent / "families"
CENTROID_ROOT = "model-centroid-cbmc"
REGISTRY_LINE = '    "centroid": "trainers.centroid.family",\n'

# The host, in a process of its own: the one registry line is in FAMILIES before runner/ is
# imported (as a line in trainers/family.py would be), and trainers.centroid is imported from
# the scratch code repository. It trains v1 from scratch, v2 from it, and gates v2.
CENTROID_HOST = """
import json, sys
import trainers
from trainers import family as families
trainers.__path__.append(sys.argv[1] + "/trainers")
families.FAMILIES["centroid"] = "trainers.centroid.family"

from runner import api
from runner.errors import ForgeError
from runner.jobs.launch import launch
from runner.jobs.plan import TrainRequest, prepare
from runner.registry import catalog
ROOT, DATASET, AGENT = sys.argv[2:5]

def refusal(**kw):
    try:
        api.train_model_version(ROOT, DATASET, None, AGENT, dry_run=True, **kw)
    except ForgeError as exc:
        return exc.to_dict()

plan = prepare(TrainRequest(ROOT, DATASET, AGENT, wall_time_cap_min=5, from_scratch=True,
                            parent_option="centroid_cbmc"))
assert not plan.problems, [p.to_dict() for p in plan.problems]
launch(plan)
dry = api.train_model_version(ROOT, DATASET, None, AGENT, dry_run=True,
                              overrides=["training.distance=cosine"])
result = api.train_model_version(ROOT, DATASET, None, AGENT, wall_time_cap_min=5,
                                 vram_cap_gb=1)
decision = api.evaluate_candidate(result["artifact_id"], AGENT, "default")
options = api.describe_options()["families"]["centroid"]
print(json.dumps({"dry": {"would_launch": dry["would_launch"],
                          "distance": dry["config"]["training"]["distance"]},
                  "result": result, "decision": decision, "options": options,
                  "refused_key": refusal(overrides=["training.C=0.5"]),
                  "refused_choice": refusal(overrides=["training.distance=manhattan"])},
                 default=str))
"""


def centroid_code_repo(tmp_path: Path) -> Path:
    """A code repository for the jail, as tests/helpers.py fake_code_repo makes one: this
    checkout's trainers/, the test family as trainers/centroid/, and its one line in
    trainers/family.py FAMILIES."""
    repo = tmp_path / "centroid-code"
    shutil.copytree(REPO / "trainers", repo / "trainers",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(FAMILY_DIR / "centroid", repo / "trainers" / "centroid",
                    ignore=shutil.ignore_patterns("__pycache__"))
    registry = repo / "trainers" / "family.py"
    text = registry.read_text()
    anchor = '    "linear": "trainers.linear.family",\n'
    assert anchor in text
    registry.write_text(text.replace(anchor, anchor + REGISTRY_LINE))
    for cmd in (["init", "-q"], ["add", "-A"],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "centroid"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True)
    return repo


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_a_family_added_by_its_folder_trains_and_is_gated(sqlite_url, tmp_path, monkeypatch):

    code = centroid_code_repo(tmp_path)
    conf = operator_conf(tmp_path, monkeypatch, "")
    shutil.copy(FAMILY_DIR / "centroid_cbmc.yaml", conf / "parent" / "centroid_cbmc.yaml")
    _registry_for_roots(monkeypatch, code)
    assert "centroid" not in families.FAMILIES  # nothing of it on this side: runner/ untouched

    done = subprocess.run([sys.executable, "-c", CENTROID_HOST, str(code), CENTROID_ROOT,
                           DATASET, AGENT], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])

    root = catalog.get_model_version(CENTROID_ROOT)
    assert root["version_number"] == 1 and root["metadata"]["family"] == "centroid"
    assert out["dry"] == {"would_launch": True, "distance": "cosine"}
    assert out["refused_key"]["field"] == "training.C"
    assert "is a setting of family linear, not of centroid" in out["refused_key"]["message"]
    assert out["refused_choice"]["field"] == "training.distance"
    assert out["options"]["training_keys"] == ["val_fraction", "test_fraction", "split_seed",
                                               "distance"]

    result = out["result"]
    version = catalog.get_model_version(result["artifact_id"])
    assert version["version_number"] == 2 and version["parent_version_id"] == CENTROID_ROOT
    assert version["metadata"]["family"] == "centroid"
    assert version["metadata"]["framework"] == "numpy"
    assert version["version"]["code_commit_sha"] == subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()
    metrics = result["eval_metrics"]
    assert 0.5 < metrics["test_macro_f1"] < metrics["test_accuracy"] < 1.0, metrics

    decision = out["decision"]
    assert decision["decision"] == "rejected", decision["notes"]
    [vs_parent] = [c for c in decision["comparisons"] if c["comparator_role"] == "parent"]
    assert vs_parent["comparator_artifact_id"] == CENTROID_ROOT and vs_parent["delta"] == 0.0
    assert vs_parent["candidate_value"] == pytest.approx(metrics["test_macro_f1"])

    # its MLflow model is the family's own pyfunc, carrying its code: a fresh process that
    # has not imported this checkout's trainers loads it and predicts the test cells
    cells, truth = _test_cells()
    cells.to_pickle(tmp_path / "cells.pkl")
    load = ("import sys, json, mlflow, pandas as pd\n"
            "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
            "print(json.dumps(model.predict(pd.read_pickle(sys.argv[2]))['cell_type'].tolist()))")
    served = subprocess.run([sys.executable, "-c", load, result["mlflow"]["model_uri"],
                             str(tmp_path / "cells.pkl")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "MLFLOW_TRACKING_URI": _tracking_uri()})
    assert served.returncode == 0, served.stderr[-3000:]
    predicted = json.loads(served.stdout.strip().splitlines()[-1])
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-9)
