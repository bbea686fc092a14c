"""`migrate`: live migration to another registered host, peer-to-peer through libvirtd, as a
long operation with progress from the job statistics and a convergence policy."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated, Any

import libvirt
import msgspec
from msgspec import Meta

from agent import crashpoints
from agent.context import Context, Verb
from agent.domain import Domain, DomainState, Job
from agent.envelope import Operation, StepName
from agent.errors import AgentError, Conflict, InvalidRequest, LibvirtFailure, Timeout
from agent.fields import MAX_LEASE_S, DomainName, HostId, RequestId
from agent.operations import Progress, Runner
from agent.peers import AdmitReply, AdmitRequest, PrimaryAsk, ReleaseRequest
from agent.registry import Registration

MIGRATE_FLAGS = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
PERSISTENT_FLAGS = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
POLL_S = 0.5
# Iterations without progress in data_remaining before post-copy (when allowed) is started.
STALL_ITERATIONS = 5


class MigrateRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    domain: DomainName
    destination: HostId
    max_downtime_ms: Annotated[int, Meta(ge=1, le=60_000)] | None = None
    bandwidth_mib_s: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    postcopy: bool = False
    timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 600.0
    request_id: RequestId | None = None


class Convergence:
    """The convergence policy. When the data still to send has not shrunk for STALL_ITERATIONS
    polls, allow twice the downtime (up to `ceiling_ms`); once at the ceiling, switch to
    post-copy if the request allows it. `timeout_s` (the caller's) aborts in the end."""

    def __init__(self, downtime_ms: int, ceiling_ms: int, postcopy: bool) -> None:
        self.downtime_ms = downtime_ms
        self.ceiling_ms = max(ceiling_ms, downtime_ms)
        self.postcopy_allowed = postcopy
        self.postcopy = False
        self.steps = 0
        self._best: int | None = None
        self._stalled = 0

    def observe(self, remaining: int | None) -> str | None:
        """One poll; the action to take now: "downtime" (set self.downtime_ms), "postcopy"."""
        if remaining is None or self.postcopy:
            return None
        if self._best is None or remaining < self._best:
            self._best, self._stalled = remaining, 0
            return None
        self._stalled += 1
        if self._stalled < STALL_ITERATIONS:
            return None
        self._stalled = 0
        self._best = None  # judge the next stretch on its own
        if self.downtime_ms < self.ceiling_ms:
            self.downtime_ms = min(self.ceiling_ms, self.downtime_ms * 2)
            self.steps += 1
            return "downtime"
        if self.postcopy_allowed:
            self.postcopy = True
            return "postcopy"
        return None

    def state(self) -> dict[str, Any]:
        return {"max_downtime_ms": self.downtime_ms, "downtime_steps": self.steps,
                "postcopy": self.postcopy}  # fmt: skip


def _stats(dom: libvirt.virDomain) -> dict[str, Any]:
    try:
        s = dom.jobStats()
    except libvirt.libvirtError:
        return {}
    total = s.get("data_total") or 0
    processed = s.get("data_processed") or 0
    return {
        "percent": round(100.0 * processed / total, 1) if total else None,
        "data_remaining": s.get("data_remaining"),
        "memory_dirty_rate": s.get("memory_dirty_rate"),
        "iteration": s.get("memory_iteration"),
        "expected_downtime_ms": s.get("downtime"),
        "elapsed_ms": s.get("time_elapsed"),
    }


def migration_call(
    req: MigrateRequest, migration_uri: str, persistent: bool, persist_xml: str | None
) -> tuple[dict[str, Any], int]:
    """migrateToURI3's parameters and flags."""
    params: dict[str, Any] = {}
    if req.bandwidth_mib_s:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = req.bandwidth_mib_s
    if migration_uri:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = migration_uri
    flags = MIGRATE_FLAGS | (libvirt.VIR_MIGRATE_POSTCOPY if req.postcopy else 0)
    if persistent:
        flags |= PERSISTENT_FLAGS
        if persist_xml is not None:
            params[libvirt.VIR_MIGRATE_PARAM_PERSIST_XML] = persist_xml
    return params, flags


DEFAULT_DOWNTIME_MS = 300  # QEMU's default downtime limit
ADMIT_SLACK_S = 120.0  # an admission's lease beyond the migration's own timeout
PEER_TIMEOUT_S = 30.0


async def max_downtime(dom: Domain) -> int:
    """The domain's downtime limit; QEMU's default where the driver cannot say (libvirt-python
    answers None, not an error, when the driver lacks the call)."""
    try:
        downtime = await dom.run(lambda d: d.migrateGetMaxDowntime(0))
    except LibvirtFailure:
        return DEFAULT_DOWNTIME_MS
    return downtime if isinstance(downtime, int) and downtime > 0 else DEFAULT_DOWNTIME_MS


async def run_migration(ctx: Context, p: Progress, dom: Domain, dest_uri: str, req: MigrateRequest,
                        migration_uri: str = "", persist_xml: str | None = None,
                        ) -> dict[str, Any]:  # fmt: skip
    """The migration itself, reporting progress; aborts the job on timeout or cancellation.
    A persistent domain arrives persistent (with `persist_xml` as its definition when given)
    and leaves no definition here; a transient one stays transient."""
    hv = ctx.hypervisor
    params, flags = migration_call(req, migration_uri, await dom.persistent(), persist_xml)
    downtime = await max_downtime(dom)
    if req.max_downtime_ms and req.max_downtime_ms < downtime:
        downtime = req.max_downtime_ms
        await dom.run(lambda d: d.migrateSetMaxDowntime(req.max_downtime_ms, 0))
    policy = Convergence(downtime, req.max_downtime_ms or downtime, req.postcopy)
    started = time.monotonic()
    uuid = dom.uuid
    iterations = [0]

    def on_iteration(event: Any) -> None:
        # QEMU starts another pass over dirty memory: reported at once, not at the next poll.
        if event.data.domain.uuid == uuid:
            iterations[0] = event.data.iteration
            p.update(**{**p.op.progress, "iteration": event.data.iteration})

    stop_listening = hv.listen("migration_iteration", on_iteration)
    job = asyncio.ensure_future(dom.run(lambda d: d.migrateToURI3(dest_uri, params, flags)))
    try:
        while not job.done():
            await asyncio.wait({job}, timeout=POLL_S)
            if job.done():
                break
            stats = await dom.run(_stats)
            action = policy.observe(stats.get("data_remaining"))
            if action == "downtime":
                await dom.run(lambda d: d.migrateSetMaxDowntime(policy.downtime_ms, 0))
            elif action == "postcopy":
                await dom.run(lambda d: d.migrateStartPostCopy(0))
            p.update(**stats, **policy.state(), passes=iterations[0])
            if time.monotonic() - started > req.timeout_s:
                raise Timeout(f"migration did not finish within {req.timeout_s}s; aborted",  # noqa: TRY301 - the handler below aborts the job for every way out
                              timeout_s=req.timeout_s)  # fmt: skip
        await job
    except BaseException:
        # Whatever ended the watch (a timeout, a cancel, a failed policy step): the job is
        # aborted and waited for, so that nothing lands on the destination behind the
        # caller's back; whether it landed before the abort took is for the caller to check.
        if not job.done():
            with contextlib.suppress(AgentError):
                await dom.run(lambda d: d.abortJob())
        with contextlib.suppress(AgentError, asyncio.CancelledError):
            await job
        raise
    finally:
        stop_listening()
    return {"seconds": round(time.monotonic() - started, 3), "passes": iterations[0],
            **policy.state()}  # fmt: skip


async def migrate_and_locate(
    ctx: Context, p: Progress, dom: Domain, dest: Registration, req: MigrateRequest,
    persist_xml: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The migration, judged by where the domain runs afterwards (both libvirts), not by what
    the call said: an error after which the domain runs on the destination is a migration."""
    try:
        return await run_migration(ctx, p, dom, dest.libvirt_uri, req, dest.migration_uri,
                                   persist_xml)  # fmt: skip
    except AgentError as exc:
        if await ctx.hypervisor.where_is(dom.uuid, dest.libvirt_uri) != "destination":
            raise
        return {"note": f"the migration call failed ({exc.message}) but the domain runs on "
                        f"{req.destination}"}  # fmt: skip


async def admit(
    ctx: Context, p: Progress, dom: Domain, dest: Registration, timeout_s: float,
    primary: PrimaryAsk | None = None,
) -> AdmitReply | None:  # fmt: skip
    """Ask the destination to admit this migration (contract v1.2), when it admits: refused
    (`unavailable`, with the reason), nothing has changed yet. None: a destination of an
    earlier release, which admits nothing."""
    if not dest.admission:
        return None
    p.step(StepName.ADMIT, destination=dest.host)
    req = await admission_request(ctx, dom, p.op.id, timeout_s, primary)
    return await ctx.peers.admit(dest.host, req, PEER_TIMEOUT_S)


async def admission_request(
    ctx: Context, dom: Domain, op_id: str, timeout_s: float, primary: PrimaryAsk | None
) -> AdmitRequest:
    """What the destination admits: the domain's maximum memory and vCPUs, for as long as the
    migration may take."""
    info = await dom.info()
    return AdmitRequest(
        operation_id=op_id, domain=dom.uuid, name=dom.name, memory_kib=info.max_memory_kib,
        vcpus=info.vcpus, primary=primary, lease_s=min(timeout_s + ADMIT_SLACK_S, MAX_LEASE_S),
    )  # fmt: skip


async def release_admission(ctx: Context, host: str, admitted: AdmitReply) -> None:
    """Best effort: the destination also ends an admission when the domain arrives, or when
    its lease runs out."""
    with contextlib.suppress(AgentError):
        await ctx.peers.release(host, ReleaseRequest(admission_id=admitted.admission_id),
                                PEER_TIMEOUT_S)  # fmt: skip


async def migrate(ctx: Context, req: MigrateRequest) -> dict[str, Any]:
    ctx.hypervisor.connection()  # `unavailable` first while libvirt is away
    if req.destination == ctx.host:
        raise InvalidRequest(
            f"destination {req.destination!r} is this host", destination=req.destination
        )
    dest = await ctx.registry.resolve(req.destination)
    dom = await ctx.hypervisor.lookup(req.domain)
    state, _ = await dom.state()
    if state not in (DomainState.RUNNING, DomainState.PAUSED):
        raise Conflict(
            f"domain {req.domain!r} is {state}; migrate needs it running or paused", state=state
        )

    async def runner(p: Progress) -> dict[str, Any]:
        admitted = await admit(ctx, p, dom, dest, req.timeout_s)
        try:
            p.step(StepName.MIGRATE, destination=req.destination)
            result = await migrate_and_locate(ctx, p, dom, dest, req)
            crashpoints.reached("migrate.done")
            p.step(StepName.VERIFY)
            if await ctx.hypervisor.where_is(dom.uuid, dest.libvirt_uri) != "destination":
                raise AgentError(f"domain is not running on {req.destination} after the migration")
        finally:
            if admitted is not None:
                await release_admission(ctx, dest.host, admitted)
        return {**result, "destination": req.destination}

    op = await ctx.start_operation("migrate", dom.uuid, runner)
    return {"operation_id": op.id, "state": op.state}


def recovery(ctx: Context, op: Operation) -> Runner:
    """Finish a migration the previous process of this agent was running when it died: the
    domain's place decides (both libvirts), once no migration job runs on it here."""

    async def recover(p: Progress) -> dict[str, Any]:
        destination = next((s["destination"] for s in op.steps if s.get("destination")), None)
        p.step(StepName.RECOVER, interrupted_at=op.step or "start")
        if destination is None:
            raise AgentError("the agent restarted before the migration began; nothing changed")
        dest = await ctx.registry.resolve(destination)
        uuid = op.domain
        while await ctx.hypervisor.where_is(uuid, None) == "source":
            dom = await ctx.hypervisor.domain(uuid)
            if await dom.job() is not Job.RUNNING:
                break
            await asyncio.sleep(POLL_S)  # libvirtd still migrates it: wait for the outcome
        where = await ctx.hypervisor.where_is(uuid, dest.libvirt_uri)
        if dest.admission:  # what the destination admitted for it is over either way
            with contextlib.suppress(AgentError):
                await ctx.peers.release(dest.host, ReleaseRequest(operation_id=op.id),
                                        PEER_TIMEOUT_S)  # fmt: skip
        if where != "destination":
            place = "this host" if where == "source" else where
            raise AgentError(f"the agent restarted during the migration; the domain runs on "
                             f"{place}", where=where)  # fmt: skip
        return {"destination": destination, "recovered": True,
                "note": "the migration completed while the agent restarted"}  # fmt: skip

    return recover


VERBS = [Verb("migrate", MigrateRequest, migrate, recover=recovery)]
