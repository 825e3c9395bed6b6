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
    """Create or migrate every registry table (idempotent)."""
    from runner import db as dbmod

    rev = dbmod.upgrade(url)
    click.echo(f"registry at revision {rev}")


@main.group()
def models() -> None:
    """Model artifacts and versions."""


@models.command("show")
@click.argument("artifact_id")
def models_show(artifact_id):
    """Print a model artifact with its model_versions row and links."""
    from runner import catalog

    model = catalog.get_model_version(artifact_id)
    model["links"] = catalog.links(artifact_id)
    echo_json(model)


@main.command("lineage")
@click.argument("artifact_id")
def lineage_cmd(artifact_id):
    """Show the version chain from the root model down to ARTIFACT_ID as a tree."""
    from rich.console import Console
    from rich.tree import Tree

    from runner import catalog

    chain = catalog.lineage(artifact_id)
    tree = node = None
    for row in chain:
        label = (f"[bold]{row['id']}[/] v{row['version_number']} "
                 f"[dim]{row['lifecycle_state']} {row['origin_type']}[/]")
        node = Tree(label) if node is None else node.add(label)
        tree = tree or node
    Console().print(tree)


@main.group()
def datasets() -> None:
    """Dataset artifacts."""


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def datasets_list(as_json):
    """List registered datasets with their citations."""
    from runner import catalog

    rows = catalog.list_artifacts("dataset")
    if as_json:
        echo_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "title", "source", "rows", "license", "sha256")
    for row in rows:
        cite = (row["metadata"] or {}).get("citation", {})
        table.add_row(row["id"], row["title"], cite.get("source", ""),
                      str(cite.get("row_count", "")), cite.get("license", ""),
                      (row["content_hash"] or "")[:12])
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
