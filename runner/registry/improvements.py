"""`world_model_improvements` rows (SciDEX) and the rule for which of them may be paid out.

Every trained version and every gate decision writes one row, inside the transaction that
registers or decides it. Each names the agent credited with the version (`agent_id`: who
trained it), the allocation its work ran under (`allocation_id`: the training's, or the
evaluation's) and what that allocation settled at (`cost`), so that the sum of `cost` over the
rows is what was spent, each allocation counted once.

The payout rule: only a promotion by the eval gate with a magnitude > 0 (a gain on the same
held-out cells, signed by the metric's direction) is `pending`, SciDEX's word for a row its
payout driver distributes. Everything else is `ineligible`, with a `payout_reason` in its
detection metadata: training is logged as work, a rejection is never paid, and neither is
a gain at or below zero or one that was not measured like with like.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal

from runner.registry.schema import world_model_improvements

TRAINED, PROMOTED, REJECTED = ("model_version_trained", "model_version_promoted",
                               "model_version_rejected")
PAYABLE, INELIGIBLE = "pending", "ineligible"


def payout(event_type: str, magnitude: float | None) -> tuple[str, str | None]:
    """(payout_status, reason it is not payable) of an improvement row."""
    if event_type == TRAINED:
        return INELIGIBLE, ("training is logged as work (agent, allocation, cost); an "
                            "improvement is paid when the eval gate promotes the version")
    if event_type != PROMOTED:
        return INELIGIBLE, "the eval gate rejected the version"
    if magnitude is None:
        return INELIGIBLE, "no comparable measurement of the improvement"
    if not magnitude > 0:  # NaN too
        return INELIGIBLE, f"no improvement: magnitude {magnitude:+.6f}"
    return PAYABLE, None


def record(conn, *, event_type: str, target_artifact_id: str, magnitude: float | None,
           detection: dict, agent_id: str, allocation_id: str, cost: Decimal | None,
           stamp: datetime) -> dict:
    """Insert the row in the caller's transaction; returns its values."""
    status, reason = payout(event_type, magnitude)
    values = {
        "id": f"wmi-{uuid.uuid4().hex}", "event_type": event_type,
        "target_artifact_id": target_artifact_id, "target_artifact_type": "model",
        "magnitude": magnitude, "payout_status": status,
        "detection_metadata": {**detection, "payout_reason": reason} if reason else detection,
        "agent_id": agent_id, "allocation_id": allocation_id, "cost": cost,
        "detected_at": stamp}
    conn.execute(world_model_improvements.insert().values(**values))
    return values
