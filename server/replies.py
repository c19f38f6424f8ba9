"""What every hospital reply must carry before its payload is looked at.

    error reply (the ClientApp raised, or the SuperLink reports the node unreachable)
    status "budget-exhausted"   -> the hospital refused; nothing was spent or sent
    status "ok"                 -> the payload (weights or DP statistics) and the node's
                                   whole ledger, which must end with this reply's entries
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Message

from client.app import STATUS_BUDGET, STATUS_OK


def status(reply: Message, node: int) -> tuple[str, dict[str, Any]]:
    """("error" | "budget" | "ok", details with node, hospital, metrics)."""
    if reply.has_error():
        return "error", {"node": node, "reason": reply.error.reason}
    content = reply.content
    try:
        state = content["status"]["status"]
        hospital = str(content["status"]["hospital-id"])
        metrics = dict(content["metrics"])
    except KeyError as e:
        return "error", {"node": node, "reason": f"malformed reply (no {e})"}
    if state == STATUS_BUDGET:
        return "budget", {"node": node, "hospital": hospital, "metrics": metrics}
    if state != STATUS_OK:
        return "error", {"node": node, "hospital": hospital,
                         "reason": f"unknown status {state!r}"}
    return "ok", {"node": node, "hospital": hospital, "metrics": metrics}


def ledger_chain(content: Any, latest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hospital's whole ledger as it sent it, which must end with this reply's entries.

    Keeping the whole chain (not only the entries of rounds the server completed) lets an
    auditor recompute a hospital's epsilon from its first entry: spend on rounds that were
    abandoned, re-sent after a crash, or on earlier runs is all in it.
    """
    chain = json.loads(content["ledger"]["chain"])
    if not isinstance(chain, list) or chain[len(chain) - len(latest):] != latest:
        raise ValueError("the ledger sent does not end with this reply's entries")
    return chain
