"""migrate-with-failover, the plan: find the primary NIC and its standby in the domain's
definition, choose the mode, and refuse what would cut the VM off or cannot work."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from agent.devices import Nic, device_xml, interfaces
from agent.errors import InvalidRequest, NotFound, Unsupported
from agent.registry import Registration
from handlers import Context
from handlers.devices import Alias
from handlers.domain import DomainName, RequestId
from handlers.migration import HostId

Mode = Literal["auto", "sequenced", "qemu"]


class FailoverRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    domain: DomainName
    destination: HostId
    mode: Mode = "auto"
    # Alias of the passthrough NIC; found from <teaming> or the same-MAC pair when omitted.
    primary: Alias | None = None
    # Unplug even when no standby carries the traffic meanwhile (the VM loses its network).
    force: bool = False
    max_downtime_ms: Annotated[int, Meta(ge=1, le=60_000)] | None = None
    bandwidth_mib_s: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    postcopy: bool = False
    timeout_s: Annotated[float, Meta(gt=0, le=86_400)] = 600.0
    request_id: RequestId | None = None


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    primary: str
    standby: str | None
    mac: str
    destination: str
    device: str  # the primary's definition as it is now


def find_pair(nics: list[Nic], primary: str | None) -> tuple[Nic, Nic | None]:
    """The primary and its standby: teaming elements first, then the same-MAC pair."""
    if primary is not None:
        p = next((n for n in nics if n.alias == primary), None)
        if p is None:
            raise NotFound(f"the domain has no interface with alias {primary!r}", alias=primary,
                           interfaces=[n.alias for n in nics])  # fmt: skip
    else:
        transient = [n for n in nics if n.teaming == "transient"]
        paired = [
            n for n in nics
            if n.teaming != "persistent" and n.model != "virtio"
            and any(o.mac == n.mac and o.alias != n.alias and o.teaming == "persistent"
                    for o in nics)
        ]  # fmt: skip
        hostdev = [n for n in nics if n.type == "hostdev"]
        candidates = transient or paired or hostdev
        if not candidates:
            raise NotFound(
                "no primary NIC found (no <teaming type='transient'>, no interface sharing its "
                "MAC with a <teaming type='persistent'/> standby, no hostdev interface); "
                "name it with `primary`",
                interfaces=[n.alias for n in nics],
            )
        p = candidates[0]
    if not p.alias:
        raise InvalidRequest("the primary has no alias; give it <alias name='ua-...'/>")
    standby = None
    if p.teaming_peer:
        standby = next((n for n in nics if n.alias == p.teaming_peer), None)
    if standby is None:
        standby = next(
            (
                n
                for n in nics
                if n.mac == p.mac and n.alias != p.alias and n.teaming == "persistent"
            ),
            None,
        )
    return p, standby


async def make_plan(ctx: Context, dom: Any, req: FailoverRequest, dest: Registration) -> Plan:
    live = await ctx.hypervisor.call(dom.XMLDesc, 0)
    p, standby = find_pair(interfaces(live), req.primary)
    if standby is None and not req.force:
        raise InvalidRequest(
            f"primary {p.alias!r} has no virtio standby with <teaming type='persistent'/> and "
            f"MAC {p.mac}; unplugging it would cut the VM off the network (set force to do it "
            "anyway)",
            primary=p.alias,
        )
    pool = (dest.failover_pool or {}).get("kind", "recorded")
    if p.type == "hostdev" and pool == "recorded":
        raise InvalidRequest(
            f"primary {p.alias!r} is a PCI passthrough device of this host; {dest.host} has no "
            "primary pool configured ([failover] pool_pci or pool_network) to give it an "
            "equivalent one",
            primary=p.alias, destination=dest.host,
        )  # fmt: skip
    src_caps, dst_caps = ctx.capabilities, dest.capabilities
    missing = []
    if p.teaming != "transient" or p.type != "hostdev":
        missing.append(f"{p.alias!r} is not a transient <teaming> hostdev interface")
    if not (src_caps and src_caps.virtio_net_failover):
        missing.append(f"{ctx.host} does not report virtio-net failover")
    if not (dst_caps and dst_caps.virtio_net_failover):
        missing.append(f"{dest.host} does not report virtio-net failover")
    if req.mode == "qemu" and missing:
        raise Unsupported("mode qemu is not possible: " + "; ".join(missing), reasons=missing)
    mode = req.mode if req.mode != "auto" else ("qemu" if not missing else "sequenced")
    device = device_xml(live, p.alias)
    assert device is not None
    return Plan(mode=mode, primary=p.alias, standby=standby.alias if standby else None,
                mac=p.mac, destination=dest.host, device=device)  # fmt: skip
