"""`forge`: the admin CLI (registry, ledger, tools). Heavy modules are imported per command."""

from __future__ import annotations

import json
import sys

import click

from runner.errors import ForgeError


class _Group(click.Group):
    """Turns a ForgeError into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ForgeError as exc:
            click.echo(f"error: {type(exc).__name__}: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """forge-runner administration: registry, lineage, ledger, tools."""


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# --- registry -------------------------------------------------------------------------------

@main.group()
def db() -> None:
    """Registry database."""


@db.command("upgrade")
@click.option("--url", default=None, help="Database URL (default: FORGE_DB_URL or outputs/forge.db).")
def db_upgrade(url):
    """Create or migrate every registry table and write the skills rows (idempotent)."""
    # lazy: the registry (~350 ms) stays out of `forge --help`
    from runner.registry import db as dbmod

    click.echo(f"registry at revision {dbmod.upgrade(url)}")  # skills included


@main.group()
def models() -> None:
    """Model artifacts and versions."""


@models.command("show")
@click.argument("artifact_id")
def models_show(artifact_id):
    """Print a model artifact with its model_versions row, links and gate evaluations."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import catalog, promotion

    model = catalog.get_model_version(artifact_id)
    model["links"] = catalog.links(artifact_id)
    model["evaluations"] = promotion.recorded(artifact_id)
    echo_json(model)


@models.command("register")
@click.argument("artifact_id")
@click.argument("origin_url")
@click.option("--sha256", default=None, help="The checkpoint's tree hash, if published: checked.")
@click.option("--title", default=None)
@click.option("--family", default="scgpt", show_default=True,
              help="The model family whose checkpoint it is (scgpt, scvi, linear): its code "
                   "trains and evaluates it; also the MLflow registered-model name.")
def models_register(artifact_id, origin_url, sha256, title, family):
    """Register a checkpoint of a model family (ORIGIN_URL: a file:// folder or archive, an
    http(s):// archive) as a base model, from its own small files (scGPT: args.json and
    vocab.json; scvi: a folder saved by scvi-tools, forge.json when it has one; linear:
    model.json). Weights are never unpickled on this host."""
    # lazy: the registry and the weights store (~300 ms) stay out of `forge --help`
    from runner.jobs import parents

    row = parents.register_parent(artifact_id, origin_url, sha256=sha256, title=title,
                                  family=family)
    meta = row["metadata"]
    vocab = (meta.get("checkpoint") or {}).get("vocab")
    click.echo(f"{row['id']}: {meta['family']} {meta['architecture']}"
               + (f", vocabulary of {vocab['size']} tokens" if vocab else "")
               + f", sha256 {row['content_hash']}")


@main.command("lineage")
@click.argument("artifact_id")
def lineage_cmd(artifact_id):
    """Show the version chain from the root model down to ARTIFACT_ID as a tree."""
    # lazy: rich (~40 ms) and the registry's SQLAlchemy (~150 ms) stay out of `forge --help`
    from rich.console import Console
    from rich.tree import Tree

    from runner.registry import catalog

    chain = catalog.lineage(artifact_id)
    tree = node = None
    for row in chain:
        label = (f"[bold]{row['id']}[/] v{row['version_number']} "
                 f"[dim]{row['lifecycle_state']} {row['origin_type']}[/]")
        node = Tree(label) if node is None else node.add(label)
        tree = tree or node
    Console().print(tree)


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
    if as_json or dry_run:
        echo_json(result)
        return
    click.echo(decision_text(result))


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
    for line in _columns(("benchmark", "dataset", "task", "metric", "versions", "best"),
                         table):
        click.echo(line)


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
    # lazy: rich (~40 ms) stays out of `forge --help`
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "title", "source", "rows", "license", "sha256")
    for row in rows:
        cite = (row["metadata"] or {}).get("citation", {})
        table.add_row(row["id"], row["title"], cite.get("source", ""),
                      str(cite.get("row_count", "")), cite.get("license", ""),
                      (row["content_hash"] or "")[:12])
    Console().print(table)



@datasets.command("register")
@click.argument("artifact_id")
@click.argument("url")
@click.option("--title", required=True)
@click.option("--license", "license_", required=True, help="The data's license (cited).")
@click.option("--label-key", default=None, help="The cell-type column (h5ad obs, csv column).")
@click.option("--source", default="user", show_default=True, help="Where it comes from (geo, ...).")
@click.option("--external-id", default=None, help="Its id there (GSE..., ...).")
@click.option("--doi", default=None)
def datasets_register(artifact_id, url, title, license_, label_key, source, external_id, doi):
    """Register your own dataset file (URL: file:// or http(s)://; h5ad, mat or csv), read
    once with the trainer's loader; its citation records the sha256 jobs are checked against."""
    # lazy: the loader (anndata, ~1 s) stays out of `forge --help`
    from runner.jobs import datasets as datasets_mod

    row = datasets_mod.register_file(artifact_id, url, title=title, license=license_,
                                     label_key=label_key, source=source,
                                     external_id=external_id, doi=doi)
    cite = row["metadata"]["citation"]
    click.echo(f"{row['id']}: {cite['schema_summary']}, sha256 {cite['sha256']}")


# --- ledger ---------------------------------------------------------------------------------

@main.group("ledger")
def ledger_group() -> None:
    """Compute credits: grants, balances, the books."""


@ledger_group.command("grant", context_settings={"ignore_unknown_options": True})
@click.argument("agent")
@click.argument("amount")
@click.option("--memo", default=None, help="Why (kept in the ledger row).")
def ledger_grant(agent, amount, memo):
    """Credit AMOUNT (a decimal such as 10 or 2.50) to AGENT, opening its account."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import ledger as ledger_mod
    from runner.registry import money

    new_balance = ledger_mod.grant(agent, amount, memo=memo)
    click.echo(f"{agent}: balance {money.fmt(new_balance)}")


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


@ledger_group.command("check")
def ledger_check():
    """Verify the books balance and nothing is overdue; exit 1 and list the problems if not."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import recovery

    problems = recovery.check()
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise SystemExit(1)
    click.echo("ledger ok")


# --- jobs ---------------------------------------------------------------------------------

@main.group("jobs")
def jobs_group() -> None:
    """Asynchronous training jobs (submitit: local, or SLURM with FORGE_JOBS_EXECUTOR=slurm)."""


@jobs_group.command("submit")
@click.argument("parent_artifact_id")
@click.argument("dataset_artifact_id")
@click.argument("overrides", nargs=-1)
@click.option("--agent", "agent_id", required=True, help="The agent that pays.")
@click.option("--cap", "wall_time_cap_min", type=int, default=120, show_default=True,
              help="Wall-time cap in minutes (the estimate is priced on it).")
@click.option("--device", default=None, help="auto, cpu, h100, h200, ...")
@click.option("--allow-dirty", is_flag=True, help="Run the working tree's uncommitted code.")
def jobs_submit(parent_artifact_id, dataset_artifact_id, overrides, agent_id,
                wall_time_cap_min, device, allow_dirty):
    """Debit and queue a fine-tune of PARENT on DATASET; OVERRIDES are training.<key>=<value>
    or training=<option>. Prints the job at once."""
    # lazy: runner.api and the registry (~350 ms) stay out of `forge --help`
    from runner.api import submit_training

    echo_json(submit_training(parent_artifact_id, dataset_artifact_id, agent_id=agent_id,
                              wall_time_cap_min=wall_time_cap_min, device=device,
                              overrides=list(overrides), allow_dirty=allow_dirty))


@jobs_group.command("status")
@click.argument("job_id")
def jobs_status(job_id):
    """A job's state, cost, progress, and its result or error."""
    from runner.jobs import background
    from runner.registry import ledger

    echo_json(background.state(ledger.get_allocation(job_id)))


@jobs_group.command("log")
@click.argument("job_id")
@click.option("--tail", default=50, show_default=True, help="How many lines.")
def jobs_log(job_id, tail):
    """The last lines of a job's log."""
    from runner.jobs import background
    from runner.registry import ledger

    for line in background.log_tail(ledger.get_allocation(job_id), tail)["lines"]:
        click.echo(line)


@jobs_group.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id):
    """Cancel a job: queued, refunded whole; running, stopped and charged what it ran."""
    from runner.jobs import background
    from runner.registry import ledger

    echo_json(background.cancel(ledger.get_allocation(job_id), reason="by the operator"))


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
    from rich.console import Console
    from rich.table import Table

    table = Table("job id", "state", "agent", "engine", "debited", "actual", "version")
    for row in rows:
        engine = f"{row['engine']} {row['engine_job_id']}" if row["engine"] else ""
        table.add_row(row["id"], STATES.get(row["status"], row["status"]), row["agent_id"],
                      engine, str(row["debited"]), str(row["actual_cost"] or ""),
                      row["artifact_id"] or "")
    Console().print(table)


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

    lanes = mcp_server.Lanes(blocking_per_agent=blocking_per_agent)
    if port is None:
        if agent is None:
            raise click.UsageError("stdio needs --agent NAME (the agent every call runs as)")
        from runner.registry import ledger

        mcp_server.run_stdio(ledger.check_agent_id(agent), lanes)
        return
    if agent is not None:
        raise click.UsageError("over HTTP each request's bearer token names the agent; "
                               "drop --agent")
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


@agents_group.command("revoke")
@click.argument("name")
@click.option("--token", "token_id", default=None, help="Revoke only this token id (tok-...).")
def agents_revoke(name, token_id):
    """Revoke NAME's active tokens (or the one token --token names)."""
    # lazy: the registry's SQLAlchemy (~150 ms) stays out of `forge --help`
    from runner.registry import agents

    n = agents.revoke(name, token_id)
    click.echo(f"revoked {n} token{'' if n == 1 else 's'} of agent {name}")


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
    # lazy: rich (~40 ms) stays out of `forge --help`
    from rich.console import Console
    from rich.table import Table

    def when(stamp):
        return stamp.strftime("%Y-%m-%d %H:%M") if stamp else ""

    table = Table("token", "agent", "state", "created (UTC)", "last used (UTC)")
    for row in rows:
        table.add_row(row["token_id"], row["agent_id"],
                      "revoked" if row["revoked_at"] else "active",
                      when(row["created_at"]), when(row["last_used_at"]))
    Console().print(table)


# --- web ------------------------------------------------------------------------------------

@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The pages have no login: keep it on loopback.")
@click.option("--port", default=8765, show_default=True, type=int)
@click.option("--db-url", default=None,
              help="Registry to serve (default: FORGE_DB_URL or outputs/forge.db); dry runs "
                   "use it too.")
@click.option("--show-balances", is_flag=True, envvar="FORGE_SERVE_SHOW_BALANCES",
              show_envvar=True,
              help="Show the named agent's balance on the dry-run page (it has no login: off "
                   "by default).")
def serve(host, port, db_url, show_balances):
    """Serve read-only web pages: model families, version detail pages, the tool playground."""
    import os

    # lazy: uvicorn, Starlette and the registry (~400 ms) stay out of `forge --help`
    import uvicorn

    from runner.web.app import create_app

    if db_url:  # the dry run composes the operator's config, whose registry is FORGE_DB_URL
        os.environ["FORGE_DB_URL"] = db_url
    app = create_app(db_url, hosts=tuple(dict.fromkeys(["127.0.0.1", "localhost", host])),
                     show_balances=show_balances)
    click.echo(f"forge serve: http://{f'[{host}]' if ':' in host else host}:{port}/")
    uvicorn.run(app, host=host, port=port)


if __name__ == "__main__":
    sys.exit(main())
