"""The host's MLflow side: params within MLflow's limits, and the live metric relay from the
sandbox-local file store into the host run (real MLflow stores on both sides)."""

from __future__ import annotations

import time

from runner import tracking


def test_flatten_nests_keys_and_cuts_long_values():
    flat = tracking.flatten({"training": {"lr": 0.001, "opt": {"name": "adam"}},
                             "notes": "x" * 10_000})
    assert flat == {"training.lr": "0.001", "training.opt.name": "adam",
                    "notes": "x" * tracking.MAX_PARAM_VALUE}


def test_relay_copies_metrics_while_the_job_runs_and_all_of_them_at_the_end(tmp_path):
    host = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _, run_id = tracking.open_run(host, experiment="relay", artifact_root=tmp_path / "art",
                                  run_name="r", tags={"forge.agent_id": "a"},
                                  params={"training.lr": "0.001"}, config_yaml="a: 1\n")
    store = tmp_path / "out" / "mlruns"
    sandbox = tracking.client(store.as_uri())  # what the trainer writes inside the sandbox
    local_run = sandbox.create_run(sandbox.create_experiment("job")).info.run_id

    with tracking.MetricRelay(host, run_id, store, interval_s=0.2):
        sandbox.log_metric(local_run, "val_loss", 1.0, step=0)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not host.get_metric_history(run_id, "val_loss"):
            time.sleep(0.1)
        live = host.get_metric_history(run_id, "val_loss")
        assert [m.value for m in live] == [1.0]  # visible while the job still runs
        sandbox.log_metric(local_run, "val_loss", 0.5, step=1)
        sandbox.log_metric(local_run, "test_accuracy", 0.9, step=1)
    history = host.get_metric_history(run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]
    assert host.get_run(run_id).data.metrics["test_accuracy"] == 0.9
    assert host.get_run(run_id).data.params == {"training.lr": "0.001"}
