"""`forge`: the admin CLI (registry, ledger, tools). Heavy modules are imported per command.

Every command prints for people by default and ends with a "next: ..." line naming the
natural next command; `--json` prints the dict for machines instead. Tables are plain
padded columns (`_columns`), never wrapped, so that every id can be copied from a pipe.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from runner import settings
from runner.errors import ForgeError, InvalidInput


class _Group(click.Group):
    """Turns a ForgeError into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ForgeError as exc:
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.pass_context
def main(ctx) -> None:
    """forge-runner administration: registry, lineage, ledger, tools.

    Its home (registry, runs, MLflow store) is FORGE_HOME, else the folder named by the
    nearest forge.toml in the working directory or above; `forge init DIR` makes one."""
    _export_home(ctx)


def _export_home(ctx) -> None:
    """Name the home found through forge.toml in FORGE_HOME for this command, so that conf/'s
    ${oc.env:FORGE_HOME} and the processes it starts use the same home; no home, nothing
    (the command that needs one refuses: settings.NoForgeHome)."""
    if os.environ.get("FORGE_HOME") or ctx.invoked_subcommand == "init":
        return
    try:
        home = settings.forge_home()
    except ForgeError:
        return
    os.environ["FORGE_HOME"] = str(home)
    ctx.call_on_close(lambda: os.environ.pop("FORGE_HOME", None))


def echo_json(data) -> None:
    """JSON for machines: Decimal money, datetimes and paths as strings."""
    click.echo(json.dumps(data, indent=2, default=str))


def echo_next(*commands: str) -> None:
    """The last line of a command for people: what to run next."""
    click.echo("next: " + "   or   ".join(commands))


def echo_table(header: tuple[str, ...], rows: list[tuple], empty: str) -> None:
    """Rows as plain padded columns, or `empty` when there are none."""
    if not rows:
        click.echo(empty)
        return
    for line in _columns(header, [tuple("" if c is None else str(c) for c in r)
                                  for r in rows]):
        click.echo(line)


def _money(value) -> str:
    """`{"amount": "1.20", "currency": "credits"}` (an API result's money) as `1.20 credits`."""
    if isinstance(value, dict):
        return f"{value.get('amount')} {value.get('currency', '')}".rstrip()
    return "-" if value is None else str(value)


def _when(stamp) -> str:
    return stamp.strftime("%Y-%m-%d %H:%M") if stamp else ""


JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as JSON (for machines).")


# --- home -----------------------------------------------------------------------------------

@main.command("init")
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--home", "home_name", default="outputs", show_default=True,
              help="The home's folder (registry, runs, MLflow store), relative to DIRECTORY.")
@JSON_OPTION
def init_cmd(directory, home_name, as_json):
    """Make DIRECTORY (default: here) a forge home: write its forge.toml and create the
    registry in it. Commands run in DIRECTORY or below find it."""
    from pathlib import Path

    # lazy: the registry (~350 ms) stays out of `forge --help`
    from runner.errors import Conflict, InvalidInput
    from runner.registry import db as dbmod

    folder = Path(directory).resolve()
    marker = folder / settings.HOME_FILE
    if marker.exists():
        raise Conflict(f"{marker} already exists", field="directory",
                       fix=f"use that home (cd {folder}), or pick another directory")
    if not home_name.strip():
        raise InvalidInput("--home is empty", field="home", fix="--home outputs")
    home = (folder / home_name).resolve()
    url = os.environ.get("FORGE_DB_URL") or settings.sqlite_url(home)
    revision = dbmod.upgrade(url)  # first: a failed init leaves no forge.toml to refuse a retry
    marker.write_text(f"# A forge home (forge init): its registry, runs and MLflow store.\n"
                      f"home = {json.dumps(home_name)}\n")  # a JSON string is a TOML string
    if as_json:
        echo_json({"forge_toml": str(marker), "home": str(home),
                   "registry": dbmod.shown(url), "revision": revision})
        return
    click.echo(f"forge home {home} (forge.toml in {folder}); registry at revision {revision}")
    if os.environ.get("FORGE_HOME"):
        click.echo(f"note: FORGE_HOME is set ({os.environ['FORGE_HOME']}): it wins over "
                   "forge.toml until you unset it")
    import shlex

    echo_next(f"cd {shlex.quote(str(folder))} && forge datasets list")


# --- registry -------------------------------------------------------------------------------

@main.group()
def db() -> None:
    """Registry database."""


@db.command("upgrade")
@click.option("--url", default=None,
              help="Database URL (default: FORGE_DB_URL, else the forge home's forge.db).")
@JSON_OPTION
def db_upgrade(url, as_json):
    """Create or migrate every registry table and write the skills rows (idempotent)."""
    # lazy: the registry (~350 ms) stays out of `forge --help`
    from runner.registry import db as dbmod

    url = url or settings.db_url()
    revision = dbmod.upgrade(url)  # skills included
    if as_json:
        echo_json({"registry": dbmod.shown(url), "revision": revision})
        return
    click.echo(f"registry {dbmod.shown(url)} at revision {revision}")
    echo_next("forge datasets list", "forge models list")


@main.group()
def models() -> None:
    """Model artifacts and versions."""


@models.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True,
              help="Versions per page.")
@click.option("--page", type=click.IntRange(1), default=1, show_default=True,
              help="Which page, 1 the newest.")
@JSON_OPTION
def models_list(limit, page, as_json):
    """Model versions, newest first, one page at a time (candidates and rejected ones
    included): family, version, state, training dataset, primary metric, created."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import catalog

    rows = catalog.list_model_versions(limit=limit, offset=(page - 1) * limit)
    if as_json:
        echo_json(rows)
        return
    total = catalog.count_artifacts("model")
    pages = max(1, -(-total // limit))
    echo_table(("id", "family", "v", "state", "dataset", "primary metric", "created (UTC)"),
               [(r["id"], (r["metadata"] or {}).get("family", ""), r["version_number"],
                 _state(r), r["training_dataset_artifact_id"] or "", _primary(r),
                 _when(r["created_at"])) for r in rows],
               empty=f"no page {page}: {total} versions make {pages} page(s) of {limit}"
               if total else "no models registered yet")
    if total > limit:
        click.echo(f"page {page} of {pages} ({total} versions, {limit} a page)")
    if page < pages:
        echo_next(f"forge models list --page {page + 1}" +
                  (f" --limit {limit}" if limit != 50 else ""),
                  f"forge models show {rows[0]['id']}" if rows else "forge models list")
    elif rows:
        echo_next(f"forge models show {rows[0]['id']}")
    elif not total:
        echo_next("forge models register ID URL --family scgpt", "make demo")
    else:
        echo_next("forge models list")


def _state(row: dict) -> str:
    """Where a version stands: its gate's verdict (candidate, promoted, rejected, superseded)
    where it has one, else its lifecycle state."""
    return row.get("promotion_state") or row["lifecycle_state"]


def _primary(row: dict) -> str:
    """`name value` of a version's primary metric (its task's), else ''."""
    from trainers.manifest import PRIMARY_METRIC

    metrics = row.get("eval_metrics_json") or {}
    name = PRIMARY_METRIC.get((row.get("metadata") or {}).get("task"))
    value = metrics.get(name) if name else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{name} {value:.4f}"
    return ""


@models.command("show")
@click.argument("artifact_id")
@JSON_OPTION
def models_show(artifact_id, as_json):
    """A model version: family, state, parent, dataset, metrics, links, gate decisions
    (--json: the artifact with its model_versions row, links and evaluations)."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import catalog, promotion

    model = catalog.get_model_version(artifact_id)
    model["links"] = catalog.links(artifact_id)
    model["evaluations"] = promotion.recorded(artifact_id)
    if as_json:
        echo_json(model)
        return
    version, meta = model["version"] or {}, model["metadata"] or {}
    row = {**model, **version}
    click.echo(f"{model['id']}: {model['title']}")
    facts = [("family", meta.get("family", "")), ("version", model["version_number"]),
             ("state", _state(row)), ("parent", model["parent_version_id"] or "none (a base)"),
             ("dataset", version.get("training_dataset_artifact_id") or ""),
             ("primary metric", _primary(row)), ("trained by", version.get("trained_by") or ""),
             ("created (UTC)", _when(model["created_at"])),
             ("mlflow run", version.get("mlflow_run_id") or "")]
    for name, value in facts:
        if value not in ("", None):
            click.echo(f"  {name + ':':<16}{value}")
    for ev in model["evaluations"]:
        click.echo(f"  {'gate:':<16}{ev['decision']} ({ev['gate_name']}): {ev['metric']} "
                   f"{ev['delta']:+.4f} [{ev['ci_low']:+.4f}, {ev['ci_high']:+.4f}] vs "
                   f"{ev['comparator_role']} {ev['comparator_value']:.4f}")
    if _state(row) == "candidate" and model["parent_version_id"]:
        echo_next(f"forge gate {model['id']} --agent {version.get('trained_by') or 'AGENT'}",
                  f"forge lineage {model['id']}")
    else:
        echo_next(f"forge lineage {model['id']}")


@models.command("register")
@click.argument("artifact_id")
@click.argument("origin_url")
@click.option("--sha256", default=None, help="The checkpoint's tree hash, if published: checked.")
@click.option("--title", default=None)
@click.option("--family", default="scgpt", show_default=True,
              help="The model family whose checkpoint it is (scgpt, scvi, linear): its code "
                   "trains and evaluates it; also the MLflow registered-model name.")
@click.option("--code", default=None, metavar="REPO@COMMIT:ENTRYPOINT",
              help="The model's own training code instead of a built-in family: a git "
                   "repository the operator allows (code.allowed_origins), a commit or ref "
                   "(recorded as its sha) and the entry point beside its forge-family.yaml.")
@JSON_OPTION
def models_register(artifact_id, origin_url, sha256, title, family, code, as_json):
    """Register a checkpoint of a model family (ORIGIN_URL: a file:// folder or archive, an
    http(s):// archive) as a base model, from its own small files (scGPT: args.json and
    vocab.json; scvi: a folder saved by scvi-tools, forge.json when it has one; linear:
    model.json; an external family: the files its card lists). Weights are never unpickled
    on this host."""
    # lazy: the registry and the weights store (~300 ms) stay out of `forge --help`
    from runner.jobs import parents

    row = parents.register_parent(artifact_id, origin_url, sha256=sha256, title=title,
                                  family=family, code=code)
    if as_json:
        echo_json(row)
        return
    meta = row["metadata"]
    vocab = (meta.get("checkpoint") or {}).get("vocab")
    click.echo(f"{row['id']}: {meta['family']} {meta['architecture']}"
               + (f", vocabulary of {vocab['size']} tokens" if vocab else "")
               + f", sha256 {row['content_hash']}")
    echo_next(f"forge models show {row['id']}")


@main.group("trainers")
def trainers_group() -> None:
    """Your own training code: a family in a repository of its own."""


@trainers_group.command("new")
@click.argument("name")
@click.option("--dir", "folder", default=None, type=click.Path(file_okay=False),
              help="Where to write it (default: ./NAME); must not exist yet.")
def trainers_new(name, folder):
    """Write a minimal external family NAME: forge-family.yaml, train.py (a small Lightning
    module), test_train.py and README.md. Test it with pytest in that folder, commit it,
    then register a parent with `forge models register ID URL --code REPO@COMMIT:train.py`."""
    written = write_family_template(name, Path(folder) if folder else Path(name))
    for path in written:
        click.echo(str(path))
    echo_next(f"cd {written[0].parent} && python -m pytest -q",
              "forge models register ID file:///path/to/checkpoint "
              f"--code {written[0].parent.resolve()}@main:train.py")


FAMILY_TEMPLATE = Path(__file__).resolve().parent / "templates" / "family"
FAMILY_FILES = ("forge-family.yaml", "train.py", "test_train.py", "README.md")


def write_family_template(name: str, folder: Path) -> list[Path]:
    """runner/templates/family/*.tmpl, formatted with the family's `name`, written into
    `folder` (made here: it must not exist). Nothing of it runs here."""
    from trainers import family as families

    if not isinstance(name, str) or not families.NAME.match(name) or name in families.FAMILIES:
        raise InvalidInput(f"{name!r} is not a family name (lowercase letters, digits and _, "
                           "starting with a letter, at most 32) or is a built-in one",
                           field="name", fix="e.g. forge trainers new my_mlp")
    if folder.exists():
        raise InvalidInput(f"{folder} exists already", field="dir",
                           fix="name a new folder with --dir")
    folder.mkdir(parents=True)
    written = []
    for file in FAMILY_FILES:
        path = folder / file
        path.write_text((FAMILY_TEMPLATE / f"{file}.tmpl").read_text().format(name=name))
        written.append(path)
    return written


@main.command("lineage")
@click.argument("artifact_id")
@JSON_OPTION
def lineage_cmd(artifact_id, as_json):
    """Show the version chain from the root model down to ARTIFACT_ID, one version a line."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import catalog

    chain = catalog.lineage(artifact_id)
    if as_json:
        echo_json(chain)
        return
    for depth, row in enumerate(chain):  # plain text: a pipe keeps every id whole
        click.echo(f"{'  ' * depth}{'└─ ' if depth else ''}{row['id']} v{row['version_number']}"
                   f"  {row['lifecycle_state']} {row['origin_type']}")
    echo_next(f"forge models show {chain[-1]['id']}")


@main.command("gate")
@click.argument("candidate_id")
@click.option("--agent", "agent_id", required=True, help="The agent that pays for the evaluation.")
@click.option("--gate", "gate_name", default="default", show_default=True,
              help="A gate of conf/gate/.")
@click.option("--dry-run", is_flag=True, help="Estimate and check; launch nothing.")
@click.option("--justification", default=None,
              help="Why a tradeoff should be promoted (gates with allow_tradeoff only).")
@click.option("--allow-dirty", is_flag=True, help="Run the working tree's uncommitted code.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def gate_cmd(candidate_id, agent_id, gate_name, dry_run, justification, allow_dirty, as_json):
    """Promote or reject CANDIDATE_ID on evidence: evaluate it against its parent and the
    lineage's champion on its held-out cells, in the sandbox, and bootstrap the delta."""
    # lazy: runner.api and the registry (~350 ms) stay out of `forge --help`
    from runner import tools
    from runner.api import evaluate_candidate
    from runner.jobs.gate import decision_text

    with tools.as_operator():  # the host's shell: any agent's candidate (agents go through MCP)
        result = evaluate_candidate(candidate_id, agent_id, gate_name, dry_run,
                                    justification=justification, allow_dirty=allow_dirty)
    if as_json:
        echo_json(result)
        return
    if dry_run:
        click.echo(f"{candidate_id}: {'would' if result['would_launch'] else 'would NOT'} "
                   f"launch gate {gate_name!r}, against "
                   f"{', '.join(f'{r} {a}' for r, a in result['comparators'].items()) or '-'}; "
                   f"estimate {_money(result['estimate'])}, balance {_money(result['balance'])}")
        for reason in result["reasons"]:
            click.echo(f"  {reason['reason']}: {reason['message']}"
                       + (f" (fix: {reason['fix']})" if reason.get("fix") else ""))
        echo_next(f"forge gate {candidate_id} --agent {agent_id} --gate {gate_name}")
        return
    click.echo(decision_text(result))
    echo_next(f"forge models show {candidate_id}", "forge models list")


@main.group("benchmarks")
def benchmarks_group() -> None:
    """Benchmarks (dataset + task + held-out split + metric) and their leaderboards."""


def _columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A plain-text table: columns padded to their widest cell, never wrapped (a pipe keeps
    every word whole)."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
            for r in (header, *rows)]


def _vs_best(entry: dict) -> str:
    ci = entry["vs_best"]
    if ci is None:
        return "not compared"
    return (f"{ci['delta']:+.4f} {ci['confidence']:.0%} CI "
            f"[{ci['ci_low']:+.4f}, {ci['ci_high']:+.4f}]")


@benchmarks_group.command("show")
@click.argument("benchmark_id")
@click.option("--json", "as_json", is_flag=True, help="Print the leaderboard as JSON.")
def benchmarks_show(benchmark_id, as_json):
    """The leaderboard of BENCHMARK_ID: every version of every family measured on it, best
    first, with the logistic-regression baseline's row; values as the gates recorded them."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import benchmarks

    board = benchmarks.leaderboard(benchmark_id)
    if as_json:
        echo_json(board)
        return
    click.echo(f"benchmark {board['id']}")
    click.echo(f"dataset {board['dataset']}, task {board['task']}, metric {board['metric']}, "
               f"held-out split sha256 {board['split_sha256']}")
    rows, rank = [], 0
    for e in board["entries"]:
        if e["kind"] == "baseline":
            rows.append(("-", "baseline", "logistic-regression baseline", "-",
                         f"{e['value']:.4f}", _vs_best(e), "-"))
            continue
        rank += 1
        rows.append((str(rank), e["family"], e["id"], f"v{e['version_number']}",
                     f"{e['value']:.4f}", "best" if e is board["best"] else _vs_best(e),
                     e["lifecycle_state"]))
    header = ("rank", "family", "version", "number", board["metric"], "vs best", "state")
    for line in _columns(header, rows):
        click.echo(line)
    best = board.get("best")
    echo_next(f"forge models show {best['id']}" if best else "forge benchmarks list")


@benchmarks_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def benchmarks_list(as_json):
    """Every benchmark a version was gated on: dataset, task, metric, versions, best."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import benchmarks

    rows = benchmarks.list_benchmarks()
    if as_json:
        echo_json(rows)
        return
    table = [(b["id"], b["dataset"], b["task"], b["metric"], str(b["versions"]),
              f"{b['best']['id']} ({b['best']['value']:.4f})") for b in rows]
    echo_table(("benchmark", "dataset", "task", "metric", "versions", "best"), table,
               empty="no benchmarks yet: a gate's evaluation makes one")
    echo_next(f"forge benchmarks show {rows[0]['id']}" if rows else "forge models list")


@main.group()
def datasets() -> None:
    """Dataset artifacts."""


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def datasets_list(as_json):
    """List registered datasets with their citations."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import catalog

    rows = catalog.list_artifacts("dataset")
    if as_json:
        echo_json(rows)
        return
    table = []
    for row in rows:
        cite = (row["metadata"] or {}).get("citation", {})
        table.append((row["id"], row["title"], cite.get("source", ""),
                      cite.get("row_count", ""), cite.get("license", ""),
                      (row["content_hash"] or "")[:12]))
    echo_table(("id", "title", "source", "rows", "license", "sha256"), table,
               empty="no datasets registered yet")
    if rows:
        models = catalog.list_model_versions(limit=1)  # the newest: a parent to name
        parent = models[0]["id"] if models else "MODEL_ID"
        echo_next(f"forge train --parent {parent} --dataset {rows[0]['id']} --agent AGENT "
                  "--dry-run", "forge models list")
    else:
        echo_next("forge datasets register ID file:///path/cells.h5ad --title T --license L",
                  "make demo")


@datasets.command("register")
@click.argument("artifact_id")
@click.argument("url")
@click.option("--title", required=True)
@click.option("--license", "license_", required=True, help="The data's license (cited).")
@click.option("--label-key", default=None, help="The cell-type column (h5ad obs, csv column).")
@click.option("--source", default="user", show_default=True, help="Where it comes from (geo, ...).")
@click.option("--external-id", default=None, help="Its id there (GSE..., ...).")
@click.option("--doi", default=None)
@JSON_OPTION
def datasets_register(artifact_id, url, title, license_, label_key, source, external_id, doi,
                      as_json):
    """Register your own dataset file (URL: file:// or http(s)://; h5ad, mat or csv), read
    once with the trainer's loader; its citation records the sha256 jobs are checked against."""
    # lazy: the loader (anndata, ~1 s) stays out of `forge --help`
    from runner.jobs import datasets as datasets_mod

    row = datasets_mod.register_file(artifact_id, url, title=title, license=license_,
                                     label_key=label_key, source=source,
                                     external_id=external_id, doi=doi)
    if as_json:
        echo_json(row)
        return
    cite = row["metadata"]["citation"]
    click.echo(f"{row['id']}: {cite['schema_summary']}, sha256 {cite['sha256']}")
    echo_next("forge datasets list")


# --- ledger ---------------------------------------------------------------------------------

@main.group("ledger")
def ledger_group() -> None:
    """Compute credits: grants, balances, the books."""


@ledger_group.command("grant", context_settings={"ignore_unknown_options": True})
@click.argument("agent")
@click.argument("amount")
@click.option("--memo", default=None, help="Why (kept in the ledger row).")
@JSON_OPTION
def ledger_grant(agent, amount, memo, as_json):
    """Credit AMOUNT (a decimal such as 10 or 2.50) to AGENT, opening its account."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import ledger as ledger_mod
    from runner.registry import money

    new_balance = ledger_mod.grant(agent, amount, memo=memo)
    if as_json:
        echo_json({"agent_id": agent, "balance": money.fmt(new_balance)})
        return
    click.echo(f"{agent}: balance {money.fmt(new_balance)}")
    echo_next(f"forge ledger balance {agent}")


@ledger_group.command("balance")
@click.argument("agent")
@click.option("--json", "as_json", is_flag=True, help="Print the account row as JSON.")
def ledger_balance(agent, as_json):
    """Print AGENT's balance."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import ledger as ledger_mod
    from runner.registry import money

    if as_json:
        row = ledger_mod.account(ledger_mod.check_agent_id(agent))
        if row is None:
            raise ledger_mod.unknown_agent(agent)
        echo_json(row)
        return
    click.echo(money.fmt(ledger_mod.balance(agent)))
    echo_next(f"forge jobs list --agent {agent}", f"forge tools calls --agent {agent}")


@ledger_group.command("reap")
@click.option("--json", "as_json", is_flag=True, help="Print the reaped allocations as JSON.")
def ledger_reap(as_json):
    """Settle dead allocations as failed: open past their expiry, or whose host process is
    gone from this machine. Charges the time they ran, refunds the rest, marks their MLflow
    runs FAILED. Safe to run any time, from any number of hosts at once."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.jobs import recovery
    from runner.registry import money

    reaped = recovery.reap()
    if as_json:
        echo_json(reaped)
        return
    for alloc in reaped:
        click.echo(f"{alloc['id']} ({alloc['agent_id']}): {alloc['failure_reason']}; charged "
                   f"{money.fmt(alloc['actual_cost'])}, refunded "
                   f"{money.fmt(alloc['refunded'])} {alloc['currency']}")
    click.echo(f"reaped {len(reaped)} allocation{'' if len(reaped) == 1 else 's'}")
    echo_next("forge ledger check")


@ledger_group.command("check")
@JSON_OPTION
def ledger_check(as_json):
    """Verify the books balance and nothing is overdue; exit 1 and list the problems if not."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import recovery

    problems = recovery.check()
    if as_json:
        echo_json({"ok": not problems, "problems": problems})
        raise SystemExit(1 if problems else 0)
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise SystemExit(1)
    click.echo("ledger ok")
    echo_next("forge jobs list")


# --- jobs ---------------------------------------------------------------------------------

@main.group("jobs")
def jobs_group() -> None:
    """Asynchronous training jobs (submitit: local, or SLURM with FORGE_JOBS_EXECUTOR=slurm)."""


@jobs_group.command("status")
@click.argument("job_id")
@JSON_OPTION
def jobs_status(job_id, as_json):
    """A job's state, cost, progress, and its result or error."""
    from runner.jobs import background
    from runner.registry import ledger

    job = background.state(ledger.get_allocation(job_id))
    if as_json:
        echo_json(job)
        return
    _echo_job(job)


def _echo_job(job: dict) -> None:
    """A job for people: state and cost, then its progress, version or error; next line."""
    cost, job_id = job["cost"], job["job_id"]
    spent = (f"charged {cost['actual']}, refunded {cost['refunded']}" if cost["actual"]
             else f"debited {cost['debited']} (estimate {cost['estimated']})")
    click.echo(f"{job_id} ({job['agent_id']}): {job['status']}; {spent} {cost['currency']}")
    if job.get("progress"):
        progress = job["progress"]
        shown = ", ".join(f"{k} {v}" for k, v in progress.items()
                          if isinstance(v, (int, float, str)) and not isinstance(v, bool))
        click.echo(f"  progress: {shown}")
    result = job.get("result") or {}
    if result.get("artifact_id"):
        click.echo(f"  version: {result['artifact_id']} v{result.get('version_number', '')}")
    if job.get("error"):
        error = job["error"]
        click.echo(f"  error: {error['reason']}"
                   + (f": {error['message']}" if error.get("message") else ""))
    if result.get("artifact_id"):
        echo_next(f"forge models show {result['artifact_id']}")
    elif job["status"] in ("queued", "running"):
        echo_next(f"forge jobs log {job_id}", f"forge jobs status {job_id}")
    else:
        echo_next(f"forge jobs log {job_id}")


@jobs_group.command("log")
@click.argument("job_id")
@click.option("--tail", default=50, show_default=True, help="How many lines.")
@JSON_OPTION
def jobs_log(job_id, tail, as_json):
    """The last lines of a job's log."""
    from runner.jobs import background
    from runner.registry import ledger

    log = background.log_tail(ledger.get_allocation(job_id), tail)
    if as_json:
        echo_json(log)
        return
    for line in log["lines"]:
        click.echo(line)
    echo_next(f"forge jobs status {job_id}")


@jobs_group.command("cancel")
@click.argument("job_id")
@JSON_OPTION
def jobs_cancel(job_id, as_json):
    """Cancel a job: queued, refunded whole; running, stopped and charged what it ran."""
    from runner.jobs import background
    from runner.registry import ledger

    job = background.cancel(ledger.get_allocation(job_id), reason="by the operator")
    if as_json:
        echo_json(job)
        return
    _echo_job(job)


@jobs_group.command("list")
@click.option("--agent", "agent_id", default=None, help="Only this agent's jobs.")
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def jobs_list(agent_id, limit, as_json):
    """The newest jobs (allocations) first: state, agent, engine, cost, version."""
    from runner.jobs.background import STATES
    from runner.registry import ledger

    rows = ledger.list_allocations(agent_id=agent_id, limit=limit)
    if as_json:
        echo_json(rows)
        return
    echo_table(("job id", "state", "agent", "engine", "debited", "actual", "version"),
               [(r["id"], STATES.get(r["status"], r["status"]), r["agent_id"],
                 f"{r['engine']} {r['engine_job_id']}" if r["engine"] else "", r["debited"],
                 r["actual_cost"] or "", r["artifact_id"] or "") for r in rows],
               empty="no jobs yet")
    echo_next(f"forge jobs status {rows[0]['id']}" if rows else
              "forge train --parent MODEL_ID --dataset DATASET_ID --agent AGENT --dry-run")


# --- mcp ----------------------------------------------------------------------------------

@main.command("mcp")
@click.option("--agent", "agent", default=None,
              help="stdio: the agent every call of this server runs as (required).")
@click.option("--http", "port", type=int, default=None,
              help="Serve streamable HTTP on this port instead of stdio (bearer tokens: "
                   "forge agents add NAME).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="HTTP: the loopback address to listen on.")
@click.option("--blocking-per-agent", type=click.IntRange(min=1), default=2, show_default=True,
              envvar="FORGE_MCP_BLOCKING_PER_AGENT", show_envvar=True,
              help="Blocking calls (train_model_version, evaluate_candidate, cancel_job) one "
                   "agent may have running at once; one more is refused as busy.")
@click.option("--sessions-per-agent", type=click.IntRange(min=1), default=8, show_default=True,
              envvar="FORGE_MCP_SESSIONS_PER_AGENT", show_envvar=True,
              help="HTTP: open sessions one agent's tokens may hold; one more answers 503.")
@click.option("--session-idle-s", type=click.FloatRange(min=0, min_open=True), default=900,
              show_default=True, envvar="FORGE_MCP_SESSION_IDLE_S", show_envvar=True,
              help="HTTP: a session with no request in flight this long is closed.")
def mcp_cmd(agent, port, host, blocking_per_agent, sessions_per_agent, session_idle_s):
    """Serve the tools (train_model_version, submit_training, job_status, ...) over MCP:
    stdio bound to --agent, or streamable HTTP at http://HOST:PORT/mcp."""
    # lazy: the MCP SDK and runner.api (~1 s) stay out of `forge --help`
    from runner import mcp_server
    from runner.registry import db as dbmod

    lanes = mcp_server.Lanes(blocking_per_agent=blocking_per_agent)
    if port is None:
        if agent is None:
            raise click.UsageError("stdio needs --agent NAME (the agent every call runs as)")
        from runner.registry import ledger

        agent = ledger.check_agent_id(agent)
        dbmod.get_engine()  # no registry: refuse now, not on every call
        mcp_server.run_stdio(agent, lanes)
        return
    if agent is not None:
        raise click.UsageError("over HTTP each request's bearer token names the agent; "
                               "drop --agent")
    if host in mcp_server.LOOPBACK:  # (another host: run_http's refusal comes first)
        dbmod.get_engine()  # no registry: refuse now, not on every call
    click.echo(f"forge mcp: streamable HTTP at http://{host}:{port}/mcp (bearer tokens)",
               err=True)
    mcp_server.run_http(host, port, lanes=lanes, sessions=mcp_server.SessionLimits(
        per_agent=sessions_per_agent, idle_s=session_idle_s))


# --- tools ----------------------------------------------------------------------------------

@main.group("tools")
def tools_group() -> None:
    """Skills agents can call, and their audit trail."""


@tools_group.command("register")
def tools_register():
    """Write the skills rows (Train Model Version, ...); safe to re-run."""
    # lazy: runner.api and the registry (~350 ms) stay out of `forge --help`
    from runner.api import SKILLS
    from runner.tools import register_tools

    for skill in register_tools(SKILLS):
        click.echo(f"{skill['id']}: {skill['name']} ({skill['skill_type']})")
    echo_next("forge tools calls")


@tools_group.command("calls")
@click.option("--agent", "agent_id", default=None, help="Only this agent's calls.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many, newest first.")
@JSON_OPTION
def tools_calls(agent_id, limit, as_json):
    """The audit trail: the newest tool calls, who made them, how they ended, how long."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import audit

    rows = audit.list_calls(agent_id=agent_id, limit=limit)
    if as_json:
        echo_json(rows)
        return

    def status(row):
        return "ok" if row["success"] else f"error {row['error_code'] or ''}".rstrip()

    echo_table(("when (UTC)", "agent", "tool", "status", "duration"),
               [(_when(r["created_at"]), r["agent_id"] or "", r["tool"] or r["skill_id"] or "",
                 status(r), "" if r["duration_ms"] is None else f"{r['duration_ms']} ms")
                for r in rows],
               empty="no tool calls recorded" + (f" for agent {agent_id}" if agent_id else ""))
    failed = next((r for r in rows if not r["success"] and r["agent_id"]), None)
    echo_next(f"forge jobs list --agent {failed['agent_id']}" if failed else "forge jobs list")


# --- agents ---------------------------------------------------------------------------------

@main.group("agents")
def agents_group() -> None:
    """Agents' bearer tokens: who a caller of the MCP server is."""


@agents_group.command("add")
@click.argument("name")
def agents_add(name):
    """Issue a bearer token for agent NAME and print it (once)."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import agents

    issued = agents.issue(name)
    click.echo(f"agent {issued['agent_id']}: token {issued['token_id']}")
    click.echo(issued["token"])
    click.echo("This token is shown only once: the registry keeps only its sha256 hash.")
    echo_next(f"forge ledger grant {issued['agent_id']} 10", "forge mcp --http 8000")


@agents_group.command("revoke")
@click.argument("name")
@click.option("--token", "token_id", default=None, help="Revoke only this token id (tok-...).")
def agents_revoke(name, token_id):
    """Revoke NAME's active tokens (or the one token --token names)."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import agents

    n = agents.revoke(name, token_id)
    click.echo(f"revoked {n} token{'' if n == 1 else 's'} of agent {name}")
    echo_next("forge agents list")


@agents_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def agents_list(as_json):
    """List every token (ids and dates; the registry holds no token to show)."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import agents

    rows = agents.list_tokens()
    if as_json:
        echo_json(rows)
        return
    echo_table(("token", "agent", "state", "created (UTC)", "last used (UTC)"),
               [(r["token_id"], r["agent_id"], "revoked" if r["revoked_at"] else "active",
                 _when(r["created_at"]), _when(r["last_used_at"])) for r in rows],
               empty="no agent tokens yet")
    echo_next("forge agents add NAME" if not rows else
              f"forge tools calls --agent {rows[0]['agent_id']}")


# --- web ------------------------------------------------------------------------------------

@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The pages have no login: keep it on loopback.")
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--db-url", default=None,
              help="Registry to serve (default: FORGE_DB_URL, else the forge home's forge.db); "
                   "dry runs use it too.")
@click.option("--show-balances", is_flag=True, envvar="FORGE_SERVE_SHOW_BALANCES",
              show_envvar=True,
              help="Show the named agent's balance on the dry-run page (it has no login: off "
                   "by default).")
def serve(host, port, db_url, show_balances):
    """Serve read-only web pages: model families, version detail pages, the tool playground."""
    import os

    # lazy: uvicorn, Starlette and the registry (~400 ms) stay out of `forge --help`
    import uvicorn

    from runner.registry import db as dbmod
    from runner.web.app import create_app

    dbmod.get_engine(db_url)  # no registry: refuse now, not on every page
    if db_url:  # the dry run composes the operator's config, whose registry is FORGE_DB_URL
        os.environ["FORGE_DB_URL"] = db_url
    app = create_app(db_url, hosts=tuple(dict.fromkeys(["127.0.0.1", "localhost", host])),
                     show_balances=show_balances)
    click.echo(f"forge serve: http://{f'[{host}]' if ':' in host else host}:{port}/")
    uvicorn.run(app, host=host, port=port)


from runner.cli_train import jobs_submit, train_cmd  # noqa: E402

jobs_group.add_command(jobs_submit)
main.add_command(train_cmd)

if __name__ == "__main__":
    sys.exit(main())
