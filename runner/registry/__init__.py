"""The registry: the only package that talks SQL (SQLAlchemy Core + Alembic, one code path
for SQLite and PostgreSQL). Everything else in runner/ calls these functions and gets plain
dicts, Decimals and typed errors back; nothing here imports runner.jobs, runner.config,
runner.api or runner.tools.

    db        engines, `transaction(conn=None)` (join the caller's or open one), `row`,
              `now`, `unavailable` (a driver error as DatabaseError), `upgrade` (Alembic)
    schema    the SciDEX-compatible tables as SQLAlchemy Core metadata; the `Money` type
    migrations/  Alembic revisions, one per schema change
    ids       the id patterns (artifacts, agents, sha256), free of any database import
    catalog   artifacts, model_versions, artifact_links: reads, lineage, and every
              registration (`register_dataset`, `register_model`, `register_trained_version`
              with its world_model_improvements and events rows)
    improvements  the world_model_improvements rows (agent, allocation, settled cost) and
              the payout rule: only a promotion that gains is `pending`
    schemas/  the JSON Schemas the catalog validates metadata and citations against
    money     exact amounts, prices, rounding, `estimate` and `charge` (no database)
    ledger    credits: accounts, grant, reserve (debit before launch), mark_running,
              settle and cancel, each exactly once
    recovery  heartbeats, expiry, `reap` (settle the dead, exactly once), `settle_retrying`,
              and `check`, the books' invariant
    audit     the `skills` rows and one `tool_calls` row per logged call
"""
