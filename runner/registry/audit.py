"""The skills agents can call and their audit trail: the `skills` rows, and one `tool_calls`
row per call. What a skill is and how a call is summarised is runner.tools' business; this
module only writes the rows (and reads the skills back: `list_skills`).
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from runner.registry.db import now, transaction
from runner.registry.schema import skills as skills_table
from runner.registry.schema import tool_calls


def register_skills(skills: Iterable[dict], *, conn=None) -> list[dict]:
    """Write skill declarations (dicts of the `skills` columns id, name, description,
    skill_type, code_path, input_schema, example_input), matched by name. Re-running updates
    them and keeps their id and times_used; returns them with the id they have in the table."""
    out = []
    with transaction(conn) as c:
        for skill in skills:
            existing = c.execute(sa.select(skills_table.c.id)
                                 .where(skills_table.c.name == skill["name"])
                                 ).scalar_one_or_none()
            if existing is None:
                c.execute(skills_table.insert().values(**skill, times_used=0, created_at=now()))
            else:
                fields = {k: v for k, v in skill.items() if k not in ("id", "name")}
                c.execute(skills_table.update().where(skills_table.c.id == existing)
                          .values(**fields))
            out.append({**skill, "id": existing or skill["id"]})
    return out


def record_call(skill_name: str, call: dict, *, url: str | None = None) -> None:
    """Insert one `tool_calls` row (`call`: its columns but skill_id) and count the use, in a
    transaction of its own on `url` (the configured registry by default). A skill that is not
    registered still gets its row, with no skill_id."""
    with transaction(url=url) as c:
        sid = c.execute(sa.select(skills_table.c.id).where(skills_table.c.name == skill_name)
                        ).scalar_one_or_none()
        c.execute(tool_calls.insert().values(skill_id=sid, **call))
        if sid is not None:
            c.execute(skills_table.update().where(skills_table.c.id == sid)
                      .values(times_used=skills_table.c.times_used + 1))


def list_skills(*, conn=None) -> list[dict]:
    """The registered skills (the `skills` rows), by name."""
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(
            sa.select(skills_table).order_by(skills_table.c.name)).mappings()]


def list_calls(*, agent_id: str | None = None, limit: int = 20, conn=None) -> list[dict]:
    """The audit trail, newest first: the `tool_calls` rows (of `agent_id` only, when given),
    each with its skill's name as `tool` (None for a call of an unregistered skill)."""
    query = (sa.select(tool_calls, skills_table.c.name.label("tool"))
             .outerjoin(skills_table, skills_table.c.id == tool_calls.c.skill_id)
             .order_by(tool_calls.c.created_at.desc(), tool_calls.c.id.desc())
             .limit(max(1, int(limit))))
    if agent_id is not None:
        query = query.where(tool_calls.c.agent_id == agent_id)
    with transaction(conn) as c:
        return [dict(r) for r in c.execute(query).mappings()]
