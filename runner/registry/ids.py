"""The registry's id rules, checked before an id touches a path or a query.

Plain patterns with no database behind them, so that config validation and the skill's input
schema can share them without importing SQLAlchemy.
"""

from __future__ import annotations

import re

# Artifacts: 1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit (no '/', no '..').
ARTIFACT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Agents: the same, plus '@'; no ':', which names the ledger's system accounts.
AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
# Content hashes: a lowercase sha256 hex digest.
SHA256 = re.compile(r"^[0-9a-f]{64}$")
