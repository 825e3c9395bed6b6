"""A trained version in MLflow: reviewable (logged model, dataset input, description, the
registry's version number) and usable (`mlflow.pyfunc.load_model` predicts cell types and
reproduces the recorded test accuracy).

One real tiny fine-tune (SQLite registry, real sandbox, real MLflow store) over every test
cell, then the checks; the rest are small checks of runner/jobs/tracking.py on a scratch store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import AGENT, BASE_ID, DATASET_ID, STAND_IN_TRAINER, fake_code_repo
from test_end_to_end import TINY

from runner.api import train_model_version
from runner.jobs import tracking
from runner.registry import catalog

# Every test cell evaluated: the recorded test accuracy covers what the model predicts here.
# (Four steps of this tiny base predict one or two classes for every cell: the accuracy check
# proves loading, the input columns and the label names, not the per-batch gene draws.)
FULL_TEST = [o for o in TINY if not o.startswith("training.limit_eval_batches=")]


@pytest.mark.slow
@pytest.mark.sandbox
@pytest.mark.train
def test_a_version_is_reviewable_and_loadable_in_mlflow(sqlite_registry, committed_code,
                                                         tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.entities import LoggedModelStatus

    from runner.jobs.datasets import fetch
    from trainers.data.load import load, split_cells

    monkeypatch.setenv("FORGE_CODE_REPO", str(committed_code))
    result = train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                                 vram_cap_gb=1, overrides=FULL_TEST)
    version = catalog.get_model_version(result["artifact_id"])
    uri = version["metadata"]["mlflow"]["tracking_uri"]
    client = tracking.client(uri)
    run = client.get_run(result["mlflow"]["run_id"])

    # The run page: the logged model under "Logged models", the dataset under "Datasets".
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == run.info.run_id and model.status == LoggedModelStatus.READY
    assert model.tags["forge.new_artifact_id"] == result["artifact_id"]
    linked = {m.key: m for m in model.metrics}
    assert linked["test_accuracy"].value == pytest.approx(result["eval_metrics"]["test_accuracy"])
    dataset = catalog.get_artifact(DATASET_ID)
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.name == DATASET_ID == linked["test_accuracy"].dataset_name
    assert inp.dataset.digest == dataset["content_hash"][:tracking.DIGEST_CHARS]
    assert json.loads(inp.dataset.source)["url"] == dataset["origin_url"]
    assert json.loads(inp.dataset.profile)["num_rows"] == 8617
    assert {(t.key, t.value) for t in inp.tags} == {("mlflow.data.context", "training")}
    # The checkpoint went up once, inside the model (its raw scGPT files included).
    assert "checkpoint" not in {a.path for a in client.list_artifacts(run.info.run_id)}
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                         dst_path=str(tmp_path)))
    assert {p.name for p in (model_dir / "artifacts" / "checkpoint").iterdir()} == \
        {"args.json", "vocab.json", "best_model.pt"}
    mlmodel = (model_dir / "MLmodel").stat().st_size
    assert mlmodel < 100_000, mlmodel  # 500 optional gene columns: ~33 KB

    # The version: from the logged model, the registry's number beside MLflow's, described.
    name, number = result["mlflow"]["registered_model"], result["mlflow"]["version"]
    mv = client.get_model_version(name, number)
    assert mv.source == f"models:/{model.model_id}" and mv.run_id == run.info.run_id
    assert mv.model_id in (None, model.model_id)  # the SQL registry store does not keep it
    assert mv.tags["forge.version_number"] == str(result["version_number"]) == "2"
    assert mv.tags["forge.artifact_id"] == result["artifact_id"]
    assert mv.tags["forge.lifecycle_state"] == "candidate"
    cost = result["cost"]
    assert mv.description.startswith(
        f"**{result['artifact_id']}** (registry v2): a `scgpt` model, task `finetune_celltype`, "
        f"fine-tuned from `{BASE_ID} v1` (not tracked in this MLflow store), on dataset "
        f"`{DATASET_ID}`. Host-measured test_macro_f1: ")
    assert run.data.tags[tracking.NOTE_TAG] == mv.description.split("\n")[0]  # the run's note
    assert "not comparable: the parent has no test_macro_f1" in mv.description
    n_test = version["metadata"]["test_cells"]
    assert f"measured by the host on all {n_test} held-out cells" in mv.description
    assert f"actual {cost['actual']}, refunded {cost['refunded']} {cost['currency']}" in \
        mv.description

    # Usable: the registered version predicts the test cells and scores what it recorded.
    recorded = version["metadata"]["split"]  # its seed is training.split_seed's
    data = load(fetch("cbmc"), "cbmc_mat")
    split = split_cells(data.n_cells, data.labels, 0.1, 0.1, recorded["seed"])
    assert split.summary()["sha256"]["test"] == recorded["sha256"]["test"]
    cells = pd.DataFrame(data.rows(split.test), columns=data.genes)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ resolves through the registry
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/{number}")
    predicted = loaded.predict(cells)
    assert list(predicted.columns) == ["cell_type"] and len(predicted) == len(split.test)
    truth = np.asarray(data.label_names)[data.labels[split.test]]
    accuracy = float(np.mean(predicted["cell_type"].to_numpy() == truth))
    assert accuracy == pytest.approx(result["eval_metrics"]["test_accuracy"], abs=0.005)

    # What the eval gate will point at: the champion alias loads the same model.
    client.set_registered_model_alias(name, "champion", number)
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert champion.predict(cells.iloc[:64]).equals(predicted.iloc[:64])


# --- tracking.py on a scratch store ---------------------------------------------------------

def _run(tmp_path, uri: str | None = None):
    client = tracking.client(uri or f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp, run_id = tracking.open_run(client, experiment="review", artifact_root=tmp_path / "art",
                                    run_name="r", tags={}, params={}, config_yaml="a: 1\n")
    return client, exp, run_id


def test_a_checkpoint_that_is_no_classifier_is_logged_as_its_files(scratch_tracking_uri, tmp_path,
                                                                    monkeypatch):
    """A pretrained base (or a trainer without predict.py) gets a logged model holding its
    raw files; the process's tracking URI is left as it was. On a tracking server the files
    go up through the server (mlflow-artifacts:), never to a folder of this host's."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client, exp, run_id = _run(tmp_path, scratch_tracking_uri)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    for name in ("args.json", "vocab.json", "best_model.pt"):
        (checkpoint / name).write_text("{}")
    client.log_metric(run_id, "test_mse", 0.25, step=3)
    logged = tracking.log_model(client, run_id=run_id, experiment_id=exp, checkpoint=checkpoint,
                                vocab=None, code_dir=tmp_path, task="pretrain_mgm",
                                tags={"forge.artifact_id": "x"}, metrics={"test_mse": 0.25})
    model = client.get_logged_model(logged["model_id"])
    assert model.model_type == "scgpt-checkpoint" and model.source_run_id == run_id
    assert [(m.key, m.step) for m in model.metrics] == [("test_mse", 3)]
    assert [m.value for m in client.get_metric_history(run_id, "test_mse")] == [0.25]
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == \
        [logged["model_id"]]
    registered = tracking.register_candidate(client, name="fam", run_id=run_id,
                                             artifact_id="x", model_id=logged["model_id"],
                                             version_number=7)
    mv = client.get_model_version("fam", registered["version"])
    assert mv.source == logged["model_uri"] and mv.tags["forge.version_number"] == "7"
    assert not mlflow.is_tracking_uri_set() and "MLFLOW_TRACKING_URI" not in os.environ
    files = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                tracking_uri=scratch_tracking_uri,
                                                dst_path=str(tmp_path / "download"))
    assert sorted(p.name for p in Path(files).iterdir()) == \
        ["args.json", "best_model.pt", "vocab.json"]
    if tracking.is_server(scratch_tracking_uri):
        assert model.artifact_location.startswith("mlflow-artifacts:/")
        assert not (tmp_path / "art").exists()


def test_vocab_is_read_within_caps_and_must_map_names_to_ids(tmp_path, monkeypatch):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<pad>": 0, "<cls>": 1, "GENE_B": 3, "GENE_A": 2, "<eoc>": 4}))
    assert tracking.read_genes(vocab) == ["GENE_A", "GENE_B"]
    for bad in ('["GENE_A"]', '{"GENE_A": "1"}', '{"GENE_A": true}', "{not json"):
        vocab.write_text(bad)
        with pytest.raises(tracking.VocabError):
            tracking.read_genes(vocab)
    link = tmp_path / "link.json"
    link.symlink_to(vocab)
    with pytest.raises(tracking.VocabError, match="not a plain file"):
        tracking.read_genes(link)
    monkeypatch.setattr(tracking, "MAX_VOCAB_BYTES", 8)
    vocab.write_text('{"GENE_A": 1}')
    with pytest.raises(tracking.VocabError, match="over the 8 allowed"):
        tracking.read_genes(vocab)


def test_a_whole_genome_vocabulary_keeps_the_signature_small():
    small = tracking.cell_type_signature([f"G{i}" for i in range(500)])
    assert len(small.inputs.inputs) == 500 and not any(c.required for c in small.inputs.inputs)
    big = tracking.cell_type_signature([f"G{i}" for i in range(60_697)])
    assert big.inputs is None and big.outputs.input_names() == ["cell_type"]


# --- launches with a stand-in trainer (no predict.py: its checkpoint is logged as files) ----

STAND_IN = STAND_IN_TRAINER.replace("METRICS", '{"test_macro_f1": 0.5, "test_accuracy": 0.6}')


@pytest.mark.sandbox
def test_a_description_that_fails_is_a_warning(sqlite_registry, tmp_path, monkeypatch,
                                               capsys):
    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))

    def broken(*_a, **_k):  # refused by the registry (not an outage, which is kept)
        raise RuntimeError("MLflow went away")

    monkeypatch.setattr(tracking, "describe_version", broken)
    result = train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                                 vram_cap_gb=1, overrides=TINY)
    assert "could not describe the MLflow version: RuntimeError" in capsys.readouterr().err
    version = catalog.get_model_version(result["artifact_id"])
    client = tracking.client(version["metadata"]["mlflow"]["tracking_uri"])
    assert client.get_run(result["mlflow"]["run_id"]).info.status == "FINISHED"
    mv = client.get_model_version(result["mlflow"]["registered_model"],
                                  result["mlflow"]["version"])
    model = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert model.model_type == "scgpt-checkpoint" and not mv.description


@pytest.mark.sandbox
def test_a_failed_registration_deletes_the_logged_model(sqlite_registry, tmp_path, monkeypatch):
    import sqlalchemy as sa
    from mlflow.exceptions import MlflowException

    from runner.errors import RegistrationFailed

    monkeypatch.setenv("FORGE_CODE_REPO", str(fake_code_repo(tmp_path, STAND_IN)))
    logged = []
    real = tracking.log_model

    def log_model(client, **kw):
        model = real(client, **kw)
        assert client.get_logged_model(model["model_id"]).model_id == model["model_id"]
        logged.append((client, model["model_id"]))
        return model

    def broken(*_a, **_k):
        raise sa.exc.IntegrityError("INSERT INTO artifact_links", {}, Exception("refused"))

    monkeypatch.setattr(tracking, "log_model", log_model)
    monkeypatch.setattr(catalog, "_write_links", broken)
    with pytest.raises(RegistrationFailed):
        train_model_version(BASE_ID, DATASET_ID, agent_id=AGENT, wall_time_cap_min=5,
                            vram_cap_gb=1, overrides=TINY)
    [(client, model_id)] = logged
    with pytest.raises(MlflowException, match="not found|does not exist|deleted"):
        client.get_logged_model(model_id)
    assert client.search_model_versions("name='scgpt'") == []


def test_a_dataset_input_raced_by_a_parallel_job_is_still_logged(tmp_path):
    """Parallel sweep jobs log one dataset into one experiment: MLflow's store gets or creates
    the dataset row in two steps, and the loser of the race hits its unique key (seen in CI
    with 8 submitit jobs). The input is logged all the same, never a failed job."""
    from mlflow.exceptions import MlflowException

    client, exp, run_id = _run(tmp_path)
    rival = client.create_run(exp).info.run_id
    dataset = {"id": DATASET_ID, "content_hash": "ab" * 32, "origin_url": "https://x.invalid/d",
               "metadata": {"citation": {"url": "https://x.invalid/d", "row_count": 3}}}

    class Raced:
        """The rival logs the same dataset between our lookup and our insert."""
        calls = 0

        def log_inputs(self, run, datasets):
            Raced.calls += 1
            if Raced.calls == 1:
                client.log_inputs(rival, datasets=datasets)
                raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                      "datasets.experiment_id, datasets.name, datasets.digest")
            return client.log_inputs(run, datasets=datasets)

    tracking.log_dataset_input(Raced(), run_id, dataset)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == [DATASET_ID] and Raced.calls == 2
