"""migrate-with-failover on the source: the operation step by step (reserve, unplug,
migrate, replug, verify) and its rollback; its recovery after the agent restarted is
recovery.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from typing import Any

import msgspec
import structlog

from agent import crashpoints
from agent.backoff import Backoff
from agent.context import Context
from agent.devices import device_element, unplug
from agent.domain import Domain, DomainState
from agent.envelope import OpState, StepName
from agent.errors import AgentError, Conflict, InvalidRequest, Timeout
from agent.failover import NS, OWED, UNPLUGGING, Record, Settled, read_record, write_record
from agent.nicxml import names_vf
from agent.operations import Ended, Progress, uninterruptible
from agent.peers import (
    PrimaryAsk,
    ReleaseRequest,
    ReplugReply,
    ReplugRequest,
    ReserveReply,
    ReserveRequest,
)
from agent.registry import Registration
from handlers.failover.plan import FailoverRequest, Plan, lease_needed, make_plan
from handlers.failover.steps import (
    MigrateStep,
    PlanStep,
    ReplugStep,
    ReserveStep,
    RollbackStep,
    Step,
    UnplugStep,
    VerifyStep,
    as_record,
)
from handlers.migration import MigrateRequest, admission_request, migrate_and_locate

log = structlog.get_logger("agent.failover.source")
# The steps after which nothing on the source has changed yet.
BEFORE_CHANGE = (StepName.PLAN, StepName.RESERVE)


async def migrate_with_failover(ctx: Context, req: FailoverRequest) -> dict[str, Any]:
    ctx.hypervisor.connection()  # `unavailable` first while libvirt is away
    if req.destination == ctx.host:
        raise InvalidRequest(f"destination {req.destination!r} is this host",
                             destination=req.destination)  # fmt: skip
    dest = await ctx.registry.resolve(req.destination)
    dom = await ctx.hypervisor.lookup(req.domain)
    state, _ = await dom.state()
    if state is not DomainState.RUNNING:
        raise Conflict(f"domain {req.domain!r} is not running", domain=req.domain)
    if await read_record(dom) is not None:
        raise Conflict(
            f"domain {req.domain!r} is still owed a primary from an earlier failover; "
            "the reconcile loop settles it first",
            domain=req.domain,
        )
    plan = await make_plan(ctx, dom, req, dest)
    flow = Failover(ctx, dom, req, plan, dest)
    op = await ctx.start_operation("migrate_with_failover", dom.uuid, flow.run)
    return {"operation_id": op.id, "state": op.state, "mode": plan.mode}


def _owed(exc: BaseException, reason: str) -> None:
    """Say in the operation's error that its primary is not back yet, and why."""
    if isinstance(exc, AgentError):
        exc.details["primary_owed"] = True
        exc.details["primary_owed_reason"] = reason


class Failover:
    """One migrate-with-failover on the source, step by step, with its rollback."""

    def __init__(self, ctx: Context, dom: Domain, req: FailoverRequest, plan: Plan,
                 dest: Registration) -> None:  # fmt: skip
        self.ctx = ctx
        self.dom = dom
        self.uuid = dom.uuid
        self.req = req
        self.plan = plan
        self.dest = dest
        self.reservation: str | None = None
        self.reserve_asked = False  # the destination may hold one even without a reply
        self.recorded = False  # the record is in the domain's metadata
        self.unplug_in_flight = False
        self.unplugged = False  # DEVICE_REMOVED seen: the guest is without its primary
        self.removed_ns = 0  # when (the event's time on this host)
        self.migrating = False
        self.migrated = False
        self.current: Step = Step()  # the step under way, as journalled

    async def step(self, p: Progress, step: Step) -> None:
        crashpoints.reached(as_record(step)["step"])
        self.current = step
        p.record(as_record(step))

    def note(self, p: Progress, **detail: Any) -> None:
        """Add what the current step found out (its typed fields only)."""
        self.current = msgspec.structs.replace(self.current, **detail)
        p.amend(as_record(self.current))

    async def run(self, p: Progress) -> dict[str, Any]:
        ctx, plan = self.ctx, self.plan
        timeout = ctx.failover.peer_timeout_s
        await self.step(p, PlanStep(mode=plan.mode, mode_reason=plan.mode_reason,
                                    primary=plan.primary, standby=plan.standby, mac=plan.mac,
                                    destination=plan.destination, guest=plan.guest))  # fmt: skip
        try:
            definition = None
            if plan.mode == "qemu":
                # QEMU plugs the primary on the destination itself, from the network of the
                # same name there: nothing to reserve, and the definition stays.
                await self.step(
                    p,
                    ReserveStep(
                        host=plan.destination,
                        skipped="mode qemu: the destination's libvirt gives QEMU a VF of its "
                        "own network",
                    ),
                )
                if self.dest.admission:  # the slot and the memory, without a primary
                    self.reserve_asked = True
                    admitted = await ctx.peers.admit(plan.destination, await admission_request(
                        ctx, self.dom, p.op.id, self.req.timeout_s, None), timeout)  # fmt: skip
                    self.note(p, admission=admitted.admission_id)
            else:
                await self.step(p, ReserveStep(host=plan.destination))
                self.reserve_asked = True
                res, admission = await self._reserve(p.op.id, timeout)
                self.reservation = res.reservation_id
                definition = res.definition
                self.note(p, reservation=self.reservation, resource=res.resource,
                          admission=admission)  # fmt: skip
            persist_xml, listed = await self._destination_definition(definition)

            await self.step(p, UnplugStep(alias=plan.primary, mode=plan.mode,
                                          reservation=self.reservation))  # fmt: skip
            await write_record(
                self.dom,
                self._record(UNPLUGGING if plan.mode == "sequenced" else OWED, p.op.id),
            )
            self.recorded = True
            if plan.mode == "sequenced":
                await self._unplug()
                await write_record(self.dom, self._record(OWED, p.op.id))

            await self.step(p, MigrateStep(destination=plan.destination,
                                           persistent_primary=listed))  # fmt: skip
            self.migrating = True
            if plan.mode == "qemu":
                self.unplugged = True  # QEMU takes the primary out as the migration starts
            result = await self._migrate(p, persist_xml)
            self.migrated = True
        except BaseException as exc:  # noqa: BLE001 - raised again unless the domain moved
            # Whatever interrupted it (an error, a cancel, the agent stopping), the domain must
            # end on one host with its primary: finished even if cancelled again meanwhile.
            await self._settle_or_raise(p, exc)
            # The migration completed before the interruption took effect: the VM runs on
            # the destination, and the operation goes on to its primary.
            if isinstance(exc, asyncio.CancelledError):
                return self._moved_but_owed(p, "cancelled after the migration had completed")
            result = {"note": f"the migration completed despite: {exc}"}

        out: dict[str, Any] = {"mode": plan.mode, "destination": plan.destination,
                               "primary": plan.primary, "migration": result}  # fmt: skip
        try:
            await self.step(p, ReplugStep(host=plan.destination))
            replugged = await replug_on(ctx, plan.destination, self.uuid, plan.primary, p.op.id)
            out["replug"] = msgspec.to_builtins(replugged)
            await self.step(p, VerifyStep())
            await self._verify()
            out.update(self._outage(replugged))
        except asyncio.CancelledError:
            # The VM has moved; what a cancel can still stop is this agent's waiting for the
            # primary, which the destination's reconcile loop plugs in any case.
            return {**out, **self._moved_but_owed(p, "cancelled while the destination "
                                                     "plugged the primary")}  # fmt: skip
        except AgentError as exc:
            # The VM runs on the destination (contract: `succeeded`), without its primary
            # for now: the operation says so; the destination's reconcile loop owes it.
            log.warning("migrated, but the primary is not back on the destination",
                        destination=plan.destination, error=exc.message)  # fmt: skip
            return {**out, "primary_owed": True,
                    "primary_owed_reason": f"{exc.message}; {plan.destination}'s reconcile "
                                           "loop plugs it"}  # fmt: skip
        return out

    async def _reserve(self, op_id: str, timeout: float) -> tuple[ReserveReply, str | None]:
        """The primary's reservation on the destination, and the admission holding it: a
        destination that admits (contract v1.2) is asked `failover.admit` with the primary;
        one of the previous release `failover.reserve`, saying what the primary is so the
        reply says what it will plug - one older still refuses those fields (unknown fields
        are refused) and is asked again without them."""
        ctx, plan = self.ctx, self.plan
        if self.dest.admission:
            ask = PrimaryAsk(alias=plan.primary, device=plan.device, mac=plan.mac or None,
                             carry=plan.carry or None)  # fmt: skip
            req = await admission_request(ctx, self.dom, op_id, self.req.timeout_s, ask)
            a = await ctx.peers.admit(plan.destination, req, timeout)
            if a.reservation_id is None or a.resource is None or a.pool is None:
                raise AgentError(f"{plan.destination} admitted the migration without its primary",
                                 peer=plan.destination)  # fmt: skip
            return ReserveReply(reservation_id=a.reservation_id, resource=a.resource,
                                pool=a.pool, expires_in_s=a.expires_in_s,
                                definition=a.definition), a.admission_id  # fmt: skip
        plain = ReserveRequest(operation_id=op_id, domain=self.uuid, alias=plan.primary,
                               source=ctx.host, lease_s=lease_needed(ctx, self.req))  # fmt: skip
        full = msgspec.structs.replace(plain, device=plan.device, mac=plan.mac or None,
                                       carry=plan.carry or None)  # fmt: skip
        try:
            return await ctx.peers.reserve(plan.destination, full, timeout), None
        except InvalidRequest as exc:
            if "unknown field" not in exc.message.lower():
                raise
            return await ctx.peers.reserve(plan.destination, plain, timeout), None

    async def _destination_definition(self, definition: str | None) -> tuple[str | None, str]:
        """The persistent definition the domain arrives with on the destination (libvirt
        would otherwise copy this host's, with this host's VF address): its primary is the
        device the destination reserved; without one that names a VF of this host it is left
        out, and the destination defines what it plugs. None: libvirt's own copy is right (a
        transient domain, mode qemu, a primary that names no host resource). Also what the
        definition lists as the primary, for the step's record."""
        plan = self.plan
        if self.plan.mode == "qemu" or not await self.dom.persistent():
            return None, "as defined here"
        if definition is None and not names_vf(plan.device):
            return None, "as defined here"
        xml = await self.dom.xml(inactive=True, secure=True, migratable=True)
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's
        devices = root.find("devices")
        assert devices is not None
        for i, dev in enumerate(list(devices)):
            alias = dev.find("alias")
            if alias is not None and alias.get("name") == plan.primary:
                devices.remove(dev)
                if definition is not None:
                    devices.insert(i, ET.fromstring(definition))  # noqa: S314 - an agent's
                break
        listed = "the destination's reserved device" if definition else "none: owed"
        return ET.tostring(root, encoding="unicode"), listed

    def _outage(self, replug: ReplugReply) -> dict[str, Any]:
        """How long the guest had no primary: DEVICE_REMOVED here to DEVICE_ADDED there (two
        hosts' clocks). Mode qemu has neither event: QEMU moves the primary itself."""
        added = replug.plugged_at_ns
        if not self.removed_ns or not added:
            return {}
        seconds = round((added - self.removed_ns) / 1e9, 3)
        self.ctx.metrics.primary_outage.observe(max(0.0, seconds))
        return {"primary_outage_s": seconds}

    def _moved_but_owed(self, p: Progress, why: str) -> dict[str, Any]:
        """A cancel that came after the migration: the operation ends `succeeded` (the VM
        runs on the destination), saying that the destination still owes the primary; a
        shutdown out of time leaves it to the next start instead."""
        if self.ctx.operations.abandoned.is_set():
            raise asyncio.CancelledError
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        if isinstance(self.current, (ReplugStep, VerifyStep)):
            self.note(p, cancel_ignored=why)
        else:
            self.note(p, note=f"cancel ignored: {why}")
        return {"destination": self.plan.destination, "primary": self.plan.primary,
                "primary_owed": True,
                "primary_owed_reason": f"{self.plan.destination}'s reconcile loop plugs it",
                "cancel_ignored": why}  # fmt: skip

    async def _migrate(self, p: Progress, persist_xml: str | None) -> dict[str, Any]:
        """The migration; success means the domain runs on the destination, whatever the
        call or the lifecycle events said."""
        mreq = MigrateRequest(
            domain=self.uuid, destination=self.plan.destination,
            max_downtime_ms=self.req.max_downtime_ms, bandwidth_mib_s=self.req.bandwidth_mib_s,
            postcopy=self.req.postcopy, timeout_s=self.req.timeout_s,
        )  # fmt: skip
        result = await migrate_and_locate(self.ctx, p, self.dom, self.dest, mreq, persist_xml)
        where = await self._where()
        if where != "destination":
            raise AgentError(f"after the migration the domain runs on: {where}", where=where)
        return result

    def _record(self, state: str, op_id: str) -> Record:
        return Record(operation=op_id, source=self.ctx.host, destination=self.plan.destination,
                      alias=self.plan.primary, mac=self.plan.mac, mode=self.plan.mode,
                      state=state, since=time.time(), device=self.plan.device,
                      carry=self.plan.carry)  # fmt: skip

    async def _unplug(self) -> None:
        # In flight from the moment the detach may have been sent until libvirt reports the
        # outcome: a timeout, a cancel or a crash in between leaves the guest free to release
        # the device later, and only the reconcile loop (after unplug_grace_s) may decide. A
        # detach that libvirt refuses, or the guest's DEVICE_REMOVAL_FAILED, ends it: the
        # device stays.
        def in_flight(now: bool) -> None:
            self.unplug_in_flight = now

        removed = await unplug(self.ctx.hypervisor, self.dom, self.plan.primary,
                               self.ctx.devices.detach_timeout_s, in_flight)  # fmt: skip
        self.unplugged = True
        self.removed_ns = removed.time_ns

    async def _where(self) -> str:
        return await self.ctx.hypervisor.where_is(self.uuid, self.dest.libvirt_uri)

    async def _settle_or_raise(self, p: Progress, exc: BaseException) -> None:
        """After `exc`, settle the domain - even if cancelled again meanwhile - and raise
        unless the migration had completed anyway."""
        ended = await uninterruptible(self._after_interruption(p, exc),
                                      self.ctx.operations.abandoned)  # fmt: skip
        if self.migrated:
            return
        if ended is not None and isinstance(exc, AgentError):
            raise Ended(ended, exc) from exc
        raise exc

    async def _after_interruption(self, p: Progress, exc: BaseException) -> OpState | None:
        """Settle the domain after `exc`; the state the operation ends in (None: `failed`, or
        `cancelled` for a cancel)."""
        if self.migrated:
            return None
        if self.migrating and await self._where() == "destination":
            # The migration completed before the error or cancel took effect: the record went
            # with the domain and the destination plugs the primary from its reservation.
            self.migrated = True
            self.note(p, migrated_anyway=True, note="the migration completed before it was "
                      "interrupted; the destination plugs the primary")  # fmt: skip
            return None
        return await self._rollback(p, exc)

    async def _rollback(self, p: Progress, exc: BaseException) -> OpState | None:
        """Before the migration completed: the domain stays here; its primary comes back.
        `rolled_back` once something had changed; an error's details say whether the primary
        is owed still."""
        ctx = self.ctx
        await self.step(p, RollbackStep(reason=getattr(exc, "message", type(exc).__name__)))
        if self.reserve_asked:
            await release_on(ctx, self.plan.destination, self.reservation, p.op.id)
        if not self.recorded:
            return None
        if self.unplug_in_flight:
            # The guest may still release the device; the reconcile loop plugs it back if so.
            _owed(exc, "the guest may still release it; the reconcile loop plugs it back if so")
            return OpState.ROLLED_BACK
        try:
            out = await ctx.reconciler.settle(self.dom, owner=p.op.id, unplug_done=True)
        except AgentError as failed:
            # The domain stays here; its primary is not back yet: the reconcile loop owes it.
            _owed(exc, f"{failed.message}; this host's reconcile loop plugs it")
            return OpState.ROLLED_BACK
        if out.settled is Settled.ATTACHED and not self.unplugged:
            return None  # the primary never left: nothing changed
        if out.settled not in (Settled.ATTACHED, Settled.PLUGGED, Settled.NO_RECORD):
            _owed(exc, f"{out.alias} not back yet ({out.why}); the reconcile loop plugs it")
        return OpState.ROLLED_BACK

    async def _verify(self) -> None:
        ctx, plan = self.ctx, self.plan
        here = await ctx.hypervisor.where_is(self.uuid, None)
        if here == "source":
            raise AgentError("the domain runs on the source as well as the destination")
        active, xml = await ctx.hypervisor.remote_domain(self.dest.libvirt_uri, self.uuid)
        if not active or xml is None:
            raise AgentError(f"the domain is not running on {plan.destination}")
        if device_element(xml, plan.primary) is None:
            raise AgentError(f"the primary {plan.primary!r} is not attached on "
                             f"{plan.destination}")  # fmt: skip
        if NS in xml:
            raise AgentError(f"{plan.destination} still records a primary owed to the domain")


async def release_on(ctx: Context, host: str, reservation: str | None, op_id: str) -> None:
    """Best effort: the destination's reservation goes back to its pool (by id, or by the
    operation when the reserve reply never came), with the admission that held it; its lease
    ends it otherwise."""
    body = (ReleaseRequest(reservation_id=reservation) if reservation
            else ReleaseRequest(operation_id=op_id))  # fmt: skip
    with contextlib.suppress(AgentError):
        await ctx.peers.release(host, body, ctx.failover.peer_timeout_s)


async def replug_on(ctx: Context, host: str, uuid: str, alias: str, op_id: str) -> ReplugReply:
    """Ask the destination to settle the domain's owed primary; retried with back-off until it
    reports the primary attached or `failover.replug_timeout_s` passes."""
    s = ctx.failover
    deadline = time.monotonic() + s.replug_timeout_s
    backoff, last = Backoff(0.2, 5.0), "no answer"
    while True:
        try:
            out = await ctx.peers.replug(
                host,
                ReplugRequest(domain=uuid, alias=alias, operation_id=op_id),
                s.peer_timeout_s + ctx.devices.detach_timeout_s,
            )
            if out.attached:
                return out
            last = out.why or out.settled
        except InvalidRequest:
            raise
        except AgentError as exc:  # unreachable, busy, libvirt refusing for now: ask again
            last = exc.message
        if time.monotonic() + backoff.delay > deadline:
            raise Timeout(f"{host} did not report the primary {alias!r} attached within "
                          f"{s.replug_timeout_s}s ({last}); its reconcile loop keeps trying",
                          host=host, alias=alias)  # fmt: skip
        await backoff.wait()
