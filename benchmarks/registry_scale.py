"""The registry at scale: 100,000 model versions in 1,000 lineages, 1,000,000 tool calls and
200,000 allocations, on SQLite and PostgreSQL, and how long what people and agents run takes.

    python benchmarks/registry_scale.py [--smoke] [--reps 7]
        [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres] [--no-sqlite]

Creates the schema through the project's Alembic migrations (db.upgrade), fills it in bulk
(executemany on SQLite, COPY on PostgreSQL: the fill is not what is measured), then times,
as medians of --reps repetitions after one warm-up: a warm dry run, `forge models list` (a
page), the `forge serve` index and a version's detail page (the real app, Starlette's test
client), a lineage walk, the gate's champion lookup, `forge ledger check` and a reaper pass.
Target: each at most 100 ms on PostgreSQL, the ledger check at most 2 s. PostgreSQL runs in
a database of its own (forge_scale_<pid>), dropped afterwards. --smoke: 1,000 versions in 10
lineages, 10,000 tool calls, 2,000 allocations (seconds).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARENT, DATASET = "model-scgpt-cbmc-base", "dataset-geo-GSE100866"
FAMILIES = ("scgpt", "scvi", "linear")
TASK = {"scgpt": "finetune_celltype", "scvi": "finetune_celltype", "linear": "finetune_celltype"}
AGENTS = [f"agent-{i}" for i in range(100)]
TARGET_S = {"ledger check": 2.0}
DEFAULT_TARGET_S = 0.100
BEFORE_REVISION = "0008"  # the schema of the code before the registry-scale work


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"lineages": 10, "versions": 1_000, "tool_calls": 10_000, "allocations": 2_000}
    return {"lineages": 1_000, "versions": 100_000, "tool_calls": 1_000_000,
            "allocations": 200_000}


# --- the fill --------------------------------------------------------------------------------

def fill(url: str, n: dict) -> dict:
    """Bulk rows through the migrated schema; returns ids the timings use."""
    import sqlalchemy as sa

    from runner.registry import db, schema

    rnd = random.Random(0)
    engine = db.get_engine(url)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    money = Decimal("0.000001")
    later = datetime.now(UTC) + timedelta(days=1)  # the running allocations' expiry
    tables: dict[str, list[dict]] = {t: [] for t in (
        "artifacts", "model_versions", "artifact_links", "resource_allocations",
        "token_ledger", "evaluations", "tool_calls", "token_accounts")}
    refunds = {a: Decimal(0) for a in AGENTS}
    debits = {a: Decimal(0) for a in AGENTS}

    def allocation(i: int, when: datetime, status: str = "settled") -> str:
        agent = AGENTS[i % len(AGENTS)]
        alloc_id = f"alloc-{i:07d}"
        debited = (Decimal(rnd.randint(100, 5000)) / 100).quantize(money)
        actual = (debited * Decimal(rnd.random())).quantize(money)
        final = status != "running"
        tables["resource_allocations"].append(dict(
            id=alloc_id, agent_id=agent, resource_type="gpu", device="cuda:0", devices=1,
            status=status, wall_time_cap_min=120, vram_cap_gb=24, price_per_hour=Decimal("2"),
            currency="credits", estimated_cost=debited, debited=debited,
            actual_seconds=3600.0 if final else None, actual_cost=actual if final else None,
            refunded=debited - actual if final else None, request_key=f"rk-{i}",
            mlflow_run_id=None, artifact_id=None, failure_reason=None, created_at=when,
            debited_at=when, started_at=when, settled_at=when + timedelta(hours=1)
            if final else None,
            expires_at=when + timedelta(hours=3) if final else later,
            heartbeat_at=datetime.now(UTC) if not final else when, host="bench:1",
            purpose="training", engine=None, engine_job_id=None, memory_cap_gb=None))
        debits[agent] += debited
        tables["token_ledger"].append(dict(
            id=f"led-d-{i}", ts=when, from_account=agent, to_account="system:compute",
            amount=debited, reason="compute_debit", reference_type="resource_allocation",
            reference_id=alloc_id, memo=None, balance_after_from=None, balance_after_to=None))
        if final and debited - actual > 0:
            refunds[agent] += debited - actual
            tables["token_ledger"].append(dict(
                id=f"led-r-{i}", ts=when, from_account="system:compute", to_account=agent,
                amount=debited - actual, reason="compute_refund",
                reference_type="resource_allocation", reference_id=alloc_id, memo=None,
                balance_after_from=None, balance_after_to=None))
        return alloc_id

    per_lineage = n["versions"] // n["lineages"]
    clock = 0
    alloc_n = 0
    candidates_per_lineage = 2
    for lin in range(n["lineages"]):
        family = FAMILIES[lin % len(FAMILIES)]
        meta = {"family": family, "framework": family, "task": TASK[family]}
        root = f"{family}-base-{lin:04d}"
        champion = root
        for v in range(per_lineage):
            clock += 1
            when = start + timedelta(seconds=clock * 7 + lin)
            art_id = root if v == 0 else f"{family}-v{v + 1}-{lin:04d}-{v:03d}"
            trained = v > 0
            alloc_id = allocation(alloc_n, when) if trained else None
            alloc_n += trained
            metric = round(0.5 + 0.4 * rnd.random(), 4)
            if not trained:
                state, promo = "active", "promoted"
            elif v >= per_lineage - candidates_per_lineage:
                state, promo = "candidate", "candidate"
            elif rnd.random() < 0.4:
                state, promo = "superseded", "superseded"
            else:
                state, promo = "rejected", "rejected"
            tables["artifacts"].append(dict(
                id=art_id, artifact_type="model", title=f"{family} {v + 1}",
                version_number=v + 1, parent_version_id=champion if trained else None,
                version_tag=f"v{v + 1}", changelog=None, is_latest=not trained,
                lifecycle_state=state, lifecycle_changed_at=when, superseded_by=None,
                origin_type="internal" if trained else "external",
                origin_url=None if trained else "file:///weights", content_hash="0" * 64,
                metadata=meta, created_by=AGENTS[v % len(AGENTS)], created_at=when))
            tables["model_versions"].append(dict(
                artifact_id=art_id, is_external=not trained, base_model_id=root if trained
                else None, code_commit_sha="c" * 40, gpu_allocation_id=alloc_id,
                trained_by=AGENTS[v % len(AGENTS)] if trained else None,
                training_params_json={"lr": 1e-4}, eval_metrics_json={"test_macro_f1": metric},
                eval_dataset_artifact_id=DATASET, training_dataset_artifact_id=DATASET,
                promotion_state=promo, created_at=when))
            if trained:
                tables["artifact_links"].append(dict(
                    source_id=art_id, target_id=champion, link_type="derives_from",
                    created_at=when))
                if state != "candidate":
                    tables["evaluations"].append(dict(
                        id=f"eval-{art_id}", candidate_artifact_id=art_id,
                        comparator_artifact_id=champion, comparator_role="champion",
                        gate_name="bench", gate_config={}, gate_config_sha256="0" * 64,
                        metric="test_macro_f1", candidate_value=metric, comparator_value=0.6,
                        delta=metric - 0.6, ci_low=-0.01, ci_high=0.01, confidence=0.95,
                        n_resamples=1000, n_cells=500, seed=0, baseline_value=0.5,
                        decision="promoted" if state == "superseded" else "rejected",
                        reasons=[], allocation_id=alloc_id, agent_id="bench", created_at=when))
                if state == "superseded":
                    champion = art_id
        # the champion is the lineage's latest (the gate's rule)
        for row in tables["artifacts"][-per_lineage:]:
            if row["id"] == champion:
                row["is_latest"], row["lifecycle_state"] = True, "active"
            elif row["id"] == root:
                row["is_latest"] = False
                row["lifecycle_state"] = "superseded" if champion != root else "active"
    running = 20
    while alloc_n < n["allocations"]:
        status = "running" if n["allocations"] - alloc_n <= running else "settled"
        allocation(alloc_n, start + timedelta(seconds=alloc_n), status)
        alloc_n += 1
    stamp = datetime.now(UTC)
    for agent in AGENTS:
        granted = debits[agent] + Decimal(1000)
        tables["token_ledger"].append(dict(
            id=f"led-g-{agent}", ts=start, from_account="system:mint", to_account=agent,
            amount=granted, reason="grant", reference_type=None, reference_id=None, memo=None,
            balance_after_from=None, balance_after_to=None))
        tables["token_accounts"].append(dict(
            account_id=agent, balance=granted - debits[agent] + refunds[agent],
            total_granted=granted, total_debited=debits[agent],
            total_refunded=refunds[agent], created_at=start, updated_at=stamp))
    with engine.connect() as conn:
        skills = list(conn.execute(sa.select(schema.skills.c.id)).scalars()) or [None]
    for i in range(n["tool_calls"]):
        tables["tool_calls"].append(dict(
            id=f"tc-{i:08d}", skill_id=skills[i % len(skills)], agent_id=AGENTS[i % 100],
            input_params={"parent_artifact_id": PARENT, "dry_run": True},
            output_summary={"ok": True}, success=True, duration_ms=12, error_code=None,
            error_message=None, created_at=start + timedelta(milliseconds=i * 50)))
    order = ("resource_allocations", "artifacts", "model_versions", "artifact_links",
             "evaluations", "token_accounts", "token_ledger", "tool_calls")
    with engine.begin() as conn:
        for name in order:
            _bulk(conn, getattr(schema, name), tables[name])
    # as autovacuum would leave a registry this size: statistics, and the visibility map that
    # lets an index answer a count without the table
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE" if conn.dialect.name == "postgresql"
                             else "ANALYZE")
    models = tables["artifacts"]
    deepest = max((m for m in models if m["lifecycle_state"] == "candidate"),
                  key=lambda m: m["version_number"])
    return {"leaf": deepest["id"], "detail": deepest["id"],
            "rows": {k: len(v) for k, v in tables.items()}}


def _bulk(conn, table, rows: list[dict]) -> None:
    """COPY on PostgreSQL (psycopg), executemany on SQLite, 20,000 rows at a time."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        for i in range(0, len(rows), 20_000):
            conn.execute(table.insert(), rows[i:i + 20_000])
        return
    cols = list(rows[0])
    json_cols = {c.name for c in table.columns if c.type.__class__.__name__ == "JSON"}
    cursor = conn.connection.driver_connection.cursor()
    with cursor.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([json.dumps(row[c]) if c in json_cols and row[c] is not None
                            else row[c] for c in cols])


# --- the timings -----------------------------------------------------------------------------

def timed(fn, reps: int, budget_s: float = 60.0) -> list[float]:
    """`reps` timings of fn() after one warm-up call; fewer when a call is slow: one when it
    takes over 5 s, and the warm-up itself when that took over 20 s (the previous code's
    pages at 100,000 versions take minutes)."""
    t0 = time.perf_counter()
    fn()
    if (first := time.perf_counter() - t0) > 20.0:
        return [first]
    times: list[float] = []
    while len(times) < reps and sum(times) < budget_s and not (times and times[0] > 5.0):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def operations(url: str, ids: dict) -> dict:
    """name -> a zero-argument call doing what that operation does."""
    from click.testing import CliRunner
    from starlette.testclient import TestClient

    from runner.api import train_model_version
    from runner.cli import main as forge
    from runner.registry import catalog, promotion, recovery
    from runner.web.app import create_app

    cli = CliRunner()
    client = TestClient(create_app(url), base_url="http://127.0.0.1")

    def ok(result):
        assert result.exit_code == 0, result.output[-2000:]

    def page(path):
        response = client.get(path)
        assert response.status_code == 200, response.text[-2000:]

    def dry_run():
        result = train_model_version(PARENT, DATASET, agent_id=AGENTS[0], dry_run=True)
        assert result["would_launch"], result["reasons"]

    def models_list():
        ok(cli.invoke(forge, ["models", "list"]))

    def champion():
        model = catalog.get_model_version(ids["detail"])
        promotion.champion(promotion.lineage_root(model))

    return {
        "warm dry run": dry_run,
        "forge models list (page 1)": models_list,
        "forge serve index (page 1)": lambda: page("/"),
        "forge serve detail page": lambda: page(f"/artifacts/{ids['detail']}"),
        "lineage walk": lambda: catalog.lineage(ids["leaf"]),
        "gate champion lookup": champion,
        "ledger check": lambda: ok(cli.invoke(forge, ["ledger", "check"])),
        "reaper pass": lambda: recovery.reap(),
    }


def setup_home(home: Path, url: str, *, migrate: bool = True) -> None:
    """FORGE_HOME with the dry run's parent weights and a clone of this checkout to pin; with
    `migrate`, the registry migrated and the parent and dataset registered."""
    os.environ["FORGE_HOME"] = str(home)
    os.environ["FORGE_DB_URL"] = url
    if not (home / "code").exists():
        subprocess.run(["git", "clone", "--quiet", "--local", str(REPO), str(home / "code")],
                       check=True)
    os.environ["FORGE_CODE_REPO"] = str(home / "code")
    from runner.jobs import weights

    folder = weights.weights_dir(PARENT)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best_model.pt").write_bytes(b"stand-in")
    if not migrate:
        return
    from runner.api import SKILLS
    from runner.jobs.datasets import builtin_citation
    from runner.registry import catalog, db
    from runner.tools import register_tools

    db.upgrade(url)
    register_tools(SKILLS)
    catalog.register_model(artifact_id=PARENT, title="scGPT CBMC base", created_by="bench",
                           metadata={"family": "scgpt", "framework": "scgpt"})
    catalog.register_dataset(DATASET, "CBMC CITE-seq", builtin_citation("cbmc"))


def time_all(url: str, ids: dict, reps: int) -> dict[str, list[float]]:
    out = {}
    for name, fn in operations(url, ids).items():
        out[name] = timed(fn, reps)
        print(f"    {name}: {statistics.median(out[name]) * 1000:.1f} ms", file=sys.stderr,
              flush=True)
    return out


def time_in(tree: Path, url: str, ids: dict, reps: int) -> dict[str, list[float]]:
    """time_all run by the code of checkout `tree`, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    print(f"  timing {tree}", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--time-only", url,
                          "--ids", json.dumps(ids), "--reps", str(reps)],
                         cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit(f"timing in {tree} failed ({out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def migrate_to(url: str, revision: str) -> None:
    from alembic import command

    from runner.registry import db

    cfg = db.alembic_config(url)
    with db.get_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if revision != "head" else command.upgrade)(cfg, revision)


def run(url: str, n: dict, reps: int, before: Path | None, rounds: int) -> list[tuple]:
    """(operation, after's timings, before's timings or None) per operation."""
    home = Path(tempfile.mkdtemp(prefix="forge-scale-"))
    try:
        setup_home(home, url)
        t0 = time.perf_counter()
        ids = fill(url, n)
        print(f"  filled in {time.perf_counter() - t0:.0f} s: {ids['rows']}", flush=True)
        if before is None:
            return [(name, times, None) for name, times in time_all(url, ids, reps).items()]
        after_t: dict[str, list[float]] = {}
        before_t: dict[str, list[float]] = {}
        for i in range(rounds):  # interleaved: the previous code on its schema, then this
            migrate_to(url, BEFORE_REVISION)
            for name, times in time_in(before, url, ids, reps).items():
                before_t.setdefault(name, []).extend(times)
            migrate_to(url, "head")
            for name, times in time_in(REPO, url, ids, reps).items():
                after_t.setdefault(name, []).extend(times)
            print(f"  round {i + 1} of {rounds} done", flush=True)
        return [(name, after_t[name], before_t.get(name)) for name in after_t]
    finally:
        shutil.rmtree(home, ignore_errors=True)


def pg_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    import sqlalchemy as sa

    name = f"forge_scale_{os.getpid()}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')

    def drop():
        from runner.registry import db

        db.get_engine(url).dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    url = sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny fill (seconds)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--pg-url", default=os.environ.get("FORGE_TEST_PG_URL"),
                        help="a PostgreSQL server to create the benchmark's database on")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--before", type=Path,
                        help="a checkout of the previous code (git worktree add DIR REV): "
                             "timed on the same fill, interleaved, on its own schema")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--before)")
    parser.add_argument("--time-only", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_only:  # a process of --before's: this checkout's code on a filled registry
        home = Path(os.environ["FORGE_HOME"])
        setup_home(home, args.time_only, migrate=False)
        print(json.dumps(time_all(args.time_only, json.loads(args.ids), args.reps)))
        return
    n = sizes(args.smoke)
    backends = [] if args.no_sqlite else ["sqlite"]
    backends += ["postgresql"] if args.pg_url else []
    failed = False
    for backend in backends:
        print(f"{backend}: {n['versions']:,} versions in {n['lineages']:,} lineages, "
              f"{n['tool_calls']:,} tool calls, {n['allocations']:,} allocations", flush=True)
        if backend == "sqlite":
            tmp = Path(tempfile.mkdtemp(prefix="forge-scale-db-"))
            url = f"sqlite:///{tmp / 'forge.db'}"
            drop = functools.partial(shutil.rmtree, tmp, True)
        else:
            url, drop = pg_database(args.pg_url)
        try:
            for name, times, before in run(url, n, args.reps, args.before, args.rounds):
                median = statistics.median(times)
                target = TARGET_S.get(name, DEFAULT_TARGET_S)
                verdict = "pass" if median <= target else "FAIL"
                failed |= backend == "postgresql" and verdict == "FAIL" and not args.smoke
                was = ""
                if before:
                    b = statistics.median(before)
                    was = f"  before {b * 1000:9.1f} ms ({len(before)} runs)  x{b / median:.1f}"
                print(f"{backend:10s} {name:28s} median {median * 1000:9.1f} ms "
                      f"({len(times)} runs){was}  target <= {target * 1000:.0f} ms  {verdict}",
                      flush=True)
        finally:
            drop()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
