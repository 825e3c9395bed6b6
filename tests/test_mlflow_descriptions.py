"""What a reviewer reads in the MLflow UI, checked through MlflowClient on a real store (a
fresh SQLite store, and the session's MLflow server): the experiment's kind (so the UI opens
on its training runs, not the GenAI overview), the run's note, the registered model's and the
version's descriptions with links to the parent's version and run. The browser's view of the
same is in tests/test_review_ui.py."""

from __future__ import annotations

import uuid

from runner.jobs import tracking

KIND = ("mlflow.experimentKind", "custom_model_development")


def _name(prefix: str) -> str:  # the server is shared by the session: names of our own
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_experiments_are_marked_as_model_training(scratch_tracking_uri, tmp_path):
    client = tracking.client(scratch_tracking_uri)
    made = tracking.experiment_id(client, _name("kind-new"), tmp_path / "art")
    assert client.get_experiment(made).tags.get(KIND[0]) == KIND[1]
    # an experiment made before (by MLflow itself, or an older forge) gets the tag on next use
    old_name = _name("kind-old")
    old = client.create_experiment(old_name)
    assert KIND[0] not in client.get_experiment(old).tags
    assert tracking.experiment_id(client, old_name, tmp_path / "art") == old
    assert client.get_experiment(old).tags.get(KIND[0]) == KIND[1]
    # a kind someone chose by hand is theirs
    chosen_name = _name("kind-chosen")
    chosen = client.create_experiment(chosen_name, tags={KIND[0]: "genai_development"})
    tracking.experiment_id(client, chosen_name, tmp_path / "art")
    assert client.get_experiment(chosen).tags[KIND[0]] == "genai_development"


def _parent(uri: str, client, tmp_path) -> dict:
    """A registry version (catalog.get_model_version's shape) with a run and a registered
    version in the store `uri`."""
    exp, run_id = tracking.open_run(client, experiment=_name("descr"),
                                    artifact_root=tmp_path / "art", run_name="parent", tags={},
                                    params={}, config_yaml="a: 1\n", note="the parent")
    family = _name("fam")
    registered = tracking.register_candidate(
        client, name=family, run_id=run_id, artifact_id="fam-parent",
        source=f"runs:/{run_id}/model", version_number=1, lifecycle_state="active")
    return {"id": "fam-parent", "version_number": 1,
            "metadata": {"mlflow": {"experiment_id": exp, "tracking_uri": uri}},
            "version": {"mlflow_run_id": run_id, "mlflow_model_uri": registered["model_uri"]},
            "family": family, "run_id": run_id, "experiment_id": exp,
            "mlflow_version": registered["version"]}


def test_runs_models_and_versions_are_described_with_links_to_the_parent(
        scratch_tracking_uri, tmp_path):
    client = tracking.client(scratch_tracking_uri)
    parent = _parent(scratch_tracking_uri, client, tmp_path)
    family, run_id = parent["family"], parent["run_id"]
    # the run's note (its description in the UI), set when it opens
    assert client.get_run(run_id).data.tags[tracking.NOTE_TAG] == "the parent"
    # the registered model says what it holds, once made
    assert f"Every `{family}` model version" in client.get_registered_model(family).description

    text = tracking.describe(
        artifact_id="fam-child", version_number=2, family=family, task="finetune_celltype",
        dataset_id="dataset-geo-GSE100866", parent=parent, tracking_uri=scratch_tracking_uri,
        metric="test_macro_f1", value=0.8125, test_cells=862)
    ml = "?workflowType=machine_learning"  # the UI's training workflow, not GenAI's
    version_route = f"#/models/{family}/versions/{parent['mlflow_version']}{ml}"
    run_route = f"#/experiments/{parent['experiment_id']}/runs/{run_id}{ml}"
    assert text == (f"**fam-child** (registry v2): a `{family}` model, task `finetune_celltype`, "
                    f"fine-tuned from [fam-parent v1]({version_route}) (its [training run]"
                    f"({run_route})), on dataset `dataset-geo-GSE100866`. Host-measured "
                    "test_macro_f1: 0.8125 on all 862 held-out cells.")
    # the routes are the UI's own: the parent's version and run exist there
    assert client.get_model_version(family, parent["mlflow_version"]).run_id == run_id
    child = tracking.register_candidate(client, name=family, run_id=run_id,
                                        artifact_id="fam-child",
                                        source=f"runs:/{run_id}/model", version_number=2)
    tracking.describe_version(client, family, child["version"], text)
    tracking.describe_run(client, run_id, text)
    assert client.get_model_version(family, child["version"]).description == text
    assert client.get_run(run_id).data.tags[tracking.NOTE_TAG] == text

    # a parent tracked in another store (or in none) is named, never linked
    elsewhere = {**parent, "metadata": {"mlflow": {"experiment_id": "1",
                                                   "tracking_uri": "sqlite:///other.db"}}}
    for other in (elsewhere, {**parent, "metadata": {}}):
        text = tracking.describe(artifact_id="c", version_number=2, family=family,
                                 task="finetune_celltype", dataset_id="d", parent=other,
                                 tracking_uri=scratch_tracking_uri)
        assert "fine-tuned from `fam-parent v1` (not tracked in this MLflow store)" in text
        assert "](#" not in text and "Host-measured" not in text
    root = tracking.describe(artifact_id="r", version_number=1, family=family,
                             task="pretrain_mgm", dataset_id="d", parent=None,
                             tracking_uri=scratch_tracking_uri)
    assert "trained from scratch" in root


def test_a_registered_model_made_before_gets_its_description(scratch_tracking_uri, tmp_path):
    client = tracking.client(scratch_tracking_uri)
    _, run_id = tracking.open_run(client, experiment=_name("descr"),
                                  artifact_root=tmp_path / "art", run_name="r", tags={},
                                  params={}, config_yaml="a: 1\n")
    family = _name("fam")
    client.create_registered_model(family)  # an older forge made it without one
    tracking.register_candidate(client, name=family, run_id=run_id, artifact_id="x",
                                source=f"runs:/{run_id}/model", version_number=1)
    assert client.get_registered_model(family).description == \
        tracking.family_description(family)
