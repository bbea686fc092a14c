"""Domain verbs: `domain.list`, `domain.get` and the lifecycle actions `domain.start`,
`domain.shutdown`, `domain.destroy`, `domain.reboot`, `domain.suspend`, `domain.resume`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import libvirt
import msgspec

from agent.context import Context, Verb
from agent.devices import failover_negotiated, interfaces
from agent.domain import ACTIVE, Domain, DomainState
from agent.domain import DomainState as S
from agent.errors import Conflict, Unavailable
from agent.events import DomainSnapshot, domain_ref, domain_state_names
from agent.fields import DomainName, RequestId


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


async def domain_info(dom: Domain) -> DomainInfo:
    def read(d: libvirt.virDomain) -> DomainInfo:  # one executor call
        state, reason = d.state()
        _, max_mem, mem, vcpus, _ = d.info()
        persistent = bool(d.isPersistent())
        st, rs = domain_state_names(state, reason)
        ref = domain_ref(d)
        return DomainInfo(uuid=ref.uuid, name=ref.name, id=ref.id, state=st, reason=rs,
                          persistent=persistent,
                          autostart=bool(d.autostart()) if persistent else False,
                          vcpus=int(vcpus), memory_kib=int(mem),
                          max_memory_kib=int(max_mem))  # fmt: skip

    return await dom.run(read)


async def domain_list(ctx: Context, _: ListRequest) -> list[DomainSnapshot]:
    ctx.hypervisor.connection()
    return await ctx.hypervisor.snapshot()


async def domain_get(ctx: Context, req: DomainRequest) -> DomainInfo:
    dom = await ctx.hypervisor.lookup(req.domain)
    info = await domain_info(dom)
    if ctx.failover.guest_check != "monitor" or info.state != DomainState.RUNNING:
        return info
    standby = next((n for n in interfaces(await dom.xml()) if n.teaming == "persistent"), None)
    if standby is None:
        return info
    negotiated, how = await failover_negotiated(dom, standby.alias)
    return msgspec.structs.replace(
        info, failover=GuestFailover(standby=standby.alias, negotiated=negotiated, how=how)
    )


class StartRequest(DomainRequest, frozen=True, forbid_unknown_fields=True):
    # Start it even while this host is in maintenance (host.drain).
    force: bool = False


def _action(
    name: str, act: Callable[[Any], Any], needs: frozenset[DomainState],
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
        dom = await ctx.hypervisor.lookup(req.domain)
        async with ctx.exclusive(dom.uuid):
            state, _ = await dom.state()
            if state not in needs:
                raise Conflict(
                    f"domain {req.domain!r} is {state}; domain.{name} needs it "
                    + " or ".join(sorted(needs)),
                    domain=req.domain,
                    state=state,
                )
            await dom.run(act)
            return await domain_info(dom)

    return Verb(f"domain.{name}", request, handler)


STOPPED = frozenset({S.SHUTOFF, S.CRASHED, S.NOSTATE})

VERBS = [
    Verb("domain.list", ListRequest, domain_list),
    Verb("domain.get", DomainRequest, domain_get),
    _action("start", lambda d: d.create(), STOPPED, StartRequest),
    _action("shutdown", lambda d: d.shutdown(), frozenset({S.RUNNING, S.PAUSED, S.BLOCKED})),
    _action("destroy", lambda d: d.destroy(), ACTIVE),
    _action("reboot", lambda d: d.reboot(0), frozenset({S.RUNNING, S.BLOCKED})),
    _action("suspend", lambda d: d.suspend(), frozenset({S.RUNNING, S.BLOCKED})),
    _action("resume", lambda d: d.resume(), frozenset({S.PAUSED})),
]
