"""`make demo`: the main job. Migrates the registry under FORGE_HOME and prints its status."""

from __future__ import annotations

from rich.console import Console

from runner import catalog, db, settings


def main() -> None:
    console = Console()
    console.print(f"[bold]forge-runner demo[/] registry {settings.db_url()}")
    console.print(f"schema at revision {db.upgrade()}")
    for kind in ("dataset", "model"):
        console.print(f"{kind}s registered: {len(catalog.list_artifacts(kind))}")


if __name__ == "__main__":
    main()
