"""`host.drain` and `host.undrain` (contract v1.2): empty this host for maintenance.

The drain plans first - every active domain: movable or not and why, and where it goes
(agent/placement.py, from the destinations' registrations) - then puts the host in maintenance
(the journal and its registration: it admits no incoming migration and starts no domain unless
forced) and runs the migrations as operations of their own, at most `max_parallel` at once:
`migrate_with_failover` for a domain with a failover pair, `migrate` for the others. Each
destination admits each migration (`failover.admit`, its own inbound limit and memory): one
refused for its inbound limit waits and is asked again. Progress: the drain's operation events
carry `totals` and one entry per domain. `operation.cancel` starts nothing new; running
migrations finish, or with `cancel_running` are cancelled with their rollback. The drain
survives a restart of this agent: its entries are in the journal, running migrations are
adopted (each recovers on its own), the rest goes on."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from agent.context import Context, Verb
from agent.devices import failover_negotiated, interfaces
from agent.domain import Domain
from agent.envelope import FINAL, Operation, OpState, StepName
from agent.errors import AgentError, Conflict, InvalidRequest
from agent.fields import DomainName, HostId, RequestId
from agent.operations import Ended, Progress, Runner
from agent.placement import Destination, Placement, Vm, plan
from agent.registry import Registration
from handlers.failover.plan import FailoverRequest, Mode, find_pair
from handlers.failover.source import migrate_with_failover
from handlers.migration import MigrateRequest, migrate

POLL_S = 0.5
RETRY_S = 2.0  # a migration its destination refused for its inbound limit is asked again
DRAIN_KEY = "host"  # the operation's `domain`: one drain per host at a time


class DrainRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    destinations: Annotated[list[HostId], Meta(max_length=1000)] | None = None
    domains: Annotated[list[DomainName], Meta(max_length=10_000)] | None = None
    max_parallel: Annotated[int, Meta(ge=1, le=64)] = 1
    mode: Mode = "auto"
    force: bool = False
    max_downtime_ms: Annotated[int, Meta(ge=1, le=60_000)] | None = None
    bandwidth_mib_s: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    postcopy: bool = False
    timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 600.0
    dry_run: bool = False
    request_id: RequestId | None = None


class UndrainRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: RequestId | None = None


class EntryState(enum.StrEnum):
    """Where one domain of a drain is (contract v1.2: the drain's `domains`)."""

    QUEUED = "queued"
    RUNNING = "running"  # its migration's operation runs
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNPLACED = "unplaced"  # no destination has room for it, or takes it
    UNMOVABLE = "unmovable"  # it cannot migrate (a host device without failover, ...)


LEFT = (EntryState.UNPLACED, EntryState.UNMOVABLE)  # not planned: the drain leaves them


class Entry(msgspec.Struct, kw_only=True):
    """One domain of the drain, as its progress shows it."""

    domain: dict[str, str]  # uuid, name
    destination: str | None
    state: EntryState
    failover: bool = False
    operation_id: str | None = None
    reason: str | None = None
    primary_outage_s: float | None = None
    attempts: int = 0


# ---------------------------------------------------------------- planning


def _passthrough(live: str) -> bool:
    devices = ET.fromstring(live).find("devices")  # noqa: S314 - libvirt's own XML
    if devices is None:
        return False
    return devices.find("hostdev") is not None or any(
        i.get("type") == "hostdev" for i in devices.findall("interface")
    )


def cpu_needed(live: str, source_cpu: str) -> str:
    """What host CPU a domain needs elsewhere (placement.Vm.cpu): host-passthrough (and
    maximum) the source's, host-model the source's vendor, a named model nothing here."""
    cpu = ET.fromstring(live).find("cpu")  # noqa: S314 - libvirt's own XML
    mode = cpu.get("mode", "custom") if cpu is not None else "custom"
    if mode in ("host-passthrough", "maximum"):
        return source_cpu
    if mode == "host-model":
        return source_cpu.partition("/")[0] + "/"
    return ""


async def _vm(ctx: Context, dom: Domain, req: DrainRequest, arch: str, source_cpu: str) -> Vm:
    """The planner's view of one domain: its memory, whether it has a failover pair, and why
    it cannot move at all."""
    info = await dom.info()
    live = await dom.xml()
    needs_primary, unmovable = False, ""
    try:
        _, standby = find_pair(interfaces(live), None)
    except AgentError as exc:
        standby = None
        if _passthrough(live):
            unmovable = f"a passthrough device without a failover pair: {exc.message}"
    else:
        needs_primary = True
        if standby is None and not req.force:
            unmovable = "its passthrough NIC has no standby (force moves it without network)"
        elif standby is not None and ctx.failover.guest_check == "monitor" and not req.force:
            negotiated, how = await failover_negotiated(dom, standby.alias)
            if negotiated is False:
                unmovable = f"the guest never negotiated failover ({how}); force moves it"
    return Vm(uuid=dom.uuid, name=dom.name, memory_kib=info.max_memory_kib, arch=arch,
              needs_primary=needs_primary, unmovable=unmovable,
              cpu=cpu_needed(live, source_cpu))  # fmt: skip


def _destination(reg: Registration) -> Destination:
    caps, cap = reg.capabilities, reg.capacity
    pool = reg.failover_pool or {}
    free_vfs = pool.get("size") if pool.get("kind") == "pci" else None
    return Destination(
        host=reg.host, memory_kib=cap.memory_kib if cap else 0, arch=cap.arch if cap else "",
        admission=reg.admission, maintenance=reg.maintenance is not None,
        failover=bool(caps and caps.virtio_net_failover),
        free_vfs=free_vfs if isinstance(free_vfs, int) else None,
        cpu=cap.cpu if cap else "",
    )  # fmt: skip


async def make_drain_plan(ctx: Context, req: DrainRequest) -> list[Placement]:
    load = await ctx.hypervisor.host_load()
    doms = await ctx.hypervisor.running()
    if req.domains is not None:
        wanted = set(req.domains)
        doms = [d for d in doms if d.name in wanted or d.uuid in wanted]
        missing = wanted - {d.name for d in doms} - {d.uuid for d in doms}
        if missing:
            raise InvalidRequest(f"not active here: {', '.join(sorted(missing))}",
                                 domains=sorted(missing))  # fmt: skip
    vms = [await _vm(ctx, d, req, load.arch, load.cpu) for d in doms]
    regs = await ctx.registry.hosts()
    if req.destinations is not None:
        allowed = set(req.destinations)
        regs = [r for r in regs if r.host in allowed]
    return plan(vms, [_destination(r) for r in regs], source=ctx.host)


def _entries(placements: list[Placement]) -> list[Entry]:
    out = []
    for p in placements:
        state = (EntryState.QUEUED if p.destination
                 else EntryState.UNMOVABLE if p.vm.unmovable else EntryState.UNPLACED)  # fmt: skip
        out.append(Entry(domain={"uuid": p.vm.uuid, "name": p.vm.name},
                         destination=p.destination, state=state,
                         failover=p.vm.needs_primary, reason=p.reason or None))  # fmt: skip
    return out


def totals(entries: list[Entry]) -> dict[str, int]:
    t = dict.fromkeys(("planned", "queued", "running", "succeeded", "failed", "unplaced"), 0)
    for e in entries:
        if e.state in LEFT:
            t["unplaced"] += 1
            continue
        t["planned"] += 1
        t[e.state] += 1
    return t


# ---------------------------------------------------------------- the verbs


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def drain(ctx: Context, req: DrainRequest) -> dict[str, Any]:
    placements = await make_drain_plan(ctx, req)
    if req.dry_run:
        return {"plan": [{"domain": {"uuid": p.vm.uuid, "name": p.vm.name},
                          "destination": p.destination, "failover": p.vm.needs_primary,
                          **({"reason": p.reason} if p.reason else {})}
                         for p in placements]}  # fmt: skip
    m = ctx.operations.journal.maintenance()
    if m is not None and ctx.operations.running(m["operation_id"]):
        raise Conflict(f"drain {m['operation_id']} is running", operation_id=m["operation_id"])
    entries = _entries(placements)
    op = ctx.operations.start("host.drain", DRAIN_KEY, _runner(ctx, req, entries))
    ctx.operations.journal.set_maintenance(
        {"state": "draining", "operation_id": op.id, "since": _now()}
    )
    await ctx.announce()  # in the registration before the reply
    return {"operation_id": op.id, "state": op.state}


async def undrain(ctx: Context, _: UndrainRequest) -> dict[str, Any]:
    m = ctx.operations.journal.maintenance()
    if m is not None and ctx.operations.running(m["operation_id"]):
        raise Conflict(f"drain {m['operation_id']} is still running; cancel it first "
                       "(operation.cancel)", operation_id=m["operation_id"])  # fmt: skip
    ctx.operations.journal.set_maintenance(None)
    await ctx.announce()
    return {"maintenance": None, "was": m}


# ---------------------------------------------------------------- running it


def _runner(ctx: Context, req: DrainRequest, entries: list[Entry]) -> Runner:
    async def run(p: Progress) -> dict[str, Any]:
        p.step(StepName.MIGRATE, max_parallel=req.max_parallel)
        return await Drain(ctx, req, entries, p).run()

    return run


class Drain:
    def __init__(self, ctx: Context, req: DrainRequest, entries: list[Entry], p: Progress):
        self.ctx, self.req, self.entries, self.p = ctx, req, entries, p
        self.not_before: dict[str, float] = {}
        # A migration cancelled before this (by the agent's stop, when resumed) runs again.
        self.resumed_at = 0.0

    def report(self) -> None:
        self.p.update(totals=totals(self.entries),
                      domains=[msgspec.to_builtins(e) for e in self.entries],
                      request=msgspec.to_builtins(self.req))  # fmt: skip

    async def run(self) -> dict[str, Any]:
        cancelled = False
        self.report()
        try:
            await self._loop()
        except asyncio.CancelledError:
            if self.ctx.operations.stopping:
                raise  # the agent stops: the next start goes on with this drain
            cancelled = True
            if self.p.op.id in self.ctx.operations.cancel_running:
                for e in self.entries:
                    if e.state is EntryState.RUNNING and e.operation_id:
                        with contextlib.suppress(AgentError):  # it ended meanwhile
                            self.ctx.operations.cancel(e.operation_id)
            await self._wait_running()
        return self._end(cancelled)

    async def _loop(self) -> None:
        while True:
            running = sum(e.state is EntryState.RUNNING for e in self.entries)
            now = time.monotonic()
            for e in self.entries:
                if running >= self.req.max_parallel:
                    break
                if e.state is EntryState.QUEUED and self.not_before.get(e.domain["uuid"], 0) <= now:
                    running += await self._start(e)
            changed = self._poll()
            if changed:
                self.report()
            if not any(e.state in (EntryState.QUEUED, EntryState.RUNNING) for e in self.entries):
                return
            await asyncio.sleep(POLL_S)

    async def _start(self, e: Entry) -> bool:
        """Start `e`'s migration; whether it runs."""
        req, ctx = self.req, self.ctx
        holder = ctx.operations.holder(e.domain["uuid"])
        if holder is not None:
            # Started before the agent stopped, and not yet in the drain's journal: adopted.
            e.state, e.operation_id = EntryState.RUNNING, holder
            self.report()
            return True
        e.attempts += 1
        assert e.destination is not None
        try:
            if e.failover:
                started = await migrate_with_failover(ctx, FailoverRequest(
                    domain=e.domain["uuid"], destination=e.destination, mode=req.mode,
                    force=req.force, max_downtime_ms=req.max_downtime_ms,
                    bandwidth_mib_s=req.bandwidth_mib_s, postcopy=req.postcopy,
                    timeout_s=req.timeout_s))  # fmt: skip
            else:
                started = await migrate(ctx, MigrateRequest(
                    domain=e.domain["uuid"], destination=e.destination,
                    max_downtime_ms=req.max_downtime_ms, bandwidth_mib_s=req.bandwidth_mib_s,
                    postcopy=req.postcopy, timeout_s=req.timeout_s))  # fmt: skip
        except AgentError as exc:
            if exc.details.get("reason") == "max_operations":
                # This agent's own bound (the drain holds a slot too): wait for a slot.
                e.reason = f"waiting: {exc.message}"
                self.not_before[e.domain["uuid"]] = time.monotonic() + RETRY_S
            else:
                e.state, e.reason = EntryState.FAILED, f"{exc.code}: {exc.message}"
            self.report()
            return False
        e.state, e.operation_id, e.reason = EntryState.RUNNING, started["operation_id"], None
        self.report()
        return True

    def _poll(self) -> bool:
        changed = False
        for e in self.entries:
            if e.state is not EntryState.RUNNING or e.operation_id is None:
                continue
            op = self.ctx.operations.get(e.operation_id)
            if op.state not in FINAL:
                continue
            changed = True
            if op.state is OpState.SUCCEEDED:
                e.state = EntryState.SUCCEEDED
                outage = (op.result or {}).get("primary_outage_s")
                e.primary_outage_s = outage if isinstance(outage, int | float) else None
                continue
            err = op.error or {}
            if op.state is OpState.CANCELLED and op.updated <= self.resumed_at:
                e.state, e.reason = EntryState.QUEUED, "again: the agent stopped while it ran"
                continue
            if (err.get("code") == "unavailable"
                    and (err.get("details") or {}).get("reason") == "inbound_limit"):  # fmt: skip
                e.state, e.reason = EntryState.QUEUED, "waiting: the destination's inbound limit"
                self.not_before[e.domain["uuid"]] = time.monotonic() + RETRY_S
                continue
            e.state = EntryState.FAILED
            e.reason = f"{err.get('code', op.state)}: {err.get('message', '')}".strip()
        return changed

    async def _wait_running(self) -> None:
        while any(e.state is EntryState.RUNNING for e in self.entries):
            if self._poll():
                self.report()
            await asyncio.sleep(POLL_S)

    def _end(self, cancelled: bool) -> dict[str, Any]:
        ctx = self.ctx
        for e in self.entries:
            if e.state is EntryState.QUEUED:
                e.state, e.reason = EntryState.FAILED, "not started: the drain was cancelled"
        out = {"totals": totals(self.entries),
               "domains": [msgspec.to_builtins(e) for e in self.entries]}  # fmt: skip
        m = ctx.operations.journal.maintenance() or {}
        moved = all(e.state is EntryState.SUCCEEDED for e in self.entries)
        if moved and not cancelled:
            ctx.operations.journal.set_maintenance({**m, "state": "drained"})
            return out
        if cancelled:
            raise Ended(OpState.CANCELLED, AgentError(
                "the drain was cancelled; the host stays in maintenance (host.undrain ends it)",
                **out))  # fmt: skip
        raise AgentError("not every domain moved; the host stays in maintenance (host.undrain "
                         "ends it)", **out)  # fmt: skip


def recovery(ctx: Context, op: Operation) -> Runner:
    """A drain the previous process was running: its entries from the journal; migrations it
    had started are adopted (each recovers on its own), the rest goes on."""

    async def recover(p: Progress) -> dict[str, Any]:
        progress = op.progress or {}
        req = msgspec.convert(progress.get("request") or {}, DrainRequest)
        entries = msgspec.convert(progress.get("domains") or [], list[Entry])
        p.step(StepName.RECOVER, interrupted_at=op.step or "start")
        drain = Drain(ctx, req, entries, p)
        drain.resumed_at = time.time()
        return await drain.run()

    return recover


VERBS = [
    Verb("host.drain", DrainRequest, drain, recover=recovery),
    Verb("host.undrain", UndrainRequest, undrain),
]
