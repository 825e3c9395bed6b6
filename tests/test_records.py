"""Every record tells the truth, the seed's own call works, a fresh clone plans on its defaults.

Real registry (SQLite and PostgreSQL), real bwrap, real MLflow store; stand-in trainers in a
scratch git repository where the trainer itself is not what is under test.
"""

from __future__ import annotations

import hashlib
import subprocess
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import (
    AGENT,
    BASE_ID,
    DATASET_ID,
    STAND_IN_TRAINER,
    cbmc_split,
    fake_code_repo,
    operator_conf,
    seed_registry,
)

from runner.api import train_model_version
from runner.errors import TrainingFailed
from runner.jobs import codepin, tracking, weights
from runner.registry import catalog, db, ledger, recovery, schema

TINY = dict(agent_id=AGENT, wall_time_cap_min=5, vram_cap_gb=1)


def trainer(metrics: str, right: float = 1.0) -> str:
    """A stand-in trainer that claims METRICS and predicts the first `right` (a fraction) of
    the held-out cells right, which the host measures."""
    return STAND_IN_TRAINER.replace("METRICS", metrics).replace("RIGHT = 1.0",
                                                                f"RIGHT = {right}")


def rows(url: str, table: sa.Table) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(table)).mappings()]


# --- the seed's own call --------------------------------------------------------------------------

def test_seed_call_positional_agent_and_flat_training_config(registry, committed_code,
                                                             monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    result = train_model_version(BASE_ID, DATASET_ID, {"lr": 1e-4}, AGENT, dry_run=True)
    assert result["would_launch"], result["reasons"]
    assert result["agent_id"] == AGENT
    assert result["config"]["training"]["lr"] == pytest.approx(1e-4)
    # forge db upgrade registered the skill: the audit row links to it
    call = rows(registry, schema.tool_calls)[-1]
    assert call["skill_id"] == "skill-train-model-version" and call["agent_id"] == AGENT


# --- parallel candidates in MLflow ----------------------------------------------------------------

REGISTER = """
import sys, time
from runner.jobs import codepin, tracking
uri, run_id, i, at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
client = tracking.client(uri)
time.sleep(max(0.0, at - time.time()))  # all processes register at the same instant
tracking.register_candidate(client, name="scgpt-race", run_id=run_id,
                            source=f"runs:/{run_id}/checkpoint", artifact_id=f"scgpt-{i}")
"""


@pytest.mark.sandbox
def test_parallel_candidates_register_without_racing(tmp_path):
    """Eight sweep jobs, eight processes, one MLflow store: every candidate registers."""
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = client.create_experiment("race", artifact_location=(tmp_path / "art").as_uri())
    client.create_registered_model("scgpt-race")
    runs = [client.create_run(exp).info.run_id for _ in range(8)]
    at = time.time() + 8  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, uri, run_id, str(i), str(at)],
                              stderr=subprocess.PIPE, text=True)
             for i, run_id in enumerate(runs)]
    errors = [p.communicate(timeout=120)[1] for p in procs if p.wait(timeout=120) != 0]
    assert errors == []
    versions = client.search_model_versions("name='scgpt-race'")
    assert len({v.version for v in versions}) == 8
    assert {v.tags["forge.lifecycle_state"] for v in versions} == {"candidate"}
    assert sorted(v.tags["forge.artifact_id"] for v in versions) == \
        sorted(f"scgpt-{i}" for i in range(8))


# --- metrics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("metrics", ['{"test_macro_f1": 1e300, "test_accuracy": 0.5}',
                                     '{"test_macro_f1": 0.5, "test_loss": -1.0}'])
@pytest.mark.sandbox
def test_impossible_metrics_fail_typed_and_settle(registry, tmp_path, monkeypatch, metrics):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, trainer(metrics))))
    with pytest.raises(TrainingFailed) as err:
        train_model_version(BASE_ID, DATASET_ID, **TINY)
    assert err.value.reason == "metric_out_of_range"
    [alloc] = rows(registry, schema.resource_allocations)
    assert alloc["status"] == "failed" and recovery.check() == []
    assert [a["id"] for a in catalog.list_artifacts("model")] == [BASE_ID]


@pytest.mark.sandbox
def test_a_trained_version_records_the_truth(registry, tmp_path, monkeypatch):
    """Own metrics apart from baseline and curves; magnitude against the parent on the same
    split, else null with a reason; base_model_id is the root; the device's price; the diff
    of a dirty tree kept with its sha256."""
    metrics = ('{"test_macro_f1": 0.99, "test_accuracy": 0.99, "test_loss": 0.4, '
               '"baseline_test_macro_f1": 0.6, "baseline_test_accuracy": 0.7, '
               '"val_macro_f1": 0.75, "train_loss": 0.3, "epochs_trained": 2.0}')
    repo = fake_code_repo(tmp_path, trainer(metrics, right=0.70))
    monkeypatch.setenv("FORGE_CODE_REPO", str(repo))
    first = train_model_version(BASE_ID, DATASET_ID, **TINY)

    # The test metrics are the host's scores of the predictions of every held-out cell (70%
    # right), the baseline the host's own; the job's test claims are not recorded.
    own = catalog.get_model_version(first["artifact_id"])["version"]["eval_metrics_json"]
    n_test = cbmc_split()["counts"]["test"]
    assert own["test_accuracy"] == pytest.approx(round(0.70 * n_test) / n_test)
    assert 0 < own["test_macro_f1"] < 0.9 and "test_loss" not in own
    assert own["baseline"]["test_macro_f1"] == pytest.approx(0.9095, abs=1e-4)
    assert own["training"] == {"val_macro_f1": 0.75, "train_loss": 0.3, "epochs_trained": 2.0}
    [wmi] = rows(registry, schema.world_model_improvements)
    assert wmi["magnitude"] is None  # the base reports no macro-F1: nothing to compare with
    assert wmi["detection_metadata"]["magnitude_reason"] == "the parent has no test_macro_f1"

    # The candidate fine-tuned again, from a dirty tree, on the same held-out cells.
    (repo / "trainers" / "entrypoint.py").write_text(textwrap.dedent(trainer(metrics, 0.80)))
    (repo / "notes.txt").write_text("an untracked file\n")  # not part of what runs
    second = train_model_version(first["artifact_id"], DATASET_ID, **TINY, allow_dirty=True)
    better = catalog.get_model_version(second["artifact_id"])["version"]["eval_metrics_json"]
    wmi = {w["target_artifact_id"]: w for w in rows(registry, schema.world_model_improvements)}
    gain = wmi[second["artifact_id"]]
    assert gain["magnitude"] == pytest.approx(better["test_macro_f1"] - own["test_macro_f1"])
    assert gain["magnitude"] > 0
    assert gain["detection_metadata"]["parent_value"] == pytest.approx(own["test_macro_f1"])

    model = catalog.get_model_version(second["artifact_id"])
    assert model["version"]["base_model_id"] == BASE_ID  # the root, not the parent
    diff = model["metadata"]["code_diff"]
    kept = weights.version_dir(second["artifact_id"]) / diff["artifact"]
    patch = kept.read_bytes()
    assert hashlib.sha256(patch).hexdigest() == diff["sha256"]
    assert b"notes.txt" not in patch and b"RIGHT = 0.8" in patch
    assert diff["sha256"] == codepin.pin_code(repo).diff_sha256  # the pin's digest is the patch's
    applied = tmp_path / "applied"
    subprocess.run(["git", "clone", "-q", str(repo), str(applied)], check=True)
    subprocess.run(["git", "apply", str(kept)], cwd=applied, check=True)
    assert not (applied / "notes.txt").exists()
    assert (applied / "trainers" / "entrypoint.py").read_bytes() == \
        (repo / "trainers" / "entrypoint.py").read_bytes()
    client = tracking.client(_tracking_uri())
    logged = [a.path for a in client.list_artifacts(second["mlflow"]["run_id"], "code")]
    assert logged == ["code/code.diff"]

    alloc = ledger.get_allocation(second["gpu_allocation_id"])
    assert (alloc["device"], alloc["resource_type"]) == ("cpu", "cpu")


def _tracking_uri() -> str:
    from runner.config.compose import compose_config, to_plain

    return to_plain(compose_config())["tracking"]["tracking_uri"]


# --- money follows the hardware -------------------------------------------------------------------

def test_auto_is_priced_as_the_device_the_job_gets(registry, committed_code, tmp_path,
                                                    monkeypatch):
    operator_conf(tmp_path, monkeypatch,
                  "pricing:\n  price_per_hour: 9.0\n  per_device:\n    cpu: 0.25\n")
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    result = train_model_version(BASE_ID, DATASET_ID, {"lr": 1e-4}, AGENT, 60, dry_run=True)
    assert result["estimate"]["device"] == "cpu"  # this host has no GPU
    assert Decimal(result["estimate"]["price_per_hour"]) == Decimal("0.25")
    assert Decimal(result["estimate"]["amount"]) == Decimal("0.25")


def test_gpu_names_map_to_price_rows():
    from runner.jobs.devices import price_key_for

    table = {"cpu": 0.5, "h100": 2.5, "h200": 3.0, "a100-80gb": 2.0}
    assert price_key_for("NVIDIA H200", table) == "h200"
    assert price_key_for("NVIDIA H100 80GB HBM3", table) == "h100"
    assert price_key_for("NVIDIA A100-80GB PCIe", table) == "a100-80gb"
    assert price_key_for("NVIDIA GeForce RTX 4090", table) is None


# --- the data is what the registry says -----------------------------------------------------------

def test_a_source_that_does_not_hold_the_artifacts_data_is_refused(registry, committed_code,
                                                                  monkeypatch):
    from runner.jobs.datasets import builtin_citation

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    catalog.register_dataset("dataset-cbmc-mislabelled", "CBMC, said to load as PBMC",
                             builtin_citation("cbmc"),
                             metadata={"loader": {"source": "pbmc68k_reduced", "format": "h5ad",
                                                  "label_key": "bulk_labels"}})
    result = train_model_version(BASE_ID, "dataset-cbmc-mislabelled", None, AGENT, dry_run=True)
    assert not result["would_launch"]
    assert [r["reason"] for r in result["reasons"]] == ["dataset_mismatch"]


# --- a fresh clone plans on its defaults ----------------------------------------------------------

def test_fresh_clone_with_nothing_set_would_launch(committed_code, base_checkpoint,
                                                   monkeypatch):
    """FORGE_HOME defaults to ./outputs, inside the clone: the job must see a snapshot of the
    code, never the tree that holds the registry DB and the tracking store."""
    for name in ("FORGE_HOME", "FORGE_DB_URL", "FORGE_CACHE_DIR", "FORGE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(committed_code)
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    db._engine.cache_clear()
    try:
        db.upgrade()
        seed_registry(base_checkpoint)
        result = train_model_version(BASE_ID, DATASET_ID, {"max_epochs": 1}, AGENT,
                                     dry_run=True, verbose=True)
    finally:
        db._engine.cache_clear()
    assert result["would_launch"], result["reasons"]
    home = (committed_code / "outputs").resolve()
    code = Path(result["sandbox"]["binds"][[b["sandbox"] for b in result["sandbox"]["binds"]]
                                           .index("/job/code")]["host"])
    assert code.is_relative_to(home / "cache" / "code")
    assert not any(Path(b["host"]) in (committed_code, home)
                   for b in result["sandbox"]["binds"])


def test_a_registry_error_right_after_the_debit_is_typed_and_refunded(registry, tmp_path,
                                                                      monkeypatch):
    """The job never starts when the registry fails between the debit and the launch (its
    first write after the debit marks the allocation running): the caller gets a typed error
    and the whole debit back, at once, not from the reaper."""
    from runner.errors import ForgeError

    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, trainer("{}"))))

    def away(*_a, **_k):
        raise sa.exc.OperationalError("UPDATE resource_allocations", {},
                                      Exception("server closed"))

    monkeypatch.setattr(ledger, "mark_running", away)
    balance = ledger.balance(AGENT)
    with pytest.raises(ForgeError) as err:
        train_model_version(BASE_ID, DATASET_ID, **TINY)
    assert err.value.reason == "registry_unavailable"
    [alloc] = rows(registry, schema.resource_allocations)
    assert alloc["status"] == "failed" and alloc["refunded"] == alloc["debited"]
    assert ledger.balance(AGENT) == balance and recovery.check() == []


def test_an_unexpected_host_error_mid_launch_is_typed_and_settled(registry, tmp_path,
                                                                  monkeypatch):
    from runner.errors import InternalError

    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, trainer("{}"))))

    def broken(*_a, **_k):
        raise ValueError("a library bug")

    monkeypatch.setattr(tracking, "open_run", broken)
    with pytest.raises(InternalError) as err:
        train_model_version(BASE_ID, DATASET_ID, **TINY)
    assert err.value.reason == "internal_error" and "a library bug" in str(err.value)
    [alloc] = rows(registry, schema.resource_allocations)
    assert alloc["status"] == "failed" and recovery.check() == []


def test_a_relative_artifact_root_is_the_cwds(tmp_path, monkeypatch):
    """FORGE_HOME unset, a forge.toml here (home = "outputs"): the tracking config names
    ./outputs/mlartifacts."""
    monkeypatch.delenv("FORGE_HOME", raising=False)
    (tmp_path / "forge.toml").write_text('home = "outputs"\n')
    monkeypatch.chdir(tmp_path)
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(client, "rel", Path("outputs/mlartifacts"))
    location = client.get_experiment(exp).artifact_location
    assert location == (tmp_path / "outputs" / "mlartifacts" / "rel").as_uri()


def test_the_dry_run_plans_the_operators_sandbox_caps(registry, committed_code, tmp_path,
                                                      monkeypatch):
    """The plan is built by the same job builder as the launch, so it shows the caps the job
    will really get, not the sandbox's built-in defaults."""
    operator_conf(tmp_path, monkeypatch, "sandbox:\n  max_memory_gb: 3\n  max_output_gb: 2\n")
    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    caps = train_model_version(BASE_ID, DATASET_ID, None, AGENT, dry_run=True)["sandbox"]["caps"]
    assert caps["memory"]["bytes"] == 3 * 1024**3
    assert caps["output"]["bytes"] == 2 * 1024**3
