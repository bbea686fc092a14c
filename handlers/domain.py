"""Domain verbs: `domain.list`, `domain.get` and the lifecycle actions `domain.start`,
`domain.shutdown`, `domain.destroy`, `domain.reboot`, `domain.suspend`, `domain.resume`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt
import msgspec

from agent.devices import failover_negotiated, interfaces
from agent.errors import Conflict, InvalidRequest, NotFound, Unavailable
from agent.events import DomainSnapshot, domain_ref, domain_state_names
from agent.fields import UUID_RE, DomainName, RequestId
from handlers import Context, HostContext, Verb


class ListRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: RequestId | None = None


class DomainRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    domain: DomainName
    request_id: RequestId | None = None


class GuestFailover(msgspec.Struct, frozen=True):
    """Whether the guest bonded its failover pair, for a domain with a virtio standby."""

    standby: str
    negotiated: bool | None  # None: could not be told (see `how`)
    how: str


class DomainInfo(msgspec.Struct, frozen=True):
    uuid: str
    name: str
    id: int | None
    state: str
    reason: str
    persistent: bool
    autostart: bool
    vcpus: int
    memory_kib: int
    max_memory_kib: int
    # Running domains with a <teaming type='persistent'/> standby, when failover.guest_check
    # is `monitor` (docs/failover.md): what QEMU says of the guest's bond.
    failover: GuestFailover | None = None


def _lookup(conn: Any, name_or_uuid: str) -> Any:  # runs on the executor
    """A domain by UUID or name; NotFound names what was asked for. A name may look like a
    UUID: what is asked for is the domain with that UUID or that name, and when one domain
    has it as UUID and another as name, the request is ambiguous."""

    def one(lookup: Callable[[str], Any]) -> Any:
        try:
            return lookup(name_or_uuid)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    by_uuid = one(conn.lookupByUUIDString) if UUID_RE.match(name_or_uuid) else None
    by_name = one(conn.lookupByName)
    if by_uuid is not None and by_name is not None and by_uuid.UUID() != by_name.UUID():
        raise InvalidRequest(
            f"{name_or_uuid!r} is the UUID of domain {by_uuid.name()!r} and the name of domain "
            f"{by_name.UUIDString()}; ask for one of them by the other's UUID or name",
            domain=name_or_uuid,
        )
    dom = by_uuid or by_name
    if dom is None:
        raise NotFound(f"domain {name_or_uuid!r} not found", domain=name_or_uuid)
    return dom


async def find_domain(ctx: HostContext, name_or_uuid: str) -> Any:
    """The domain named by a request (name or UUID); `not_found` names what was asked for."""
    return await ctx.hypervisor.call(_lookup, ctx.conn(), name_or_uuid)


def _info(dom: Any) -> DomainInfo:
    state, reason = dom.state()
    st, rs = domain_state_names(state, reason)
    _, max_mem, mem, vcpus, _ = dom.info()
    ref = domain_ref(dom)
    return DomainInfo(
        uuid=ref.uuid,
        name=ref.name,
        id=ref.id,
        state=st,
        reason=rs,
        persistent=bool(dom.isPersistent()),
        autostart=bool(dom.autostart()) if dom.isPersistent() else False,
        vcpus=int(vcpus),
        memory_kib=int(mem),
        max_memory_kib=int(max_mem),
    )


async def domain_list(ctx: Context, _: ListRequest) -> list[DomainSnapshot]:
    ctx.conn()
    return await ctx.hypervisor.snapshot()


async def domain_get(ctx: Context, req: DomainRequest) -> DomainInfo:
    dom = await find_domain(ctx, req.domain)
    info = await ctx.hypervisor.call(_info, dom)
    if ctx.failover.guest_check != "monitor" or info.state != "running":
        return info
    live = await ctx.hypervisor.call(dom.XMLDesc, 0)
    standby = next((n for n in interfaces(live) if n.teaming == "persistent"), None)
    if standby is None:
        return info
    negotiated, how = await failover_negotiated(ctx.hypervisor, dom, standby.alias)
    return msgspec.structs.replace(
        info, failover=GuestFailover(standby=standby.alias, negotiated=negotiated, how=how)
    )


ACTIVE = frozenset({"running", "paused", "blocked", "pmsuspended", "shutdown"})


class StartRequest(DomainRequest, frozen=True, forbid_unknown_fields=True):
    # Start it even while this host is in maintenance (host.drain).
    force: bool = False


def _action(
    name: str, act: Callable[[Any], Any], needs: frozenset[str],
    request: type[DomainRequest] = DomainRequest,
) -> Verb:  # fmt: skip
    """A lifecycle verb: checked against the domain's state first, so every driver answers
    a wrong-state request with `conflict` naming the state, then done under the domain's lock."""

    async def handler(ctx: Context, req: DomainRequest) -> DomainInfo:
        if isinstance(req, StartRequest) and not req.force:
            m = ctx.operations.journal.maintenance()
            if m is not None:
                raise Unavailable(f"this host is in maintenance ({m.get('state')}); domain.start "
                                  "with force starts it anyway", reason="maintenance")  # fmt: skip
        dom = await find_domain(ctx, req.domain)
        async with ctx.exclusive(dom.UUIDString()):
            state, reason = await ctx.hypervisor.call(dom.state)
            st, _ = domain_state_names(state, reason)
            if st not in needs:
                raise Conflict(
                    f"domain {req.domain!r} is {st}; domain.{name} needs it "
                    + " or ".join(sorted(needs)),
                    domain=req.domain,
                    state=st,
                )
            await ctx.hypervisor.call(act, dom)
            return await ctx.hypervisor.call(_info, dom)

    return Verb(f"domain.{name}", request, handler)


VERBS = [
    Verb("domain.list", ListRequest, domain_list),
    Verb("domain.get", DomainRequest, domain_get),
    _action(
        "start", lambda d: d.create(), frozenset({"shutoff", "crashed", "nostate"}), StartRequest
    ),
    _action("shutdown", lambda d: d.shutdown(), frozenset({"running", "paused", "blocked"})),
    _action("destroy", lambda d: d.destroy(), ACTIVE),
    _action("reboot", lambda d: d.reboot(0), frozenset({"running", "blocked"})),
    _action("suspend", lambda d: d.suspend(), frozenset({"running", "blocked"})),
    _action("resume", lambda d: d.resume(), frozenset({"paused"})),
]
