"""The host's MLflow side: params within MLflow's limits, and the live metric relay from the
job's JSON-lines stream into the host run (a real MLflow store)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from runner.jobs import tracking


def test_flatten_nests_keys_and_cuts_long_values():
    flat = tracking.flatten({"training": {"lr": 0.001, "opt": {"name": "adam"}},
                             "notes": "x" * 10_000})
    assert flat == {"training.lr": "0.001", "training.opt.name": "adam",
                    "notes": "x" * tracking.MAX_PARAM_VALUE}


def test_a_tracking_server_is_told_from_a_local_store():
    assert tracking.is_server("http://127.0.0.1:5055")
    assert tracking.is_server("https://mlflow.example.org/")
    for local in ("sqlite:///outputs/mlflow.db", "sqlite:////abs/mlflow.db", "file:///tmp/mlruns",
                  "postgresql+psycopg://postgres@127.0.0.1:5432/mlflow", "/tmp/mlruns"):
        assert not tracking.is_server(local), local


def test_relay_copies_metrics_while_the_job_runs_and_all_of_them_at_the_end(
        scratch_tracking_uri, tmp_path):
    host = tracking.client(scratch_tracking_uri)
    exp, run_id = tracking.open_run(host, experiment="relay", artifact_root=tmp_path / "art",
                                    run_name="r", tags={"forge.agent_id": "a"},
                                    params={"training.lr": "0.001"}, config_yaml="a: 1\n")
    location = host.get_experiment(exp).artifact_location
    if tracking.is_server(scratch_tracking_uri):  # the server keeps the files, not this host
        assert location.startswith("mlflow-artifacts:/") and not (tmp_path / "art").exists()
    else:
        assert location == (tmp_path / "art" / "relay").as_uri()
    config = host.download_artifacts(run_id, "config/resolved.yaml", str(tmp_path))
    assert Path(config).read_text() == "a: 1\n"
    stream = tmp_path / "out" / "metrics.jsonl"  # what the trainer appends inside the sandbox
    stream.parent.mkdir()

    def log(key, value, step):
        with open(stream, "a") as f:
            f.write(json.dumps({"key": key, "value": value, "step": step, "ts": 1000 + step})
                    + "\n")

    warnings: list[str] = []
    with tracking.MetricRelay(host, run_id, stream, interval_s=0.2, warn=warnings.append):
        log("val_loss", 1.0, 0)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not host.get_metric_history(run_id, "val_loss"):
            time.sleep(0.1)
        live = host.get_metric_history(run_id, "val_loss")
        assert [m.value for m in live] == [1.0]  # visible while the job still runs
        log("val_loss", 0.5, 1)
        log("test_accuracy", 0.9, 1)
        with open(stream, "a") as f:
            f.write('{"key": "half a line", "val')  # the job ended mid-write
    history = host.get_metric_history(run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]
    assert host.get_run(run_id).data.metrics["test_accuracy"] == 0.9
    assert host.get_run(run_id).data.params == {"training.lr": "0.001"}
    assert any("not JSON" in w for w in warnings)


def test_relay_skips_what_mlflow_would_refuse(tmp_path):
    host = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, run_id = tracking.open_run(host, experiment="relay", artifact_root=tmp_path / "art",
                                  run_name="r", tags={}, params={}, config_yaml="a: 1\n")
    stream = tmp_path / "metrics.jsonl"
    lines = [{"key": "bad%name", "value": 1.0}, {"key": "../up", "value": 1.0},
             {"key": "loss", "value": "NaN"}, {"key": "loss", "value": True},
             {"key": "loss", "value": 1.0, "step": -1}, [1, 2], {"key": "x" * 251, "value": 1},
             {"key": "loss", "value": 0.25, "step": 3}]
    stream.write_text("".join(json.dumps(x) + "\n" for x in lines) + "[" * 100_000 + "\n")
    warnings: list[str] = []
    relay = tracking.MetricRelay(host, run_id, stream, warn=warnings.append, max_points=10)
    assert relay.sync(final=True) == 1
    assert [(m.key, m.value, m.step) for m in host.get_metric_history(run_id, "loss")] == \
        [("loss", 0.25, 3)]
    assert relay.skipped == 8
    assert any("'bad%name' skipped" in w for w in warnings)
