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
    # lazy: runner.api and the registry (~350 ms) stay out of `forge --help`
    from runner.api import SKILLS
    from runner.registry import db as dbmod
    from runner.tools import register_tools

    rev = dbmod.upgrade(url)
    with dbmod.transaction(url=url) as conn:
        register_tools(SKILLS, conn=conn)
    click.echo(f"registry at revision {rev}")


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
    from runner.api import evaluate_candidate
    from runner.jobs.gate import decision_text

    result = evaluate_candidate(candidate_id, agent_id, gate_name, dry_run,
                                justification=justification, allow_dirty=allow_dirty)
    if as_json or dry_run:
        echo_json(result)
        return
    click.echo(decision_text(result))


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


if __name__ == "__main__":
    sys.exit(main())
