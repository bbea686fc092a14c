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
from agent.context import CALLER, Context
from agent.devices import device_element
from agent.errors import Forbidden, InvalidRequest
from agent.failover import Settled, read_record
from agent.journal import Reservation
from agent.peers import (
    AdmitReply,
    AdmitRequest,
    ReleaseReply,
    ReleaseRequest,
    ReplugReply,
    ReplugRequest,
    ReserveReply,
    ReserveRequest,
)


async def reserve(ctx: Context, req: ReserveRequest) -> ReserveReply:
    caller = CALLER.get()
    if caller is not None and req.source != caller:
        raise Forbidden(f"host {caller!r} cannot reserve on behalf of {req.source!r}",
                        source=req.source)  # fmt: skip
    if req.source == ctx.host:
        raise InvalidRequest("a host cannot reserve a primary for itself", source=req.source)
    return await _reserve(ctx, req, caller)


async def _reserve(ctx: Context, req: ReserveRequest, caller: str | None) -> ReserveReply:
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


async def admit(ctx: Context, req: AdmitRequest) -> AdmitReply:
    """Admit an incoming migration (agent/admission.py), with its primary's reservation."""
    caller = CALLER.get()
    if caller is None:
        raise Forbidden("failover.admit needs the calling host's id as the subject's last token")
    if caller == ctx.host:
        raise InvalidRequest("a host cannot admit a migration from itself")
    ctx.hypervisor.connection()
    reserved: list[ReserveReply] = []

    async def reserve_primary() -> Reservation:
        assert req.primary is not None
        p = req.primary
        reply = await _reserve(ctx, ReserveRequest(
            operation_id=req.operation_id, domain=req.domain, alias=p.alias, source=caller,
            lease_s=req.lease_s, device=p.device, mac=p.mac, carry=p.carry,
        ), caller)  # fmt: skip
        reserved.append(reply)
        found = ctx.reconciler.pool.get(reply.reservation_id)
        assert found is not None
        return found

    a, _ = await ctx.admissions.admit(
        operation=req.operation_id, domain=req.domain, name=req.name, memory_kib=req.memory_kib,
        caller=caller, lease_s=req.lease_s,
        reserve=reserve_primary if req.primary is not None else None,
    )  # fmt: skip
    r = reserved[0] if reserved else None
    return AdmitReply(
        admission_id=a.id, expires_in_s=round(a.expires - time.time(), 1),
        reservation_id=r.reservation_id if r else None, resource=r.resource if r else None,
        pool=r.pool if r else None, definition=r.definition if r else None,
    )  # fmt: skip


async def release(ctx: Context, req: ReleaseRequest) -> ReleaseReply:
    pool = ctx.reconciler.pool
    caller = CALLER.get() or ""
    given = [x is not None for x in (req.reservation_id, req.operation_id, req.admission_id)]
    if sum(given) != 1:
        raise InvalidRequest("give one of reservation_id, operation_id, admission_id")
    if req.admission_id is not None:
        a = ctx.admissions.get(req.admission_id)
        if a is None:
            return ReleaseReply(released=False)
        released = ctx.admissions.release(a, caller)
        if a.reservation and pool.get(a.reservation) is not None:
            released = await pool.release(a.reservation) or released
        return ReleaseReply(released=released)
    if req.operation_id is not None:
        a = ctx.admissions.for_operation(req.operation_id)
        if a is not None:
            ctx.admissions.release(a, caller)
    if req.reservation_id is not None:
        found = pool.get(req.reservation_id)
        if found is None:
            return ReleaseReply(released=False)
        pool.check_caller(found, caller)
        for a in ctx.admissions.live():  # the admission that held it ends with it
            if a.reservation == found.id:
                ctx.admissions.release(a, caller)
        return ReleaseReply(released=await pool.release(found.id))
    assert req.operation_id is not None
    found = pool.for_operation(req.operation_id)
    if found is not None:
        pool.check_caller(found, CALLER.get() or "")
    # Also when its reserve is still running or has not arrived: it is refused then.
    released = await pool.release_operation(req.operation_id)
    return ReleaseReply(released=released or a is not None)


async def replug(ctx: Context, req: ReplugRequest) -> ReplugReply:
    reconciler = ctx.reconciler
    crashpoints.reached("dest.replug")
    dom = await ctx.hypervisor.lookup(req.domain)
    caller = CALLER.get()
    if caller is not None:
        rec = await read_record(dom)
        # No record: nothing is owed (already plugged and settled); settling changes nothing.
        if rec is not None and rec.source != caller:
            raise Forbidden(
                f"domain {req.domain} was not migrated here by host {caller!r}",
                domain=req.domain,
            )
    out = await reconciler.settle(dom)
    live = await dom.xml()
    # Attached: libvirt lists it and nothing is owed any more (in mode qemu libvirt lists it
    # whatever QEMU did; the settle asked QEMU).
    attached = out.settled is not Settled.WAITING and device_element(live, req.alias) is not None
    return ReplugReply(settled=out.settled.value, why=out.why, attached=attached,
                       plugged_at_ns=reconciler.plugged_at.get(req.operation_id or ""))  # fmt: skip
