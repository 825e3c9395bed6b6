"""Registry throughput and lineage latency on SQLite and PostgreSQL.

Registers a chain of 2,000 versions (each the child of the last) and 2,000 siblings (children
of one base), then times the recursive lineage walk from depth 1,000.

    python benchmarks/registry.py [--pg-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
    python benchmarks/registry.py --smoke     # 20 versions, the walk from depth 10: seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

import sqlalchemy as sa

from runner.registry import catalog, db

META = {"family": "bench", "framework": "scgpt"}
N = 2000


def bench(url: str, n: int = N) -> dict:
    os.environ["FORGE_DB_URL"] = url  # the catalog writes to the configured registry
    db.upgrade(url)
    engine = db.get_engine(url)
    base = catalog.register_model(title="base", metadata=META, created_by="bench",
                                  origin_type="external", origin_url="file:///base")

    t0 = time.perf_counter()
    parent = base["id"]
    chain = [parent]
    for _ in range(n):
        parent = catalog.register_model(title="v", metadata=META, created_by="bench",
                                        parent_artifact_id=parent, origin_type="external",
                                        origin_url="file:///v")["id"]
        chain.append(parent)
    chain_rate = n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    for _ in range(n):
        catalog.register_model(title="s", metadata=META, created_by="bench",
                               parent_artifact_id=base["id"], origin_type="external",
                               origin_url="file:///s")
    sibling_rate = n / (time.perf_counter() - t0)

    depth = n // 2  # 1,000 generations below the base
    leaf = chain[depth]
    with engine.connect() as conn:
        times = []
        for _ in range(21 if n == N else 1):
            t0 = time.perf_counter()
            rows = catalog.lineage(leaf, conn=conn)
            times.append(time.perf_counter() - t0)
    if len(rows) != depth + 1 or rows[0]["id"] != base["id"]:
        raise SystemExit(f"lineage walk from depth {depth} returned {len(rows)} rows, "
                         f"the first {rows[0]['id'] if rows else None}, not the base")
    return {"chain_per_s": chain_rate, "siblings_per_s": sibling_rate,
            "lineage_ms": statistics.median(times) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--smoke", action="store_true",
                        help="20 versions, the lineage walk from depth 10: seconds")
    args = parser.parse_args()
    n = 20 if args.smoke else N
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = bench(f"sqlite:///{tmp}/bench.db", n)
    name = f"forge_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        url = sa.engine.make_url(args.pg_url).set(database=name).render_as_string(False)
        results["postgresql"] = bench(url, n)
    finally:
        db._engine.cache_clear()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"{'backend':<11} {'chain reg/s':>12} {'sibling reg/s':>14} "
          f"{f'lineage@{n // 2} ms':>16}")
    for backend, r in results.items():
        print(f"{backend:<11} {r['chain_per_s']:>12.0f} {r['siblings_per_s']:>14.0f} "
              f"{r['lineage_ms']:>16.1f}")


if __name__ == "__main__":
    main()
