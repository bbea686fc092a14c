"""migrate-with-failover on the destination: the verbs a source agent calls - hold an
equivalent primary (`failover.reserve`), give it back (`failover.release`), plug it into the
domain that arrived (`failover.replug`).

The caller is the host id the subject names (`handlers.CALLER`, authenticated by the
server's permissions): a reservation belongs to it, and only it may release it or have the
primary of the domain it migrated here plugged. A v1 caller (no id in the subject, accepted
during a rolling upgrade) is taken at its word (`source`)."""

from __future__ import annotations

import time

from agent import crashpoints
from agent.devices import device_element
from agent.errors import Forbidden, InvalidRequest
from agent.failover import read_record
from agent.peers import (
    ReleaseReply,
    ReleaseRequest,
    ReplugReply,
    ReplugRequest,
    ReserveReply,
    ReserveRequest,
)
from handlers import CALLER, Context
from handlers.domain import find_domain


async def reserve(ctx: Context, req: ReserveRequest) -> ReserveReply:
    reconciler = ctx.reconciler
    caller = CALLER.get()
    if caller is not None and req.source != caller:
        raise Forbidden(f"host {caller!r} cannot reserve on behalf of {req.source!r}",
                        source=req.source)  # fmt: skip
    if req.source == ctx.host:
        raise InvalidRequest("a host cannot reserve a primary for itself", source=req.source)
    pool = reconciler.pool
    r = pool.reserve(req.operation_id, req.domain, await reconciler.pci_in_use(),
                     req.lease_s, caller or "")  # fmt: skip
    crashpoints.reached("dest.reserve")
    return ReserveReply(reservation_id=r.id, resource=r.resource, pool=pool.kind,
                        expires_in_s=round(r.expires - time.time(), 1))  # fmt: skip


async def release(ctx: Context, req: ReleaseRequest) -> ReleaseReply:
    pool = ctx.reconciler.pool
    if (req.reservation_id is None) == (req.operation_id is None):
        raise InvalidRequest("give either reservation_id or operation_id")
    if req.reservation_id is not None:
        found = pool.get(req.reservation_id)
    else:
        assert req.operation_id is not None
        found = pool.for_operation(req.operation_id)
    if found is None:
        return ReleaseReply(released=False)
    pool.check_caller(found, CALLER.get() or "")
    return ReleaseReply(released=pool.release(found.id))


async def replug(ctx: Context, req: ReplugRequest) -> ReplugReply:
    reconciler = ctx.reconciler
    crashpoints.reached("dest.replug")
    dom = await find_domain(ctx, req.domain)
    caller = CALLER.get()
    if caller is not None:
        rec = await read_record(ctx.hypervisor, dom)
        # No record: nothing is owed (already plugged and settled); settling changes nothing.
        if rec is not None and rec.source != caller:
            raise Forbidden(
                f"domain {req.domain} was not migrated here by host {caller!r}",
                domain=req.domain,
            )
    out = await reconciler.settle(dom)
    live = await ctx.hypervisor.call(dom.XMLDesc, 0)
    return ReplugReply(settled=out.settled.value, why=out.why,
                       attached=device_element(live, req.alias) is not None,
                       plugged_at_ns=reconciler.plugged_at.get(req.operation_id or ""))  # fmt: skip
