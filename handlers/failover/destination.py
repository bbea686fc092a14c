"""migrate-with-failover on the destination: the verbs a source agent calls - hold an
equivalent primary (`failover.reserve`), give it back (`failover.release`), plug it into the
domain that arrived (`failover.replug`).

The caller is the host id the subject names (`handlers.CALLER`, authenticated by the
server's permissions): a reservation belongs to it, and only it may release it or have the
primary of the domain it migrated here plugged. A v1 caller (no id in the subject, accepted
during a rolling upgrade) is taken at its word (`source`)."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

from agent import crashpoints
from agent.devices import device_element
from agent.errors import Forbidden, InvalidRequest
from agent.failover import Settled, read_record
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
    caller = CALLER.get()
    if caller is not None and req.source != caller:
        raise Forbidden(f"host {caller!r} cannot reserve on behalf of {req.source!r}",
                        source=req.source)  # fmt: skip
    if req.source == ctx.host:
        raise InvalidRequest("a host cannot reserve a primary for itself", source=req.source)
    pool = ctx.reconciler.pool
    definition = None
    if req.device is not None:
        try:
            ET.fromstring(req.device)  # noqa: S314 - only parsed; see agent/pool.py
            if req.carry:
                ET.fromstring(req.carry)  # noqa: S314
        except ET.ParseError as exc:
            raise InvalidRequest(f"device is not XML: {exc}") from None
        if pool.kind == "recorded":
            pool.definition("recorded", req.device)  # refused if it names the source's VF
    r = await pool.reserve(req.operation_id, req.domain, req.lease_s, caller or "", req.device)
    if req.device is not None:
        definition = pool.definition(r.resource, req.device, req.mac or "", req.carry or "")
    crashpoints.reached("dest.reserve")
    return ReserveReply(reservation_id=r.id, resource=r.resource, pool=pool.kind,
                        expires_in_s=round(r.expires - time.time(), 1),
                        definition=definition)  # fmt: skip


async def release(ctx: Context, req: ReleaseRequest) -> ReleaseReply:
    pool = ctx.reconciler.pool
    if (req.reservation_id is None) == (req.operation_id is None):
        raise InvalidRequest("give either reservation_id or operation_id")
    if req.reservation_id is not None:
        found = pool.get(req.reservation_id)
        if found is None:
            return ReleaseReply(released=False)
        pool.check_caller(found, CALLER.get() or "")
        return ReleaseReply(released=await pool.release(found.id))
    assert req.operation_id is not None
    found = pool.for_operation(req.operation_id)
    if found is not None:
        pool.check_caller(found, CALLER.get() or "")
    # Also when its reserve is still running or has not arrived: it is refused then.
    return ReleaseReply(released=await pool.release_operation(req.operation_id))


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
    # Attached: libvirt lists it and nothing is owed any more (in mode qemu libvirt lists it
    # whatever QEMU did; the settle asked QEMU).
    attached = out.settled is not Settled.WAITING and device_element(live, req.alias) is not None
    return ReplugReply(settled=out.settled.value, why=out.why, attached=attached,
                       plugged_at_ns=reconciler.plugged_at.get(req.operation_id or ""))  # fmt: skip
