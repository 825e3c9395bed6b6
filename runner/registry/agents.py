"""Per-agent bearer tokens: which agent a caller is.

The operator issues a token for an agent (`forge agents add`); a server that hears from a
caller asks `verify` which agent its token names. A token is `forge_` + 32 random bytes
(urlsafe base64) and the registry keeps only its sha256: a copy of the database is no key to
any agent. A plain, unsalted sha256 is enough for a 256-bit random secret (there is nothing to
guess), and it lets `verify` find the row by its unique index in one query; comparing digests
rather than tokens also keeps the index lookup's timing from telling anything about a token.
Revoking keeps the row, so that the tokens an agent ever held stay on record.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

import sqlalchemy as sa

from runner.errors import InvalidInput
from runner.registry.db import now, transaction
from runner.registry.ledger import check_agent_id
from runner.registry.schema import agent_tokens

log = logging.getLogger(__name__)

PREFIX = "forge_"
MAX_TOKEN_CHARS = 256  # ours are 49; a longer string is not worth hashing


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def issue(agent_id: str, *, url: str | None = None) -> dict:
    """A new token for `agent_id`: {"token_id", "agent_id", "token"}. The token is returned
    here and never again; only its sha256 is written."""
    check_agent_id(agent_id)
    token = PREFIX + secrets.token_urlsafe(32)
    token_id = f"tok-{secrets.token_hex(6)}"
    with transaction(url=url) as c:
        c.execute(agent_tokens.insert().values(id=token_id, agent_id=agent_id,
                                               token_hash=_digest(token), created_at=now()))
    return {"token_id": token_id, "agent_id": agent_id, "token": token}


def verify(token: Any, *, url: str | None = None) -> str | None:
    """The agent whose active (unrevoked) token `token` is, or None. Anything that cannot be
    a token of ours (not a string, empty, too long, not ASCII) is None without a query."""
    if (not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS
            or not token.isascii()):
        return None
    digest = _digest(token)
    with transaction(url=url) as c:
        agent_id = c.execute(sa.select(agent_tokens.c.agent_id)
                             .where(agent_tokens.c.token_hash == digest,
                                    agent_tokens.c.revoked_at.is_(None))).scalar_one_or_none()
    if agent_id is not None:
        _touch(digest, url)
    return agent_id


def _touch(digest: str, url: str | None) -> None:
    """Stamp last_used_at in a transaction of its own: a bookkeeping write that fails (a
    read-only database or replica, a lock timeout) must not turn a valid token away."""
    try:
        with transaction(url=url) as c:
            c.execute(agent_tokens.update().where(agent_tokens.c.token_hash == digest)
                      .values(last_used_at=now()))
    except sa.exc.DBAPIError as exc:
        log.warning("could not record the token's use: %s", str(exc.orig).strip()[:200])


def revoke(agent_id: str | None = None, token_id: str | None = None, *,
           url: str | None = None) -> int:
    """Revoke `agent_id`'s active tokens, or the one token `token_id` (both: that token, if
    it is the agent's); returns how many were revoked, 0 for an unknown agent or token."""
    if agent_id is None and token_id is None:
        raise InvalidInput("name an agent or a token to revoke", field="agent_id",
                           fix="forge agents revoke NAME [--token TOKEN_ID]")
    where = [agent_tokens.c.revoked_at.is_(None)]
    if agent_id is not None:
        where.append(agent_tokens.c.agent_id == check_agent_id(agent_id))
    if token_id is not None:
        if not isinstance(token_id, str):
            raise InvalidInput(f"token_id {token_id!r} is not a string", field="token_id")
        where.append(agent_tokens.c.id == token_id)
    with transaction(url=url) as c:
        return c.execute(agent_tokens.update().where(*where).values(revoked_at=now())).rowcount


def list_tokens(*, url: str | None = None) -> list[dict]:
    """Every token's row but its hash, oldest first."""
    columns = [agent_tokens.c.id.label("token_id"), agent_tokens.c.agent_id,
               agent_tokens.c.created_at, agent_tokens.c.revoked_at, agent_tokens.c.last_used_at]
    with transaction(url=url) as c:
        rows = c.execute(sa.select(*columns)
                         .order_by(agent_tokens.c.created_at, agent_tokens.c.id)).mappings()
        return [dict(r) for r in rows]
