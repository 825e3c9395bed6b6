"""`forge-train`: the Hydra app over train_model_version().

    forge-train parent=scgpt_cbmc_base dataset=cbmc training=finetune_celltype agent_id=a1
    forge-train parent_artifact_id=ID dataset_artifact_id=ID ...   # artifacts without an option
    forge-train ... dry_run=true          # print the dry-run result as JSON
    forge-train ... gate=default          # then gate the new version (conf/gate/default.yaml)
    forge-train ... --cfg job             # print the composed config
    forge-train -m training.lr=1e-3,1e-4 ...   # a sweep, one run directory per job

It is a `@hydra.main` app (run directories, --cfg, -m, --help) whose task function calls
train_model_version() with the composed config. A plain dry run (overrides only, no flags)
skips Hydra's run-directory and logging setup and composes through the same
`compose_config()` the Python API uses: nothing to set up, nothing written but the audit row.

Every override string is a caller's: before anything is composed it is checked against
what a caller may set (runner.config.caller.cli_overrides: training.*, the call's arguments as
plain keys, a choice among conf/ options of parent, dataset and training; under -m also
sweep=<option>, hydra/launcher=<option> and key=a,b sweeps of those). Hydra's flags that
would read configs or state from elsewhere (--config-dir, --config-path, --config-name,
--experimental-rerun) and --shell-completion are refused.

Exit codes: 0 ok / would launch, 3 dry run would not launch, 2 typed error (one line on
stderr), 1 anything else.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import NamedTuple

from omegaconf.errors import OmegaConfBaseException

from runner.api import evaluate_candidate, train_model_version
from runner.config import caller, compose, launchers, options, schema
from runner.config.gate import load_gate
from runner.config.overrides import parse_overrides
from runner.errors import ForgeError, InvalidOverride
from runner.tools import jsonable
from trainers.manifest import PRIMARY_METRIC

EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_WOULD_NOT_LAUNCH = 0, 1, 2, 3
# a sweep job's status -> forge-train's exit code (the worst job's wins): as a job that
# failed or would not launch ends, and 1 for a task that ended without a result
SWEEP_EXIT = {"failed": EXIT_INVALID, "would not launch": EXIT_WOULD_NOT_LAUNCH,
              "cancelled": EXIT_ERROR, "lost": EXIT_ERROR}


class Outcome(NamedTuple):
    """What one job of forge-train ended with: its exit code and, for sweepers that optimise
    (Optuna), its primary metric."""
    code: int
    metric: float | None = None


def main() -> None:
    sys.exit(run(sys.argv[1:]))


def run(argv: list[str], *, show=None, verbose: bool = False) -> int:
    """Run forge-train with `argv`; returns the exit code. `show(result)` prints a job's
    result (default: as JSON); `verbose`: a dry run's reply in full (`forge train` passes
    both)."""
    try:
        argv, gate = _take_gate(_agent_flag(argv))
        if argv and all(not a.startswith("-") for a in argv):
            overrides = caller.cli_overrides(argv)
            cfg = compose.compose_config(overrides)
            if cfg.dry_run:
                return execute(cfg, under_hydra=False, show=show, verbose=verbose).code
            flags, multirun = [], False
        else:
            flags, multirun, given = _hydra_flags(argv)
            overrides = caller.cli_overrides(given, multirun=multirun)
    except ForgeError as exc:
        return _fail(exc)
    return _run_hydra(flags, overrides, multirun, gate, show=show, verbose=verbose)


def _agent_flag(argv: list[str]) -> list[str]:
    """`--agent A` (or `--agent=A`), forge's spelling, as forge-train's plain key agent_id=A."""
    out, rest = [], iter(argv)
    for arg in rest:
        if arg == "--agent":
            value = next(rest, None)
            if value is None:
                raise InvalidOverride("--agent needs a value", field="agent_id",
                                      problem="syntax", fix="write --agent AGENT or agent_id=AGENT")
            out.append(f"agent_id={value}")
        elif arg.startswith("--agent="):
            out.append(f"agent_id={arg.removeprefix('--agent=')}")
        else:
            out.append(arg)
    return out


def _take_gate(argv: list[str]) -> tuple[list[str], str | None]:
    """`gate=NAME` is forge-train's own argument, not a config key (conf/gate/ is the eval
    gate's, outside the training config): the rest of argv, and the gate, checked now so an
    unknown one fails before the training's debit."""
    gates = [a.removeprefix("gate=") for a in argv if a.startswith("gate=")]
    if len(gates) > 1:
        raise InvalidOverride("gate= is given more than once", field="gate", problem="syntax",
                              fix="name one gate of conf/gate/")
    if gates:
        load_gate(gates[0])
    return [a for a in argv if not a.startswith("gate=")], (gates[0] if gates else None)


# Hydra's flags a caller may not give: they read configs or state from elsewhere.
REFUSED_FLAGS = {"config_path": "--config-path", "config_name": "--config-name",
                 "config_dir": "--config-dir", "experimental_rerun": "--experimental-rerun",
                 "shell_completion": "--shell-completion"}


def _hydra_flags(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    """Hydra's command line -> (the flags to pass on, multirun, the override strings)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    for dest, flag in REFUSED_FLAGS.items():
        if getattr(args, dest):
            raise InvalidOverride(f"{flag} is not forge-train's to take from a caller",
                                  field=flag, problem="operator_only",
                                  fix=f"drop {flag}: the operator sets FORGE_CONFIG_DIR")
    flags = [flag for dest, flag in (("help", "--help"), ("hydra_help", "--hydra-help"),
                                     ("run", "--run"), ("multirun", "--multirun"),
                                     ("resolve", "--resolve")) if getattr(args, dest)]
    for dest, flag in (("cfg", "--cfg"), ("package", "--package"), ("info", "--info")):
        if getattr(args, dest) is not None:
            flags += [flag, getattr(args, dest)]
    return flags, bool(args.multirun), list(args.overrides or [])


def execute(cfg, *, under_hydra: bool = True, gate: str | None = None, show=None,
            verbose: bool = False) -> Outcome:
    """The task: call train_model_version with the composed config and print its result.

    Inside a sweep (`-m`) the job nests its MLflow run under the sweep's parent run and
    leaves a `forge_job.json` outcome for the sweep summary; a failing job is recorded
    there and does not stop the others. With `gate`, each new version then goes to the eval
    gate (evaluate_candidate) and the result carries its decision under "gate".
    """
    job = _sweep_job() if under_hydra else None  # a plain dry run never imports Hydra
    try:
        result = train_model_version(
            cfg.parent.artifact_id, cfg.dataset.artifact_id, agent_id=cfg.agent_id,
            wall_time_cap_min=cfg.wall_time_cap_min, vram_cap_gb=cfg.vram_cap_gb,
            dry_run=cfg.dry_run, allow_dirty=cfg.allow_dirty, devices=cfg.devices,
            device=cfg.device, config=cfg,
            mlflow_parent_run_id=job["parent_run_id"] if job else None,
            code_commit=job["code_commit"] if job else None, verbose=verbose)
    except ForgeError as exc:
        if job:
            _record(job, cfg, error=exc)
        return Outcome(_fail(exc))
    if gate and not cfg.dry_run:
        try:
            decision = evaluate_candidate(result["artifact_id"], cfg.agent_id, gate,
                                          allow_dirty=cfg.allow_dirty)
        except ForgeError as exc:
            if job:
                _record(job, cfg, result=result, error=exc)
            return Outcome(_fail(exc))
        result = {**result, "gate": decision}
    metric = None
    if job:
        metric = _record(job, cfg, result=result).get("metric")  # the sweep summary shows it
    elif show is not None:
        show(jsonable(result))
    else:
        sys.stdout.write(json.dumps(jsonable(result), indent=2) + "\n")
        sys.stdout.flush()
    if cfg.dry_run and not result["would_launch"]:
        return Outcome(EXIT_WOULD_NOT_LAUNCH)
    return Outcome(EXIT_OK, metric)


def _sweep_job() -> dict | None:
    """This job's place in a sweep (number, overrides, directories), or None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    from runner import sweep  # lazy: sweep imports Hydra, which a plain dry run never loads

    record = sweep.sweep_record(hc.sweep.dir)
    return {"job": hc.job.num, "overrides": list(hc.overrides.task),
            "dir": hc.runtime.output_dir, "parent_run_id": record.get("parent_run_id"),
            "code_commit": record.get("code_commit")}


def _record(job: dict, cfg, result: dict | None = None, error=None) -> dict:
    from runner import sweep  # lazy: sweep imports Hydra, which a plain dry run never loads

    metric_name = PRIMARY_METRIC.get(cfg.training.task)
    outcome = {"job": job["job"], "overrides": job["overrides"], "metric_name": metric_name}
    if error is not None:
        outcome.update(status="failed", error=f"{type(error).__name__}: {error}"[:300],
                       reason=getattr(error, "reason", None))
    elif cfg.dry_run:
        outcome.update(status="would launch" if result["would_launch"] else "would not launch",
                       cost=str(result["estimate"]["amount"]),
                       error="; ".join(r["reason"] for r in result["reasons"]))
    else:
        outcome.update(status="ok", cost=result["cost"]["actual"],
                       gate=(result.get("gate") or {}).get("decision"),
                       metric=(result["eval_metrics"] or {}).get(metric_name),
                       artifact_id=result["artifact_id"], mlflow_run_id=result["mlflow"]["run_id"])
    sweep.write_job_outcome(job["dir"], outcome)
    return outcome


def _fail(exc) -> int:
    print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return EXIT_INVALID


def _run_hydra(flags: list[str], overrides: list[str], multirun: bool,
               gate: str | None = None, show=None, verbose: bool = False) -> int:
    """The @hydra.main app over `overrides`, which cli_overrides() has checked."""
    import hydra

    from runner import sweep  # lazy: sweep imports Hydra (as this function does)
    from runner.sweep import SweepRefused

    try:
        parsed = parse_overrides(overrides, allow_sweeps=multirun)
    except ForgeError as exc:
        return _fail(exc)
    schema.register_schema()
    launchers.register_resolvers()  # conf/hydra/launcher/forge_slurm.yaml maps caps with them
    codes: list[int] = []  # one per job; Hydra's task function returns the metric instead

    @hydra.main(config_path=str(options.config_dir()), config_name=compose.CONFIG_NAME,
                version_base="1.3")
    def task(cfg) -> float:
        outcome = execute(cfg, gate=gate, show=show, verbose=verbose)
        codes.append(outcome.code)
        # Sweepers that optimise (Optuna) read the job's target metric from here.
        return float("nan") if outcome.metric is None else outcome.metric

    ended = len(sweep.ENDED)
    with _argv([*flags, *overrides]), _env("HYDRA_FULL_ERROR", "1"):
        try:
            task()
        except ForgeError as exc:
            return _fail(exc)
        except SweepRefused as refused:
            return _fail(refused.error)
        except Exception as exc:
            if not _is_composition_error(exc):
                raise
            return _fail(compose.explain(exc, parsed))
    for outcomes in sweep.ENDED[ended:]:  # a SLURM sweep's jobs, as its summary says
        codes.extend(SWEEP_EXIT.get(o["status"], EXIT_OK) for o in outcomes)
    return max(codes, default=EXIT_OK)


def _is_composition_error(exc: BaseException) -> bool:
    from hydra.errors import HydraException

    return isinstance(exc, (HydraException, OmegaConfBaseException))


@contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = [saved[0] if saved else "forge-train", *argv]
    try:
        yield
    finally:
        sys.argv = saved


@contextmanager
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


if __name__ == "__main__":
    main()
