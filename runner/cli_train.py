"""`forge train` and `forge jobs submit`: training for people, in forge's one dialect.

    forge train --parent ID --dataset ID --agent A training.lr=1e-4 --dry-run
    forge train ... --cfg job        # the config that would run, the registry's facts merged
    forge jobs submit PARENT DATASET training.lr=1e-4 --agent A

Both take the same Hydra override strings as forge-train (training.<key>=<value>,
training=<option>, parent=/dataset=<option>); their options are derived from the calls'
declarations (runner/api: TrainArgs, SubmitArgs), never written here. `forge train` runs
forge-train's own path (runner.train_app.run), its options translated to forge-train's plain
keys (--agent A -> agent_id=A). Both print a short summary and a "next:" line; --json prints
the call's result.
"""

from __future__ import annotations

import json
import shlex

import click

# What the command line does not set: sweeps pin the code and nest MLflow runs (forge-train
# -m), and the overrides are the command's arguments.
NOT_OPTIONS = ("code_commit", "mlflow_parent_run_id", "overrides", "training_config")


class DeclaredCommand(click.Command):
    """A command whose options are read from a call's declaration when first needed, so that
    `forge --help` does not import the API."""

    def __init__(self, *args, declaration, skip=(), require=True, epilog_from=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._declaration, self._skip, self._epilog_from = declaration, skip, epilog_from
        self._require = require
        self._declared = False

    def get_params(self, ctx):
        if not self._declared:
            from runner.api import declare  # lazy: the API (~350 ms) stays out of forge --help

            self._declared = True
            self.params = declare.click_params(self._declaration(), skip=self._skip,
                                               require=self._require) \
                + self.params
        return super().get_params(ctx)

    def format_epilog(self, ctx, formatter):
        if self._epilog_from is not None:
            self.epilog = self._epilog_from()
        super().format_epilog(ctx, formatter)


def _train_args():
    from runner.api.train import TrainArgs

    return TrainArgs


def _submit_args():
    from runner.api.jobs import SubmitArgs

    return SubmitArgs


# --- forge train's help: the keys a caller may set ------------------------------------------------

def caller_keys_help() -> str:
    """Per family, the training keys a caller may set with their types and ranges (the
    families' own declarations), and the conf/ options a caller may choose."""
    from runner.config import caller
    from runner.config.options import group_options
    from trainers import family as families

    schemas = caller.training_key_schemas()
    lines = ["Overrides a caller may give (everything else is the operator's):"]
    for group in caller.CHOICE_GROUPS:
        lines.append(f"  {group}=<{' | '.join(group_options(group))}>")
    shared = [k for k in caller.training_keys()
              if not any(k in fam.training_keys() for fam in families.all_families())]
    lines.append("  " + "   ".join(f"training.{k}={_rule(schemas[k])}" for k in shared
                                   if k != "task"))
    lines.append("")
    for fam in families.all_families():
        lines.append(f"\b\n{fam.name} ({', '.join(fam.tasks)}): {fam.summary}")
        for key in ("task", *fam.training_keys()):
            spec = {**schemas.get(key, {}), **fam.ranges.get(key, {})}
            if key in fam.choices:
                spec["enum"] = list(fam.choices[key])
            if key == "task":
                spec["enum"] = list(fam.tasks)
            lines.append(f"    training.{key}={_rule(spec)}")
        lines.append("")
    return "\b\n" + "\n".join(lines)  # \b: click keeps a paragraph's lines as they are


def _rule(spec: dict) -> str:
    """'<number> > 0', '<integer> >= 1', 'a|b', ... for a key's JSON Schema."""
    if spec.get("enum"):
        return "|".join(str(v) for v in spec["enum"])
    kind = spec.get("type", "value")
    kind = "|".join(k for k in kind if k != "null") if isinstance(kind, list) else kind
    bounds = [f"{op} {spec[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                              ("maximum", "<="), ("exclusiveMaximum", "<"))
              if k in spec]
    return f"<{kind}>" + (f" ({', '.join(bounds)})" if bounds else "")


# --- forge train ----------------------------------------------------------------------------------

@click.command("train", cls=DeclaredCommand, declaration=_train_args,
               skip=NOT_OPTIONS, require=False, epilog_from=caller_keys_help,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the call's result as JSON.")
@click.option("--cfg", type=click.Choice(["job"]), default=None,
              help="Print the config that would run (the registry's facts merged) as YAML.")
@click.pass_context
def train_cmd(ctx, overrides, as_json, cfg, **options):
    """Fine-tune a registered parent on a registered dataset: OVERRIDES are Hydra override
    strings (training.<key>=<value>, training=<option>); the keys and ranges are below."""
    from runner import train_app  # lazy: the API and Hydra stay out of forge --help

    verbose = bool(options.pop("verbose", False))
    given = {name: value for name, value in options.items()
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if cfg == "job":  # the dry run's resolved config: conf/ with the registry's facts
        given["dry_run"], verbose = True, True
    argv = [*(f"{k}={_plain(v)}" for k, v in given.items()), *overrides]
    flags = {p.name: min(p.opts, key=len) for p in ctx.command.params}
    again = ["forge", "train", *overrides]  # this command line, without --dry-run
    for name, value in given.items():
        if name != "dry_run" and value is not False:
            again += [flags[name]] + ([] if value is True else [str(value)])

    def show(result: dict) -> None:
        if cfg == "job":
            from omegaconf import OmegaConf

            click.echo(OmegaConf.to_yaml(result["config"]), nl=False)
        elif as_json:
            click.echo(json.dumps(result, indent=2, default=str))
        else:
            _summary(result, again, given.get("agent_id"))

    ctx.exit(train_app.run(argv, show=show, verbose=verbose))


def _plain(value) -> str:
    """A forge-train plain key's value: true/false for a flag, else the value as typed (click
    has checked its type and bounds)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _summary(result: dict, again: list[str], agent: str | None) -> None:
    """A dry run's or a trained version's few lines, and what to run next."""
    if "would_launch" in result:
        est, balance = result["estimate"], result.get("balance")
        click.echo(f"would launch: {'yes' if result['would_launch'] else 'no'}")
        click.echo(f"estimate: {est['amount']} {est['currency']} ({est['hours']} h x "
                   f"{est['price_per_hour']}/h x {est['devices']} {est['device'] or ''})"
                   + (f"; balance {balance['amount']} {balance['currency']}" if balance
                      else ""))
        for reason in result["reasons"]:
            click.echo(f"  - {reason['reason']}: {reason['message']}"
                       + (f" (fix: {reason['fix']})" if reason.get("fix") else ""))
        click.echo("next: " + (shlex.join(again) if result["would_launch"]
                               else "fix the reasons above, then dry-run again"))
        return
    from trainers.manifest import PRIMARY_METRIC  # plain data: the task's primary metric

    metrics = result.get("eval_metrics") or {}
    primary = next((m for m in PRIMARY_METRIC.values() if m in metrics), None)
    cost = result.get("cost") or {}
    click.echo(f"version {result['artifact_id']} v{result.get('version_number')} "
               f"({result.get('lifecycle_state')})"
               + (f", {primary} {metrics[primary]}" if primary else "")
               + (f", cost {cost.get('actual')} {cost.get('currency', '')}" if cost else ""))
    if result.get("detail_url"):
        click.echo(f"page: {result['detail_url']}")
    if result.get("gate"):
        click.echo(f"gate: {result['gate'].get('decision')}")
    click.echo("next: " + shlex.join(["forge", "gate", result["artifact_id"],
                                      *(["--agent", agent] if agent else [])])
               + "   or   " + shlex.join(["forge", "models", "show", result["artifact_id"]]))


# --- forge jobs submit ----------------------------------------------------------------------------

@click.command("submit", cls=DeclaredCommand, declaration=_submit_args,
               skip=(*NOT_OPTIONS, "parent_artifact_id", "dataset_artifact_id"))
@click.argument("parent_artifact_id")
@click.argument("dataset_artifact_id")
@click.argument("overrides", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the job as JSON.")
def jobs_submit(parent_artifact_id, dataset_artifact_id, overrides, as_json, **options):
    """Debit and queue a fine-tune of PARENT on DATASET; OVERRIDES are training.<key>=<value>
    or training=<option>. Prints the job at once."""
    from runner.api import submit_training  # lazy: the API stays out of forge --help

    job = submit_training(parent_artifact_id, dataset_artifact_id,
                          overrides=list(overrides) or None, **options)
    if as_json:
        click.echo(json.dumps(job, indent=2, default=str))
        return
    cost = job.get("cost") or {}
    click.echo(f"job {job['job_id']}: {job['status']} on {job.get('engine')}, debited "
               f"{cost.get('debited')} {cost.get('currency', '')}")
    click.echo(f"next: forge jobs status {job['job_id']}   or   "
               f"forge jobs log {job['job_id']}")
