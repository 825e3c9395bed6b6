"""Per-agent bearer tokens on SQLite and PostgreSQL: issue, verify, revoke, the CLI, and no
token ever at rest in the registry."""

from __future__ import annotations

import hashlib
import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from helpers import forget_engine

from runner.cli import main as forge
from runner.errors import InvalidInput
from runner.registry import agents, db
from runner.registry.schema import agent_tokens


def token_rows(url) -> list[dict]:
    with db.get_engine(url).connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(agent_tokens)).mappings()]


def statements(url) -> list[str]:
    """A list that fills with every SQL statement run on the registry at `url` from now on."""
    seen: list[str] = []
    sa.event.listen(db.get_engine(url), "before_cursor_execute",
                    lambda conn, cursor, sql, *args: seen.append(sql))
    return seen


def test_issue_then_verify_names_the_agent(db_url):
    issued = agents.issue("a1")
    assert set(issued) == {"token_id", "agent_id", "token"} and issued["agent_id"] == "a1"
    assert issued["token"].startswith("forge_") and len(issued["token"]) == 49
    assert issued["token_id"].startswith("tok-") and len(issued["token_id"]) == 16
    (row,) = token_rows(db_url)
    assert row["last_used_at"] is None
    assert agents.verify(issued["token"]) == "a1"
    (row,) = token_rows(db_url)
    assert row["last_used_at"] is not None and row["revoked_at"] is None


def test_the_token_is_nowhere_in_the_database(db_url):
    issued = agents.issue("a1")
    token = issued["token"]
    (row,) = token_rows(db_url)
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    secret = token[len("forge_"):]
    # a dump of every column of every registry table, as text: no trace of the secret part
    with db.get_engine(db_url).connect() as conn:
        meta = sa.MetaData()
        meta.reflect(conn)
        dump = [str(v) for table in meta.sorted_tables for r in conn.execute(sa.select(table))
                for v in r if v is not None]
    assert row["token_hash"] in dump and not any(secret in text for text in dump)


@pytest.mark.parametrize("bad", [None, 42, b"forge_x", ["forge_x"], "", "forge_" + "x" * 251,
                                 "x" * 10_000, "forge_\ud800", "forge_é"])
def test_what_cannot_be_a_token_is_none_without_a_query(db_url, bad):
    agents.issue("a1")
    seen = statements(db_url)
    assert agents.verify(bad) is None
    assert seen == []


def test_a_wrong_token_is_none(db_url):
    token = agents.issue("a1")["token"]
    assert agents.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert agents.verify(token + "x") is None
    assert agents.verify(" " + token) is None
    assert agents.verify(hashlib.sha256(token.encode()).hexdigest()) is None  # the hash is no key
    assert token_rows(db_url)[0]["last_used_at"] is None


def test_revoke_an_agent_or_one_token(db_url):
    first, second = agents.issue("a1"), agents.issue("a1")
    other = agents.issue("a2")
    assert agents.verify(first["token"]) == agents.verify(second["token"]) == "a1"

    assert agents.revoke(token_id=first["token_id"]) == 1
    assert agents.verify(first["token"]) is None and agents.verify(second["token"]) == "a1"
    assert agents.revoke(token_id=first["token_id"]) == 0  # already revoked
    assert agents.revoke("a2", token_id=second["token_id"]) == 0  # not a2's token

    assert agents.revoke("a1") == 1  # only the one still active
    assert agents.verify(second["token"]) is None
    assert agents.revoke("a1") == 0 and agents.revoke("nobody") == 0
    assert agents.revoke(token_id="tok-000000000000") == 0
    assert agents.verify(other["token"]) == "a2"  # another agent's tokens are untouched

    again = agents.issue("a1")  # a revoked agent can be issued a new token
    assert agents.verify(again["token"]) == "a1"
    assert sum(r["revoked_at"] is not None for r in token_rows(db_url)) == 2


def test_two_agents_tokens_are_independent(db_url):
    a1, a2 = agents.issue("a1"), agents.issue("agent.two@lab")
    assert a1["token"] != a2["token"] and a1["token_id"] != a2["token_id"]
    assert agents.verify(a1["token"]) == "a1" and agents.verify(a2["token"]) == "agent.two@lab"
    assert agents.revoke("a1") == 1
    assert agents.verify(a1["token"]) is None and agents.verify(a2["token"]) == "agent.two@lab"


@pytest.mark.parametrize("bad", ["", "system:mint", "../etc", "a b", None, 7, "x" * 129])
def test_bad_agent_ids_are_refused_before_any_write(db_url, bad):
    with pytest.raises(InvalidInput) as info:
        agents.issue(bad)
    assert info.value.field == "agent_id"
    assert token_rows(db_url) == []


def test_revoke_needs_a_name_and_takes_no_bad_one(db_url):
    agents.issue("a1")
    with pytest.raises(InvalidInput):
        agents.revoke()
    with pytest.raises(InvalidInput):
        agents.revoke("system:mint")
    with pytest.raises(InvalidInput):
        agents.revoke(token_id=["tok-1"])
    assert agents.list_tokens()[0]["revoked_at"] is None


def test_a_read_only_registry_still_verifies(db_url):
    """Stamping last_used_at is bookkeeping: when the write fails, the token still counts."""
    token = agents.issue("a1")["token"]
    engine = db.get_engine(db_url)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # a read-only database (a replica, say)
            name = engine.url.database
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        else:  # SQLite cannot read-only and BEGIN IMMEDIATE: make the update fail instead
            conn.exec_driver_sql("CREATE TRIGGER no_writes BEFORE UPDATE ON agent_tokens "
                                 "BEGIN SELECT RAISE(ABORT, 'read-only'); END")
    forget_engine(db_url)  # new connections see the setting
    assert agents.verify(token) == "a1"
    assert token_rows(db_url)[0]["last_used_at"] is None


def test_list_tokens_shows_no_hash(db_url):
    a1 = agents.issue("a1")
    agents.issue("a2")
    agents.revoke("a2")
    rows = agents.list_tokens()
    assert [r["agent_id"] for r in rows] == ["a1", "a2"]
    assert set(rows[0]) == {"token_id", "agent_id", "created_at", "revoked_at", "last_used_at"}
    assert rows[0]["token_id"] == a1["token_id"] and rows[0]["revoked_at"] is None
    assert rows[1]["revoked_at"] is not None


def test_cli(db_url):
    runner = CliRunner()
    result = runner.invoke(forge, ["agents", "add", "a1"])
    assert result.exit_code == 0, result.output
    header, token, notice, then = result.output.splitlines()
    (row,) = token_rows(db_url)
    assert header == f"agent a1: token {row['id']}"
    assert "shown only once" in notice and "hash" in notice
    assert then.startswith("next: forge ledger grant a1 ")
    assert agents.verify(token) == "a1"  # stamps last_used_at

    for args in (["agents", "list"], ["agents", "list", "--json"]):
        result = runner.invoke(forge, args)
        assert result.exit_code == 0, result.output
        assert row["id"] in result.output and "a1" in result.output
        assert token not in result.output and token[6:16] not in result.output
        assert row["token_hash"][:8] not in result.output
    listed = json.loads(runner.invoke(forge, ["agents", "list", "--json"]).output)
    assert [t["token_id"] for t in listed] == [row["id"]] and listed[0]["last_used_at"]

    second = agents.issue("a1")
    result = runner.invoke(forge, ["agents", "revoke", "a1", "--token", second["token_id"]])
    assert result.exit_code == 0
    assert result.output == "revoked 1 token of agent a1\nnext: forge agents list\n"
    assert agents.verify(token) == "a1"
    result = runner.invoke(forge, ["agents", "revoke", "a1"])
    assert result.exit_code == 0 and result.output.startswith("revoked 1 token of agent a1\n")
    assert agents.verify(token) is None
    result = runner.invoke(forge, ["agents", "revoke", "nobody"])
    assert result.exit_code == 0
    assert result.output.startswith("revoked 0 tokens of agent nobody\n")
    assert "revoked" in runner.invoke(forge, ["agents", "list"]).output

    result = runner.invoke(forge, ["agents", "add", "system:mint"])
    assert result.exit_code == 2 and "InvalidInput" in result.output
    assert len(token_rows(db_url)) == 2


def test_migration_0005_adds_agent_tokens(db_url):
    from alembic import command

    cfg = db.alembic_config(db_url)
    with db.get_engine(db_url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    assert "agent_tokens" not in sa.inspect(db.get_engine(db_url)).get_table_names()
    assert db.current_revision(db_url) == "0004"
    assert db.upgrade(db_url) == "0009"
    inspector = sa.inspect(db.get_engine(db_url))
    assert [c["name"] for c in inspector.get_columns("agent_tokens")] == [
        "id", "agent_id", "token_hash", "created_at", "revoked_at", "last_used_at"]
    issued = agents.issue("a1")
    assert agents.verify(issued["token"]) == "a1"
    (row,) = token_rows(db_url)
    with pytest.raises(sa.exc.IntegrityError), db.get_engine(db_url).begin() as conn:
        conn.execute(agent_tokens.insert().values(
            id="tok-000000000000", agent_id="a2", token_hash=row["token_hash"],
            created_at=db.now()))  # token_hash is unique
