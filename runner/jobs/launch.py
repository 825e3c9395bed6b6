"""The real launch of a `Plan` (runner/jobs/plan.py) whose checks passed: reserve -> inputs
-> MLflow run -> sandbox -> post-run hook -> settle. Every exit path settles the allocation
exactly once and leaves the MLflow run FINISHED or FAILED with its reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import shutil
import sys
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from omegaconf import OmegaConf

from runner import sandbox, settings
from runner.config.manifest import ENTRYPOINT, build_manifest
from runner.errors import (
    Conflict,
    ForgeError,
    InternalError,
    JobCancelled,
    RegistrationFailed,
)
from runner.jobs import (
    codepin,
    engine,
    external_code,
    handback,
    hook,
    intents,
    parents,
    recovery,
    tracking,
    truth,
    weights,
)
from runner.jobs.job import (
    DiskFull,
    clean_run_dir,
    dataset_input,
    disk_problem,
    run_dir,
    sandbox_job,
)
from runner.jobs.plan import Plan
from runner.registry import capacity, catalog, db, ledger
from runner.registry.recovery import Heartbeat, settle_retrying
from trainers import family as families
from trainers.manifest import FINETUNE, PRIMARY_METRIC

RUN_OUTPUTS = ("result.json", "confusion_matrix.png", "learning_curves.png")
# allow_dirty's patch: its name in the run dir, in the version's folder, under the run's code/
CODE_DIFF = "code.diff"
# A fine-tune's test metrics, per-class F1 and baseline: measured on the host (truth.py)
HOST_MEASURED = ("test_", "baseline_test_")


def launch(plan: Plan, *, on_line: Callable[[str], None] | None = None,
           allocation: dict | None = None) -> dict:
    """Run a planned request whose dry-run checks passed to a registered version.
    `allocation`: the one `reserve(plan)` made when the job was submitted (runner/jobs/
    background.py); without it, the launch reserves (debits) now."""
    if allocation is None:
        problem = disk_problem(plan.resolved)  # before any debit: a full disk fails it late
        if problem is not None:
            raise problem
        tracking.prepare_store(plan.resolved["tracking"]["tracking_uri"])  # a broken one: no debit
        recovery.reap()  # dead jobs first: their credits count, their retries may run
        alloc = reserve(plan, engine.current())  # the SLURM job this process runs in, if any
        if alloc.get("existing"):
            return _earlier(alloc, links(plan.resolved["tracking"]))
    else:
        alloc = allocation

    job = _Job(plan, alloc, on_line)  # names only: nothing here can fail after the debit
    external = None if plan.external is None else plan.external.family  # the plan's own card
    try:
        with engine.stop_on_sigterm(job.stop, on_line), families.external_scope(external):
            result = job.run()  # scancel: cancelled, not killed
    except BaseException as exc:
        clean_run_dir(job.run_dir)  # first: a full disk gets its space back for the rest
        job.fail(exc)  # settled once, whatever went wrong; then the caller gets a type
        typed = _typed(exc, job.run_dir)
        if typed is exc:
            raise
        raise typed from exc
    clean_run_dir(job.run_dir)
    return result


def reserve(plan: Plan, scheduled: engine.EngineJob | None = None, *,
            on_this_host: bool = True) -> dict:
    """Check the capacity limits and the balance and debit the plan's estimate: its
    allocation (`existing` when the same request already holds one). `scheduled`: the
    scheduler job the host side runs in. The host's limits apply to a job this host runs
    and places itself: not to one queued on SLURM (`on_this_host` False) nor to one inside a
    SLURM job, which SLURM placed by its own resources; the agent's limit applies to all."""
    resolved = plan.resolved
    return ledger.reserve(
        plan.agent_id, plan.estimate, plan.request_key,
        wall_time_cap_min=resolved["wall_time_cap_min"], vram_cap_gb=resolved["vram_cap_gb"],
        price_per_hour=plan.price_per_hour, devices=plan.devices, device=plan.device.price_key,
        resource_type=plan.device.resource_type, currency=plan.currency,
        margin_s=resolved["registry"]["expiry_margin_min"] * 60,
        engine=scheduled.engine if scheduled else None,
        engine_job_id=scheduled.job_id if scheduled else None,
        limits=capacity.limits(resolved, on_this_host=on_this_host and scheduled is None))


def _typed(exc: BaseException, job_dir: Path) -> BaseException:
    """What the caller gets for a failed, settled launch: a ForgeError as it is; a full disk,
    a registry gone away, or any other host error, typed; an interrupt as it is."""
    if isinstance(exc, ForgeError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"the disk filled up during the job: {exc.strerror}",
                        field="registry.min_free_gb", fix="free space under FORGE_HOME, then retry")
    if db.unavailable(exc) is not None:
        return RegistrationFailed(
            f"the registry went away during the launch: {_first_line(exc)}",
            reason="registry_unavailable",
            fix="the allocation is settled (refunded for what did not run); check the "
                "registry database, then retry")
    return InternalError(f"the launch failed on the host: {type(exc).__name__}: "
                         f"{_first_line(exc)}",
                         fix="the allocation is settled; report this with the job log "
                             f"{job_dir / 'job.log'}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _earlier(alloc: dict, urls: dict) -> dict:
    """The same request again: return what it produced; never debit or register twice."""
    if alloc["status"] == "settled" and alloc.get("artifact_id"):
        return result_for(alloc["artifact_id"], links=urls)
    if intents.path_for(alloc["id"]).exists():  # trained; the reaper could not register it yet
        raise intents.pending_error(alloc["id"], "the registry did not answer the reaper")
    raise Conflict(f"request {alloc['request_key'][:12]}... is already {alloc['status']} "
                   f"as allocation {alloc['id']}", field="request_key",
                   fix="wait for it to finish, then call again to get its result")


class _Job:
    def __init__(self, plan: Plan, alloc: dict, on_line):
        self.plan = plan
        self.cfg = plan.resolved
        self.alloc = alloc
        self.on_line = on_line
        self.parent = plan.parent  # None: trained from scratch
        self.dataset = plan.dataset
        self.artifact_id = (plan.request.parent_artifact_id if plan.request.from_scratch
                            else f"{self.cfg['parent']['family']}-{uuid.uuid4().hex[:12]}")
        self.run_dir = run_dir(alloc["id"])
        self.mlflow = None
        self.run_id = None
        self.seconds = 0.0
        self.stored = False
        self.code_dir: Path | None = None  # the pinned code's snapshot (what the job ran)
        self.dataset_path: Path | None = None  # what the job's loader read, and the host's
        self.logged: dict | None = None  # the MLflow logged model of the checkpoint
        self.registered: dict | None = None
        self.committed = False  # registered and settled in the registry: nothing to undo
        self.pending = False  # an intent holds the registration: it settles or undoes
        self.code_diff: dict | None = None  # allow_dirty: the patch the job ran on top of HEAD
        self.stop = threading.Event()  # set on SIGTERM: the sandbox stops, the job is cancelled

    # --- the happy path --------------------------------------------------------------------

    def run(self) -> dict:
        with Heartbeat(self.alloc["id"]):  # stopped on every way out of the job
            return self._run()

    def _run(self) -> dict:
        plan, cfg = self.plan, self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        inputs = self._inputs()
        track = cfg["tracking"]
        self.mlflow = tracking.client(track["tracking_uri"])
        exp_id, self.run_id = tracking.open_run(
            self.mlflow, experiment=track["experiment_name"],
            artifact_root=Path(track["artifact_root"]), run_name=self.artifact_id,
            tags=self._tags(), params=tracking.flatten(_trainable(cfg)),
            config_yaml=_yaml(cfg), parent_run_id=plan.request.mlflow_parent_run_id,
            note=self._note())
        tracking.log_dataset_input(self.mlflow, self.run_id, self.dataset)
        ledger.mark_running(self.alloc["id"], self.run_id)
        if plan.code.dirty:
            self._keep_diff()
        manifest = build_manifest(cfg, self.artifact_id, plan.device.sandbox,
                                  from_parent=self.parent is not None,
                                  family_code=None if plan.external is None
                                  else plan.external.manifest_entry())
        (self.run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        inputs["manifest.json"] = self.run_dir / "manifest.json"
        out = self.run_dir / "out"
        job = sandbox_job(plan, inputs=inputs, output_dir=out,
                          log_path=self.run_dir / "job.log", on_line=self.on_line,
                          stop=self.stop)
        started = datetime.now(UTC)
        with tracking.MetricRelay(self.mlflow, self.run_id, out / "metrics.jsonl",
                                  warn=self.on_line, host_measured=self._host_measured()):
            launched = sandbox.gpu_launch(job)
        self.seconds = launched.wall_seconds  # the ledger multiplies by devices
        self.mlflow.log_artifact(self.run_id, str(launched.log_path))
        if self.stop.is_set():  # whatever the job managed meanwhile, it was stopped
            raise JobCancelled(
                f"the job was cancelled after {launched.wall_seconds:.1f}s "
                f"({self._engine_name()} stopped it with SIGTERM)",
                fix="submit it again to run it anew; the seconds it ran are charged, the "
                    "rest refunded")
        result = handback.read_result(out, launched)
        primary = PRIMARY_METRIC[cfg["training"]["task"]]
        hook.check_metrics(result.get("metrics") or {}, primary)  # a job's own failure
        result = self._measured(result, out)

        checkpoint = out / handback.CHECKPOINT_DIR  # never a path result.json names
        if plan.external is not None:  # its card's files, as regular files
            external_code.check_checkpoint(plan.external.family, checkpoint)
        stored = weights.store(self.artifact_id, checkpoint,
                               cfg["registry"].get("blob_threshold_mb", 50))
        self.stored = True
        if self.code_diff is not None:  # kept with the version, beside its weights
            shutil.copyfile(self.run_dir / CODE_DIFF,
                            weights.version_dir(self.artifact_id) / self.code_diff["artifact"])
        tracking.log_outputs(self.mlflow, self.run_id, [out / name for name in RUN_OUTPUTS])
        # The checkpoint goes up once, as the logged model: its raw scGPT files are the model's
        # artifacts/checkpoint/ (and the registry's weights folder), not a second run artifact.
        vocab = weights.stored_file(self.artifact_id, "vocab.json")  # scGPT's gene list
        family = cfg["parent"]["family"]
        self.logged = tracking.log_model(
            self.mlflow, run_id=self.run_id, experiment_id=exp_id, checkpoint=checkpoint,
            vocab=vocab if vocab.is_file() else None, family=family,
            genes=None if vocab.is_file() else self._genes(family), code_dir=self.code_dir,
            task=cfg["training"]["task"], metrics=result["metrics"], dataset=self.dataset,
            tags={k: v for k, v in self._tags().items()
                  if k.startswith("forge.") or k == "mlflow.source.git.commit"})
        version_number = self.parent["version_number"] + 1 if self.parent else 1
        self.registered = tracking.register_candidate(
            self.mlflow, name=cfg["parent"]["family"], run_id=self.run_id,
            artifact_id=self.artifact_id, model_id=self.logged["model_id"],
            version_number=version_number,
            lifecycle_state="candidate" if self.parent else "active")
        record = hook.RunRecord(
            artifact_id=self.artifact_id,
            title=f"{cfg['parent']['family']} {cfg['training']['task']} on {self.dataset['id']}",
            metadata=self._metadata(result, stored, exp_id),
            dataset_artifact_id=self.dataset["id"], agent_id=plan.agent_id,
            allocation_id=self.alloc["id"], actual_seconds=self.seconds,
            **self._code_record(), training_started_at=started,
            training_completed_at=launched.ended_at, training_params=_trainable(cfg),
            eval_metrics=result["metrics"], primary_metric=primary,
            content_hash=stored["sha256"], mlflow_run_id=self.run_id,
            mlflow_model_uri=self.registered["model_uri"],
            changelog=(f"fine-tuned from {self.parent['id']} ({cfg['training']['task']})"
                       if self.parent else f"trained from scratch ({cfg['training']['task']})"))
        try:
            hook.register_model_version(self.parent["id"] if self.parent else None, record)
        except ForgeError:
            raise
        except Exception as exc:  # a database error: nothing of the registration landed
            if not db.outage(exc):
                raise RegistrationFailed(f"registration failed: {exc}",
                                         reason="registration_failed",
                                         fix="check the registry database, then retry") from exc
            self._register_later(record, exc)
        # Registered and settled: from here on a problem is a warning, never a failed job.
        self.committed = True
        self._after("could not tag the MLflow run", lambda: self.mlflow.set_tag(
            self.run_id, "forge.artifact_id", self.artifact_id))
        self._after("could not describe the MLflow run", lambda: tracking.describe_run(
            self.mlflow, self.run_id, self._note(result, primary, version_number)))
        self._after("could not describe the MLflow version", lambda: tracking.describe_version(
            self.mlflow, self.registered["registered_model"], self.registered["version"],
            self._description(result, primary, version_number)))
        self._after(f"could not mark MLflow run {self.run_id} FINISHED",
                    lambda: tracking.finish(self.mlflow, self.run_id, ok=True, reason="ok"))
        return result_for(self.artifact_id, links=links(cfg["tracking"]))

    def _code_record(self) -> dict:
        """The code that ran: the parent's own (external family) where it names one, with
        our runtime's commit in the metadata (runtime_commit_sha); else ours."""
        ext, code = self.plan.external, self.plan.code
        if ext is None:
            return {"code_repo_url": code.repo_url, "code_commit_sha": code.sha,
                    "code_entrypoint": ENTRYPOINT}
        return {"code_repo_url": ext.repo_url, "code_commit_sha": ext.sha,
                "code_entrypoint": ext.entrypoint}

    def _register_later(self, record: hook.RunRecord, exc: Exception) -> None:
        """The registry is away or locked: keep the registration as an intent and retry it
        while this process lives (intents.py); returns once the version is registered."""
        path = intents.write(record, self.parent["id"] if self.parent else None, {
            "tracking_uri": self.cfg["tracking"]["tracking_uri"], "run_id": self.run_id,
            "registered_model": self.registered["registered_model"],
            "version": self.registered["version"], "model_id": self.logged["model_id"]})
        self.pending = True  # from here the intent settles the allocation, or undoes
        outcome = intents.complete_retrying(
            path, self.cfg["registry"].get("registration_retry_s", 60.0))
        if outcome is None:
            raise intents.pending_error(self.alloc["id"], _first_line(exc)) from exc
        if outcome["status"] != "registered":
            raise outcome["error"]

    def _after(self, what: str, step) -> None:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the version is registered and paid for
            self._warn(f"{what}: {type(exc).__name__}: {exc}")

    def _note(self, result: dict | None = None, primary: str | None = None,
              version_number: int | None = None) -> str:
        """What this version is, for the MLflow UI (tracking.describe): at the run's start,
        then with the host's measured metric once registered."""
        parent = catalog.get_model_version(self.parent["id"]) if self.parent else None
        metrics = (result or {}).get("metrics") or {}
        return tracking.describe(
            artifact_id=self.artifact_id, family=self.cfg["parent"]["family"],
            version_number=version_number or (parent["version_number"] + 1 if parent else 1),
            task=self.cfg["training"]["task"], dataset_id=self.dataset["id"], parent=parent,
            tracking_uri=self.cfg["tracking"]["tracking_uri"], metric=primary,
            value=metrics.get(primary), test_cells=(result or {}).get("test_cells"))

    def _description(self, result: dict, primary: str, version_number: int) -> str:
        """The MLflow version's description: what it is (linked to its parent's version and
        run), the candidate's metrics beside its parent's (where the registry deems them
        comparable) and the baseline's, and the cost."""
        parent = (catalog.get_model_version(self.parent["id"]) if self.parent else None)
        lines = [self._note(result, primary, version_number),
                 "", "| metric | this version | parent | logistic-regression baseline |",
                 "|---|---|---|---|"]
        metrics = result["metrics"]
        baseline = (result.get("baseline") or {}).get("metrics") or {}
        record = {"task": self.cfg["training"]["task"], "split": result.get("split"),
                  "test_cells": result.get("test_cells")}  # as _metadata records them
        for name in dict.fromkeys([primary, "test_accuracy"]):
            if not _number(metrics.get(name)):
                continue
            value = metrics[name]
            gain = hook.improvement(name, value, parent, record, self.dataset["id"])
            theirs = (f"{gain['parent_value']:.4f} ({value - gain['parent_value']:+.4f})"
                      if gain["magnitude"] is not None else
                      f"not comparable: {gain['magnitude_reason']}")
            base = baseline.get(f"baseline_{name}")
            base = f"{base:.4f} ({value - base:+.4f})" if _number(base) else "n/a"
            label = f"{name} (primary)" if name == primary else name
            lines.append(f"| {label} | {value:.4f} | {theirs} | {base} |")
        if result.get("test_cells"):
            lines += ["", f"Test metrics measured by the host on all {result['test_cells']} "
                          "held-out cells."]
        alloc = ledger.get_allocation(self.alloc["id"])  # settled with the registration
        lines += ["", f"Cost: estimated {alloc['estimated_cost']}, debited {alloc['debited']}, "
                      f"actual {alloc['actual_cost']}, refunded {alloc['refunded']} "
                      f"{alloc['currency']} (allocation {alloc['id']}).",
                  "", f"Registry version {version_number} (tag `forge.version_number`); MLflow "
                      "numbers the versions of a model in the order they register."]
        return "\n".join(lines)

    # --- inputs, manifest, metadata --------------------------------------------------------

    def _inputs(self) -> dict[str, Path]:
        # sandbox_job's code_dir; the logged model carries its trainers package
        self.code_dir = codepin.snapshot(self.plan.code, settings.cache_dir() / "code")
        inputs = {}
        if self.parent is not None:
            inputs["parent"] = weights.materialize(self.parent, self.run_dir / "parent")
        # every fetch is checked against the artifact's own sha256
        self.dataset_path = dataset_input(self.dataset, self.cfg["dataset"]["source"])
        return {**inputs, "dataset": self.dataset_path}

    def _host_measured(self) -> tuple[str, ...]:
        """The metric keys whose values the host measures (not relayed from the job)."""
        return HOST_MEASURED if self.cfg["training"]["task"] == FINETUNE else ()

    def _measured(self, result: dict, out: Path) -> dict:
        """A fine-tune's test metrics as the host measures them: its per-cell predictions of
        every held-out cell scored against the host's own split, labels and baseline
        (truth.py); the job's test numbers are claims, not recorded, and one the host does
        not reproduce is a warning. Other tasks (masked MSE) keep the job's numbers."""
        from trainers.scoring import metric_key

        t = self.cfg["training"]
        if t["task"] != FINETUNE:
            return result
        held = truth.rebuild(self.dataset_path, self.cfg["dataset"], seed=t["seed"],
                             split_seed=t.get("split_seed"), val_fraction=t["val_fraction"],
                             test_fraction=t["test_fraction"],
                             content_hash=self.dataset.get("content_hash"))
        measured = truth.measure(out, held)
        claims = result.get("metrics") or {}
        for key, value in measured["metrics"].items():
            claim = claims.get(key)
            if _number(claim) and abs(claim - value) > 1e-6:
                self._warn(f"the job reported {key} {claim!r}; the host measured {value:.6f} "
                           f"on {measured['test_cells']} held-out cells and records that")
        tracking.log_measured(self.mlflow, self.run_id, {
            **measured["metrics"], **{f"test_f1/{metric_key(k)}": v
                                      for k, v in measured["per_class_f1"].items()}})
        kept = {k: v for k, v in claims.items() if not k.startswith(HOST_MEASURED)}
        return {**result, **measured, "metrics": {**kept, **measured["metrics"]}}

    def _warn(self, line: str) -> None:
        line = sandbox.printable(f"warning: {line}")[:500]
        if self.on_line is not None:
            self.on_line(line)
        else:
            print(line, file=sys.stderr)

    def _tags(self) -> dict[str, str]:
        plan = self.plan
        tags = {"forge.dataset_artifact_id": self.dataset["id"],
                "forge.agent_id": plan.agent_id, "forge.allocation_id": self.alloc["id"],
                "forge.request_key": plan.request_key, "forge.new_artifact_id": self.artifact_id,
                "mlflow.source.git.commit": plan.code.sha,
                "mlflow.source.git.repoURL": plan.code.repo_url,
                "mlflow.source.name": ENTRYPOINT, "mlflow.user": plan.agent_id}
        if self.parent is not None:
            tags["forge.parent_artifact_id"] = self.parent["id"]
        if self.alloc.get("engine_job_id"):
            tags.update(engine.EngineJob(self.alloc["engine"], self.alloc["engine_job_id"]).tags())
        return tags

    def _engine_name(self) -> str:
        job_id = self.alloc.get("engine_job_id")
        if not job_id:
            return "a SIGTERM to the host process"
        return f"{'SLURM' if self.alloc.get('engine') == 'slurm' else 'the local'} job {job_id}"

    def _keep_diff(self) -> None:
        """allow_dirty: the version records HEAD, so the changes it ran on top of HEAD are
        kept as a patch (with its sha256) on the MLflow run now, and in the version's folder
        once its weights are stored. The record names it relative to each, never by a host
        path: the version's folder moves with FORGE_HOME, the run with its store."""
        patch = codepin.diff_patch(self.plan.code)
        path = self.run_dir / CODE_DIFF
        path.write_bytes(patch)
        self.mlflow.log_artifact(self.run_id, str(path), "code")
        self.code_diff = {"sha256": hashlib.sha256(patch).hexdigest(),
                          "size_bytes": len(patch), "base_commit": self.plan.code.sha,
                          "artifact": CODE_DIFF, "mlflow_artifact": f"code/{CODE_DIFF}"}

    def _genes(self, family: str) -> list[str] | None:
        """The genes the stored checkpoint reads, as its family's inspect() says (the MLflow
        model's signature); None when its files do not say."""
        try:
            return parents.inspect(weights.weights_dir(self.artifact_id), self.artifact_id,
                                   family)[0].genes
        except parents.CheckpointProblem:
            return None

    def _metadata(self, result: dict, stored: dict, experiment_id: str) -> dict:
        parent = self.cfg["parent"]
        fam = families.get(parent["family"])
        arch = {k: parent[k] for k in fam.architecture_keys() if parent.get(k) is not None}
        meta = {"family": fam.name, "framework": fam.framework,
                "task": self.cfg["training"]["task"], "architecture": arch,
                "weights": {k: stored[k] for k in ("sha256", "files", "size_bytes", "path", "blob")
                            if k in stored},
                "split": result.get("split"), "test_cells": result.get("test_cells"),
                "device": result.get("device"),
                "baseline": result.get("baseline"), "per_class_f1": result.get("per_class_f1"),
                "mlflow": {"experiment_id": experiment_id,
                           "tracking_uri": self.cfg["tracking"]["tracking_uri"]}}
        if result.get("class_names"):
            meta["class_names"] = list(result["class_names"])
        genes = (self.plan.checkpoint or {}).get("genes") or {}
        if "matched" in genes:  # how the dataset met the parent's genes: the host's reading
            meta["genes"] = genes
        meta["code_diff"] = self.code_diff
        if self.plan.external is not None:  # its children run the same code
            meta["code"] = self.plan.external.record()
            meta["runtime_commit_sha"] = self.plan.code.sha
        return {k: v for k, v in meta.items() if v is not None}

    # --- the unhappy path ------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """Settle once (charge what ran, refund the rest), undo files and MLflow entries
        (version, logged model), mark the run FAILED; nothing once the registration committed
        (it settled the allocation; the version stands and a retry returns it) or was left to
        an intent (intents.py settles it, or undoes, once the registry answers).

        Never raises: `exc` is what the caller gets. A settlement that still fails after
        retrying while the database is away is left to the reaper (`forge ledger reap`).
        """
        if self.committed or self.pending:
            return
        reason = getattr(exc, "reason", None) or type(exc).__name__

        def attempt(what: str, step) -> None:
            try:
                step()
            except Exception as step_exc:  # noqa: BLE001 - never mask the original error
                print(f"warning: {what}: {type(step_exc).__name__}: {step_exc}",
                      file=sys.stderr)

        if self.registered and self.mlflow is not None:
            attempt("could not remove the MLflow candidate", lambda: tracking.unregister(
                self.mlflow, self.registered["registered_model"], self.registered["version"]))
        if self.logged and self.mlflow is not None:
            attempt("could not delete the MLflow logged model", lambda: tracking.delete_model(
                self.mlflow, self.logged["model_id"]))
        if self.stored:
            attempt(f"could not remove the weights of {self.artifact_id}",
                    lambda: weights.remove(self.artifact_id))
        cancelled = isinstance(exc, JobCancelled)
        attempt(f"could not settle allocation {self.alloc['id']}; `forge ledger reap` "
                "settles it once it expires", lambda: settle_retrying(
                    self.alloc["id"], self.seconds, status="cancelled" if cancelled else "failed",
                    reason=f"{reason}: {exc}"[:500]))
        if self.mlflow is not None and self.run_id is not None:
            def mark_failed() -> None:
                self.mlflow.set_tag(self.run_id, "forge.error", str(exc)[:5000])
                tracking.finish(self.mlflow, self.run_id, ok=False, reason=reason)

            attempt(f"could not mark MLflow run {self.run_id} FAILED", mark_failed)


def links(tracking: dict) -> dict[str, str]:
    """The templates of a result's links: `detail_url`, the new version's page on forge serve
    (tracking.site_url), and `mlflow_url`, its MLflow run (tracking.mlflow_url)."""
    return {"detail_url": tracking["site_url"].rstrip("/") + "/artifacts/{artifact_id}",
            "mlflow_url": tracking["mlflow_url"]}


def result_for(artifact_id: str, *, links: dict[str, str] | None = None) -> dict:
    """The call's return value, rebuilt from the registry (so a retry returns the same);
    `links`: the templates links() gives, filled in for this version."""
    model = catalog.get_model_version(artifact_id)
    version = model["version"]
    alloc = ledger.get_allocation(version["gpu_allocation_id"])
    meta = model.get("metadata") or {}
    mlflow_uri = version.get("mlflow_model_uri") or ""
    name, _, number = mlflow_uri.removeprefix("models:/").partition("/")
    experiment_id = (meta.get("mlflow") or {}).get("experiment_id")
    urls = {"detail_url": None, "mlflow_url": None}
    for key, template in (links or {}).items():
        if template and (experiment_id or "{experiment_id}" not in template):
            # artifact ids are [A-Za-z0-9._-] (catalog.validate_artifact_id): safe in a path
            urls[key] = template.format(experiment_id=experiment_id,
                                        run_id=version["mlflow_run_id"], artifact_id=artifact_id)
    return {
        "artifact_id": artifact_id, "version_number": model["version_number"],
        "parent_artifact_id": model["parent_version_id"],
        "lifecycle_state": model["lifecycle_state"],
        "cost": {"estimated": str(alloc["estimated_cost"]), "debited": str(alloc["debited"]),
                 "actual": str(alloc["actual_cost"]), "refunded": str(alloc["refunded"]),
                 "currency": alloc["currency"]},
        "gpu_allocation_id": alloc["id"],
        "eval_metrics": version["eval_metrics_json"],
        "mlflow": {"run_id": version["mlflow_run_id"], "model_uri": mlflow_uri,
                   "registered_model": name or None, "version": number or None},
        "code_commit_sha": version["code_commit_sha"],
        "device": meta.get("device"),
        **urls,
    }


def _trainable(cfg: dict) -> dict:
    """The part of the config that decides the model (what goes to MLflow params)."""
    keys = ("parent", "dataset", "training", "wall_time_cap_min", "vram_cap_gb", "devices",
            "device")
    return {k: cfg[k] for k in keys if k in cfg}


def _yaml(cfg: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
