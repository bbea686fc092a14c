"""`pool.get` (this host's primary pool: each VF's state, quarantined ones with the reason,
the live reservations) and `pool.unquarantine` (give a quarantined VF back to the pool once
an operator has looked at it)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from agent.context import Context, Verb
from agent.fields import RequestId
from agent.settings import PCI_RE


class PoolRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: RequestId | None = None


async def pool_get(ctx: Context, _: PoolRequest) -> dict[str, Any]:
    pool = ctx.reconciler.pool
    if pool.vfs:
        await pool.scan()  # "in use" as libvirt says now
    now = time.time()
    return {
        **pool.describe(),
        "vfs": pool.states(),
        "quarantined": pool.quarantined(),
        "reservations": [
            {"id": r.id, "operation_id": r.operation, "domain": r.domain, "resource": r.resource,
             "state": r.state, "caller": r.caller, "expires_in_s": round(r.expires - now, 1)}
            for r in pool.active()
        ],
    }  # fmt: skip


class UnquarantineRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vf: Annotated[str, Meta(pattern=PCI_RE.pattern)]
    request_id: RequestId | None = None


async def unquarantine(ctx: Context, req: UnquarantineRequest) -> dict[str, bool]:
    return {"cleared": ctx.reconciler.pool.unquarantine(req.vf.lower())}


VERBS = [
    Verb("pool.get", PoolRequest, pool_get),
    Verb("pool.unquarantine", UnquarantineRequest, unquarantine),
]
