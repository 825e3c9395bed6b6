"""runner/jobs/plan.py and the one launch path: a frozen request, a typed plan that carries the
rows it read, and the operator's from-scratch base going through the ledger like any job."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import sqlalchemy as sa
from helpers import AGENT, BASE_ID, DATASET_ID, STAND_IN_TRAINER, fake_code_repo

from runner.api import train_model_version
from runner.errors import InvalidInput
from runner.jobs import launch as launch_mod
from runner.jobs.plan import TrainRequest, prepare
from runner.registry import catalog, db, ledger, money, recovery, schema

NEW_BASE = "model-scgpt-test-scratch"


def _request(parent: str = BASE_ID, **kw) -> TrainRequest:
    args = dict(wall_time_cap_min=5, vram_cap_gb=1, allow_dirty=True)
    args.update(kw)
    return TrainRequest(parent, DATASET_ID, AGENT, **args)


def test_a_request_is_frozen(registry):
    req = _request()
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.agent_id = "someone-else"


@pytest.mark.sandbox
def test_the_plan_carries_the_rows_it_read_and_launch_reads_them_no_more(
        registry, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(
        tmp_path, STAND_IN_TRAINER.replace("METRICS", '{"test_macro_f1": 0.5}'))))
    plan = prepare(_request())
    assert plan.problems == []
    assert plan.parent["id"] == BASE_ID and plan.dataset["id"] == DATASET_ID
    assert plan.sandbox["inputs_planned"] == ["manifest.json", "dataset", "parent"]

    reads = []  # reads on their own; registration checks its links inside its transaction
    real = catalog.get_artifact

    def counting(artifact_id, *, conn=None, **kw):
        if conn is None:
            reads.append(artifact_id)
        return real(artifact_id, conn=conn, **kw)

    monkeypatch.setattr(catalog, "get_artifact", counting)
    result = launch_mod.launch(plan)
    assert result["parent_artifact_id"] == BASE_ID
    assert BASE_ID not in reads and DATASET_ID not in reads  # the plan's rows, not a re-read


def test_devices_are_one_job_of_that_many_processes_priced_per_device(registry):
    from runner.config.manifest import build_manifest
    from trainers.manifest import parse_manifest

    one, two = prepare(_request(dry_run=True)), prepare(_request(dry_run=True, devices=2))
    assert two.problems == [] and two.devices == 2
    assert two.estimate == money.estimate(two.price_per_hour, 5, 2) == 2 * one.estimate
    assert two.sandbox["devices"] == 2 and two.sandbox["device"] == "cpu"
    manifest = build_manifest(two.resolved, "run", "cpu", from_parent=True)
    assert manifest["devices"] == 2 and parse_manifest(manifest).devices == 2


def test_more_gpus_than_the_host_has_are_refused_before_any_debit(registry, monkeypatch):
    """A job runs on one host: devices=2 needs two GPUs here (NCCL over the jail's
    loopback); with one it is refused in the plan, typed, before the debit."""
    from runner.jobs import devices
    from runner.sandbox import policy

    monkeypatch.setattr(devices, "gpu_names", lambda: ("NVIDIA H200",))
    plan = prepare(_request(dry_run=True, devices=2))
    assert plan.device.price_key == "h200"
    assert [(p.reason, p.field) for p in plan.problems] == [("device_unavailable", "devices")]
    assert "this host has 1" in str(plan.problems[0])
    monkeypatch.setattr(devices, "gpu_names", lambda: ("NVIDIA H200", "NVIDIA H200"))
    plan = prepare(_request(dry_run=True, devices=2))  # listed, but this host has no nodes
    assert [(p.reason, p.field) for p in plan.problems] == [("gpu_not_visible", "device")]
    nodes = ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    real_glob = policy.glob.glob
    monkeypatch.setattr(policy.glob, "glob", lambda pattern, *a, **k: list(nodes)
                        if pattern == "/dev/nvidia*" else real_glob(pattern, *a, **k))
    assert prepare(_request(dry_run=True, devices=2)).problems == []


def test_callers_cannot_train_from_scratch(registry):
    with pytest.raises(InvalidInput) as err:
        train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, dry_run=True,
                            from_scratch=True)
    assert err.value.field == "from_scratch"


def test_from_scratch_refuses_an_id_that_is_taken(registry):
    plan = prepare(_request(from_scratch=True, dry_run=True))
    assert [p.reason for p in plan.problems] == ["conflict"]
    assert plan.problems[0].field == "parent_artifact_id"


@pytest.mark.sandbox
def test_from_scratch_is_debited_registered_as_a_root_and_settled(registry, tmp_path,
                                                                  monkeypatch):
    """The demo's base: the same plan -> debit -> sandbox -> registration -> settlement as a
    fine-tune, but with no parent input and a root version (active, latest, no parent link)."""
    trainer = textwrap.dedent(STAND_IN_TRAINER).replace(
        "METRICS", '{"test_mse": 0.25}') + textwrap.dedent("""
        assert m["parent"] is None, m["parent"]
        import os
        assert not os.path.exists("/job/in/parent")
    """)
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, trainer)))
    before = ledger.balance(AGENT)
    plan = prepare(_request(parent=NEW_BASE, from_scratch=True,
                            overrides=("training=pretrain_mgm",)))
    assert plan.problems == [] and plan.parent is None
    assert plan.sandbox["inputs_planned"] == ["manifest.json", "dataset"]
    result = launch_mod.launch(plan)

    assert result["artifact_id"] == NEW_BASE and result["parent_artifact_id"] is None
    assert result["version_number"] == 1 and result["lifecycle_state"] == "active"
    assert ledger.balance(AGENT) == before - money.to_amount(result["cost"]["actual"])
    with db.get_engine(registry).connect() as conn:
        alloc = conn.execute(sa.select(schema.resource_allocations)).mappings().one()
    assert alloc["status"] == "settled" and alloc["artifact_id"] == NEW_BASE
    assert {link["link_type"] for link in catalog.links(NEW_BASE)} == {"trained_on"}
    assert recovery.check() == []

    from runner.jobs import tracking

    client = tracking.client(plan.resolved["tracking"]["tracking_uri"])
    version = client.get_model_version(result["mlflow"]["registered_model"],
                                       result["mlflow"]["version"])
    assert version.tags["forge.lifecycle_state"] == "active"
    assert "forge.parent_artifact_id" not in client.get_run(result["mlflow"]["run_id"]).data.tags
