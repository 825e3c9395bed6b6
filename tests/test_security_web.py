"""forge serve's dry-run page has no login (issue 24, hole 10b): it speaks for no agent.

Its dry run is audited under the page's own identity (`web`), never in the named agent's
name, and says nothing about the agent's account (balance, shortfall, whether it has one)
unless the operator started the server with `--show-balances`. Real registry, real uvicorn.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import AGENT, BASE_ID, DATASET_ID, scratch_code_repo, serving

from runner.registry import db, ledger, schema


@pytest.fixture(params=[False, True], ids=["default", "show-balances"])
def page(request, sqlite_registry, tmp_path, monkeypatch):
    """(base URL, show_balances): create_app as `forge serve` builds it, with or without the
    operator's flag; the default is what a plain `forge serve` gets."""
    from runner.web.app import create_app

    scratch_code_repo(tmp_path, monkeypatch)
    app = create_app(show_balances=True) if request.param else create_app()
    with serving(app) as url:
        yield url, request.param


def _dry_run(url: str, agent: str) -> str:
    query = urllib.parse.urlencode({"parent_artifact_id": BASE_ID,
                                    "dataset_artifact_id": DATASET_ID, "agent_id": agent,
                                    "wall_time_cap_min": "60", "vram_cap_gb": "8"})
    with urllib.request.urlopen(f"{url}/tools/dry-run?{query}", timeout=120) as reply:
        assert reply.status == 200
        return " ".join(re.sub(r"<[^>]+>", " ", reply.read().decode()).split())


def _callers(url: str) -> list[str]:
    with db.get_engine(url).connect() as conn:
        return list(conn.execute(sa.select(schema.tool_calls.c.agent_id)).scalars())


def test_the_pages_dry_run_is_the_pages_own_and_shows_a_balance_only_when_the_operator_says(
        page, sqlite_registry):
    url, shown = page
    ledger.grant("agent-poor", "0.01")  # less than the 0.50 a 60-minute estimate needs
    funded, poor, nobody = (_dry_run(url, a) for a in (AGENT, "agent-poor", "agent-nobody"))

    assert _callers(sqlite_registry) == ["web"] * 3  # never a row in the agents' names
    assert "cost 0.5" in funded  # the estimate is the page's to show, the account is not
    if shown:
        assert re.search(r"balance 10(\.0+)? credits", funded) and "would_launch: yes" in funded
        assert "insufficient_balance" in poor and "0.01" in poor
        assert "unknown_agent" in nobody
        return
    for text in (funded, poor, nobody):
        assert "balance not shown" in text and "--show-balances" in text
        assert "would_launch: yes" in text, text
        assert "insufficient_balance" not in text and "unknown_agent" not in text
        assert not re.search(r"balance \d", text)
    assert "0.01" not in poor


def test_forge_serve_has_the_operators_flag():
    forge = str(Path(sys.executable).with_name("forge"))
    out = subprocess.run([forge, "serve", "--help"], capture_output=True, text=True, timeout=60,
                         check=False, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "--show-balances" in out.stdout
    assert "FORGE_SERVE_SHOW_BALANCES" in out.stdout
