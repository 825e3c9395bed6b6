"""The registry at scale (issue 30, build 3): migration 0009's indices, `forge models list`
and the `forge serve` index a page at a time, sorted in the database exactly as the index
sorted in Python, and `forge ledger check` finding what it found when it read everything.
benchmarks/registry_scale.py times them at 100,000 versions."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from starlette.testclient import TestClient

from runner.cli import main as forge
from runner.jobs.datasets import builtin_citation
from runner.registry import catalog, db, ledger, recovery
from runner.registry.schema import token_ledger
from runner.web import listings
from runner.web.app import create_app

SCALE_INDICES = {"artifacts": {"ix_artifacts_type_created_at", "ix_artifacts_type_is_latest",
                               "ix_artifacts_type_lifecycle_state"},
                 "model_versions": {"ix_model_versions_base_model_id"}}


def _indices(url: str) -> dict[str, set[str]]:
    inspector = sa.inspect(db.get_engine(url))
    return {t: {ix["name"] for ix in inspector.get_indexes(t)} for t in SCALE_INDICES}


def _migrate(url: str, revision: str) -> None:
    from alembic import command

    cfg = db.alembic_config(url)
    with db.get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def test_migration_0009_creates_the_scale_indices_and_drops_them_going_back(db_url):
    assert all(SCALE_INDICES[t] <= names for t, names in _indices(db_url).items())
    _migrate(db_url, "0008")
    assert all(not SCALE_INDICES[t] & names for t, names in _indices(db_url).items())
    assert db.upgrade(db_url) == "0009"
    assert all(SCALE_INDICES[t] <= names for t, names in _indices(db_url).items())


def _models(n: int) -> list[str]:
    """`n` base models, oldest first; ids of mixed case (code-point order differs from a
    locale's), every other one trained on a dataset and charged for."""
    catalog.register_dataset("dataset-geo-GSE100866", "CBMC", builtin_citation("cbmc"))
    ledger.grant("a1", "100")
    ids = []
    for i in range(n):
        alloc = None
        if i % 2:
            alloc = ledger.reserve("a1", Decimal(i), f"rk-{i}", wall_time_cap_min=10,
                                   vram_cap_gb=1, price_per_hour="1")["id"]
            if i % 4 == 1:
                ledger.settle(alloc, 60)
        model = catalog.register_model(
            artifact_id=f"{'Zeta' if i % 3 else 'alpha'}-{i}", title=f"m{i}",
            metadata={"family": "scgpt" if i % 2 else "Linear", "framework": "x"},
            created_by="t", origin_type="external", origin_url="file:///w",
            training_dataset_artifact_id="dataset-geo-GSE100866" if i % 2 else None,
            version={"gpu_allocation_id": alloc})
        ids.append(model["id"])
    return ids


def test_models_list_reads_one_page_newest_first(db_url):
    ids = _models(5)
    newest = ids[::-1]
    cli = CliRunner()
    first = cli.invoke(forge, ["models", "list", "--limit", "2"])
    assert first.exit_code == 0, first.output
    shown = [line.split()[0] for line in first.output.splitlines()[1:3]]
    assert shown == newest[:2]
    assert "page 1 of 3 (5 versions, 2 a page)" in first.output
    assert "forge models list --page 2 --limit 2" in first.output
    last = cli.invoke(forge, ["models", "list", "--limit", "2", "--page", "3"])
    assert [ln.split()[0] for ln in last.output.splitlines()[1:2]] == newest[4:]
    assert "next: forge models show" in last.output
    beyond = cli.invoke(forge, ["models", "list", "--limit", "2", "--page", "4"])
    assert beyond.exit_code == 0 and "no page 4: 5 versions make 3 page(s) of 2" in beyond.output
    as_json = cli.invoke(forge, ["models", "list", "--limit", "2", "--page", "2", "--json"])
    assert re.findall(r'"id": "([^"]+)"', as_json.output)[:2] == newest[2:4]
    assert cli.invoke(forge, ["models", "list", "--limit", "0"]).exit_code == 2


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_a_database_sorted_page_is_the_slice_python_sorted(db_url, order):
    """Every key the database sorts pages exactly as the whole list sorted in Python did
    (values, then ids, in code-point order; rows without a value last, oldest first)."""
    _models(9)
    with db.transaction() as conn:
        everything = listings._rows(catalog.list_artifacts("model", conn=conn), conn)
        for sort in catalog.MODEL_SORTS:
            key = listings.SORT_KEYS[sort]
            present = sorted((r for r in everything if key(r) is not None),
                             key=lambda r: (key(r), r["id"]), reverse=order == "desc")
            expected = [r["id"] for r in present + [r for r in everything if key(r) is None]]
            paged = [r["id"] for page in range(1, 5)
                     for r in listings.version_rows(conn, sort, order, page, 3)[0]]
            assert paged == expected, sort


def test_the_serve_index_is_paged(db_url, monkeypatch):
    ids = _models(5)
    monkeypatch.setattr(listings, "PER_PAGE", 2)
    client = TestClient(create_app(db_url), base_url="http://127.0.0.1")

    def rows(query: str) -> list[str]:
        page = client.get(f"/{query}")
        assert page.status_code == 200, page.text
        return re.findall(r'<tr class="version">\s*<td><a href="/artifacts/([^"]+)"', page.text)

    assert rows("") == ids[::-1][:2] and rows("?page=3") == ids[:1]
    page2 = client.get("/?page=2").text
    assert "page 2 of 3" in page2
    assert 'href="/?sort=date&amp;order=desc&amp;page=1" rel="prev"' in page2
    assert 'href="/?sort=date&amp;order=desc&amp;page=3" rel="next"' in page2
    assert rows("?sort=id&order=asc&page=1") == sorted(ids)[:2]
    assert "No page 9: 5 versions make 3 pages" in client.get("/?page=9").text
    for bad in ("0", "x", "-1", "1e3"):
        answer = client.get(f"/?page={bad}")
        assert answer.status_code == 400 and "not a page number" in answer.text


def test_ledger_check_names_what_the_books_get_wrong(db_url):
    ledger.grant("a1", "10")
    good = ledger.reserve("a1", "2", "rk-good", wall_time_cap_min=10, vram_cap_gb=1,
                          price_per_hour="1")
    ledger.settle(good["id"], 60)
    bad = ledger.reserve("a1", "3", "rk-bad", wall_time_cap_min=10, vram_cap_gb=1,
                         price_per_hour="1")
    assert recovery.check() == []
    with db.get_engine(db_url).begin() as conn:
        for ref, reason in ((bad["id"], "compute_debit"), ("alloc-nowhere", "compute_refund")):
            conn.execute(token_ledger.insert().values(
                id=f"led-{ref}", ts=db.now(), from_account="a1", to_account="system:compute",
                amount=Decimal("3"), reason=reason, reference_type="resource_allocation",
                reference_id=ref))
    problems = recovery.check()
    assert f"allocation {bad['id']}: debited 3.000000 but ledger has 2 debit rows totalling " \
           "6.000000" in problems
    assert "ledger rows reference unknown allocation alloc-nowhere" in problems
    assert not any(good["id"] in p for p in problems)


def test_the_index_families_are_read_per_lineage(db_url, monkeypatch):
    """Each family: its count, its newest version, each lineage's champion (oldest lineage
    first) and its candidates, the first CANDIDATES_SHOWN of them and how many more."""
    from runner.web import pages

    ids = _models(4)  # bases; scgpt: 1, 3 (odd), Linear: 0, 2
    children = [catalog.register_model(
        title="c", metadata={"family": "scgpt", "framework": "x"}, created_by="t",
        parent_artifact_id=ids[1], origin_type="external", origin_url="file:///c")["id"]
        for _ in range(3)]
    monkeypatch.setattr(pages, "CANDIDATES_SHOWN", 2)
    with db.transaction() as conn:
        by_name = {f["name"]: f for f in pages.families(conn)}
    assert set(by_name) == {"scgpt", "Linear"}
    scgpt, linear = by_name["scgpt"], by_name["Linear"]
    assert (scgpt["count"], linear["count"]) == (5, 2)
    assert scgpt["latest"]["id"] == children[-1] and linear["latest"]["id"] == ids[2]
    assert [c["id"] for c in scgpt["champions"]] == [ids[1], ids[3]]
    assert [c["id"] for c in scgpt["candidates"]] == children[:2]
    assert scgpt["more_candidates"] == 1 and linear["candidates"] == []
    page = TestClient(create_app(db_url), base_url="http://127.0.0.1").get("/").text
    assert "and 1 more" in page
