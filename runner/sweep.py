"""Sweeps: `forge-train -m ...` through Hydra's sweepers and launchers.

Each job of a sweep is one train_model_version() call with its own allocation. This Hydra
callback adds what a sweep needs around the jobs:

- a budget gate before any job starts (the summed estimate of every job against the agent's
  balance; the caller's `fit_budget=true` runs the jobs that fit, in order, and records the
  rest),
- one code pin for the whole sweep: every job runs the commit that was HEAD when the sweep
  started, whatever is committed meanwhile; a dirty tree without allow_dirty is refused
  before any job (with allow_dirty each job pins the tree as it finds it),
- one MLflow parent run that every job's run nests under,
- a summary table at the end (job, overrides, status, target metric, cost, artifact id),
  read from the `forge_job.json` each job leaves in its own directory.

Through a SLURM launcher (forge_slurm, or a cluster's file over it) the sweep also checks,
before any job, that the partition's nodes can run the array at all (an `Unschedulable`
refusal, in the dry run too), and watches the array with runner.jobs.slurm_watch: a task
that ends without a result (cancelled while pending, lost with its node, pending forever) is
`cancelled` or `lost` in the summary, and the sweep returns.

Re-running a sweep skips completed jobs (same request key: the earlier result comes back)
and retries failed ones.
"""

from __future__ import annotations

import itertools
import json
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from runner.config import launchers
from runner.config.compose import CONFIG_NAME
from runner.errors import BudgetExceeded, CodePinError, ForgeError, InvalidOverride
from runner.jobs import codepin, devices, slurm_watch, tracking
from runner.registry import ledger, money

SWEEP_FILE = "forge_sweep.json"


class SweepRefused(BaseException):
    """Stops a sweep before any job starts. Hydra turns an Exception raised in a callback
    into a warning and carries on, so the refusal travels as a BaseException carrying the
    typed error; forge-train reports that error and exits 2."""

    def __init__(self, error) -> None:
        super().__init__(str(error))
        self.error = error
JOB_FILE = "forge_job.json"
GONE_DIR = ".slurm"  # <sweep dir>/.slurm/<job>/forge_job.json: tasks SLURM ended unfinished


def expand_jobs(config) -> list[list[str]]:
    """The override list of every job the basic sweeper will launch, in its order: the
    cartesian product of each key's values, the first key slowest (as Hydra's BasicSweeper
    does; built on the public override parser, not its internals). Only discrete sweeps
    reach here: the basic sweeper refuses the others before any job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = config.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    choices: dict[str, list[str]] = {}  # a key given twice keeps its place, last value wins
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        values = (override.sweep_string_iterator() if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        choices[key] = [f"{key}={value}" for value in values]
    return [list(job) for job in itertools.product(*choices.values())]


def n_trials(config) -> int | None:
    """Optuna and other sweepers say how many trials they run; None for the basic sweeper."""
    return config.hydra.sweeper.get("n_trials")


class JobEstimate(NamedTuple):
    amount: Decimal
    currency: str
    agent: str | None
    host_minutes: int  # the job's wall-time cap + the registry's expiry margin


def job_estimate(overrides: list[str]) -> JobEstimate:
    """What one job will cost and how long its host may run, from its composed config alone."""
    from hydra import compose

    # Called inside the running Hydra app, whose config search path is already set up.
    composed = compose(config_name=CONFIG_NAME, overrides=overrides)
    cfg = OmegaConf.to_container(composed, resolve=True)
    _, price, _ = devices.priced(cfg)  # the device and price the job itself will get
    amount = money.estimate(price, cfg["wall_time_cap_min"], cfg["devices"])
    return JobEstimate(amount, cfg["pricing"]["currency"], cfg["agent_id"],
                       int(cfg["wall_time_cap_min"]) + int(cfg["registry"]["expiry_margin_min"]))


def check_scheduler_time(config, estimates: list[JobEstimate]) -> None:
    """A submitit launcher kills a job at its `timeout_min` (SLURM's --time for the whole
    array, forge_slurm's resolved from the sweep's own config; submitit_local's own, 60 min
    by default): a job that may outlive it would be cut short. Refused before any job."""
    timeout = config.hydra.launcher.get("timeout_min")
    longest = max((e.host_minutes for e in estimates), default=0)
    if timeout is not None and longest > int(timeout):
        raise SweepRefused(InvalidOverride(
            f"a job of this sweep may run {longest} min (its wall_time_cap_min + the expiry "
            f"margin), past the launcher's timeout_min (SLURM's --time) of {timeout} min",
            field="wall_time_cap_min", problem="scheduler_time",
            fix=f"give every job a wall_time_cap_min whose sum with the margin fits {timeout} "
                "min, or run the longer jobs as a sweep of their own"))


# Each sweep's outcomes, as this process ended them: forge-train's exit code reads them (a
# SLURM array's jobs return their codes on their nodes, and a task gone without a result
# returns none).
ENDED: list[list[dict]] = []

class SweepCallback(Callback):
    def __init__(self, summary_file: str = "summary.json") -> None:
        self.fit_budget = False  # the sweep's `fit_budget` key, read when it starts
        self.summary_file = summary_file
        self.parent_run_id: str | None = None
        self._watcher = None  # submitit's, while the sweep's own watches a SLURM array

    # --- before any job -------------------------------------------------------------------

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        console = Console(stderr=True)
        self.fit_budget = bool(config.fit_budget)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        trials = n_trials(config)
        if trials:
            base = list(config.hydra.overrides.task)
            jobs = [base] * int(trials)
        else:
            jobs = expand_jobs(config)
        estimates = [job_estimate(job) for job in jobs]
        check_scheduler_time(config, estimates)
        if launchers.is_slurm(config.hydra.launcher):
            try:  # the dry run too: nothing would ever run it
                launchers.check_schedulable(config.hydra.launcher)
            except ForgeError as exc:
                raise SweepRefused(exc) from exc
        total = sum((e.amount for e in estimates), Decimal(0))
        currency = estimates[0].currency if estimates else "credits"
        agent = config.agent_id
        console.print(f"[bold]sweep[/]: {len(jobs)} jobs, total estimate {total} {currency}"
                      f"{' (dry run)' if config.dry_run else ''}")
        if not config.dry_run and agent is not None:
            have = ledger.balance(agent)
            if total > have and not self.fit_budget:
                raise SweepRefused(BudgetExceeded(
                    f"sweep needs {total} {currency} for {len(jobs)} jobs; agent {agent!r} has "
                    f"{have}", field="agent_id", needed=str(total), balance=str(have),
                    fix="grant more credits, shrink the sweep, or add fit_budget=true to run "
                        "the jobs that fit"))
        code_commit = None
        if not config.dry_run:
            code_commit = _pin_sweep_code(bool(config.allow_dirty))
            self.parent_run_id = _open_parent_run(config, jobs)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({
            "parent_run_id": self.parent_run_id, "code_commit": code_commit, "jobs": jobs,
            "total_estimate": str(total), "currency": currency, "fit_budget": self.fit_budget},
            indent=2))
        if launchers.is_slurm(config.hydra.launcher):
            def gone(job: int | None, overrides: list[str], status: str, why: str) -> None:
                num = -1 if job is None else job
                write_job_outcome(sweep_dir / GONE_DIR / str(num), {
                    "job": num, "overrides": overrides, "status": status, "error": why,
                    "reason": status})

            self._watcher = slurm_watch.install(config.hydra.launcher.submitit_folder, gone)

    # --- after every job ------------------------------------------------------------------

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self._watcher is not None:
            slurm_watch.restore(self._watcher)
        sweep_dir = Path(config.hydra.sweep.dir)
        outcomes = collect(sweep_dir)
        print_summary(outcomes, dry_run=bool(config.dry_run))
        ENDED.append(outcomes)
        (sweep_dir / self.summary_file).write_text(json.dumps(outcomes, indent=2, default=str))
        if self.parent_run_id:
            client = tracking.client(config.tracking.tracking_uri)
            client.log_dict(self.parent_run_id, outcomes, "sweep_summary.json")
            ok = sum(o["status"] == "ok" for o in outcomes)
            client.set_tag(self.parent_run_id, "forge.sweep.ok", str(ok))
            client.set_tag(self.parent_run_id, "forge.sweep.failed", str(len(outcomes) - ok))
            tracking.finish(client, self.parent_run_id, ok=ok == len(outcomes),
                            reason="ok" if ok == len(outcomes) else "partial_failure")


def _pin_sweep_code(allow_dirty: bool) -> str | None:
    """HEAD's sha for every job; None when the tree is dirty and allowed (jobs pin it)."""
    try:
        pin = codepin.pin_code()
    except CodePinError as exc:
        raise SweepRefused(exc) from exc
    if pin.dirty and not allow_dirty:
        raise SweepRefused(codepin.dirty_error(pin))
    return None if pin.dirty else pin.sha


def _open_parent_run(config, jobs: list[list[str]]) -> str:
    track = config.tracking
    client = tracking.client(track.tracking_uri)
    exp_id = tracking.experiment_id(client, track.experiment_name, Path(track.artifact_root))
    run = client.create_run(exp_id, run_name=f"sweep-{Path(config.hydra.sweep.dir).name}",
                            tags={"forge.sweep": "true", "forge.agent_id": str(config.agent_id),
                                  "forge.sweep.jobs": str(len(jobs))})
    client.log_dict(run.info.run_id, {"jobs": jobs}, "sweep_jobs.json")
    return run.info.run_id


def sweep_record(sweep_dir: str | Path) -> dict:
    """What on_multirun_start wrote for the jobs: parent_run_id, code_commit, jobs, ..."""
    path = Path(sweep_dir) / SWEEP_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_job_outcome(job_dir: str | Path, outcome: dict) -> None:
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    (Path(job_dir) / JOB_FILE).write_text(json.dumps(outcome, indent=2, default=str))


def collect(sweep_dir: Path) -> list[dict]:
    """Every job's outcome; a job's own record wins over the watcher's (GONE_DIR) for it."""
    outcomes: dict[int, dict] = {}
    for path in sorted(sweep_dir.rglob(JOB_FILE), key=lambda p: GONE_DIR not in p.parts):
        outcome = json.loads(path.read_text())
        outcomes[int(outcome.get("job", 0))] = outcome
    return [outcomes[job] for job in sorted(outcomes)]


def print_summary(outcomes: list[dict], dry_run: bool) -> None:
    table = Table(title="sweep dry run" if dry_run else "sweep summary")
    for column in ("job", "overrides", "status", "metric", "cost", "artifact"):
        table.add_column(column, overflow="fold")
    total = Decimal(0)
    for o in outcomes:
        cost = o.get("cost")
        if cost is not None:
            total += Decimal(str(cost))
        metric = o.get("metric")
        table.add_row(str(o.get("job")), " ".join(o.get("overrides", [])), o["status"],
                      "" if metric is None else f"{o.get('metric_name')}={metric:.4f}",
                      "" if cost is None else str(cost), o.get("artifact_id") or o.get("error", ""))
    table.caption = f"total {'estimate' if dry_run else 'cost'}: {total}"
    Console(stderr=False, width=160).print(table)
