"""migrate-with-failover, the plan: find the primary NIC and its standby in the domain's
definition, choose the mode, and refuse what would cut the VM off or cannot work."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from agent.context import HostContext
from agent.devices import (
    USER_ALIAS_PREFIX,
    Nic,
    defined_form,
    device_element,
    failover_negotiated,
    interfaces,
)
from agent.domain import Domain
from agent.errors import Conflict, InvalidRequest, NotFound, Unsupported
from agent.fields import MAX_LEASE_S, Alias, DomainName, HostId, RequestId
from agent.registry import Registration

Mode = Literal["auto", "sequenced", "qemu"]
# What a source adds to its migration timeout and replug window when it asks for a lease
# (at most agent/fields.py's MAX_LEASE_S).
LEASE_MARGIN_S = 60


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
    mac: str  # the primary's MAC; for a plain <hostdev> (none of its own) the standby's
    destination: str
    device: str  # the primary's definition (inactive form): what is recorded and plugged again
    mode_reason: str = ""
    guest: str = ""  # what is known of the guest's failover bond, and how
    # What its hostdev network gave the primary in the live definition (agent/failover.py).
    carry: str = ""


def find_pair(nics: list[Nic], primary: str | None) -> tuple[Nic, Nic | None]:
    """The primary and its standby: teaming elements first, then the same-MAC pair."""
    if primary is not None:
        p = next((n for n in nics if n.alias == primary), None)
        if p is None:
            raise NotFound(f"the domain has no interface with alias {primary!r}", alias=primary,
                           interfaces=[n.alias for n in nics])  # fmt: skip
    else:
        transient = [n for n in nics if n.teaming == "transient" or n.qemu_pair]
        paired = [
            n for n in nics
            if n.teaming != "persistent" and n.model != "virtio"
            and n.mac and any(o.mac == n.mac and o.alias != n.alias and o.teaming == "persistent"
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
    if not p.user_alias:
        made = f"the alias {p.alias!r} is made by libvirt" if p.alias else "it has no alias"
        raise InvalidRequest(
            f"the primary cannot be tracked: {made} and can change when it is plugged again. "
            "Give it a user alias in the domain's definition (virsh edit: "
            f"<alias name='{USER_ALIAS_PREFIX}primary0'/> in its <{p.element}>), then retry",
            primary=p.alias,
        )
    others = [n.alias or n.mac or n.type for n in nics if n is not p and (
        n.teaming == "transient" or n.qemu_pair or n.type == "hostdev")]  # fmt: skip
    if others:
        # libvirt would migrate them with this host's VF addresses, past every pool.
        raise Unsupported(
            f"the domain has more passthrough NICs than the primary {p.alias!r}: "
            f"{', '.join(others)}; migrate-with-failover moves one failover pair - detach the "
            "others first (device.detach), or migrate with them unplugged",
            primary=p.alias, others=others,
        )  # fmt: skip
    standby = None
    if p.teaming_peer or p.qemu_pair:
        peer = p.teaming_peer or p.qemu_pair
        standby = next((n for n in nics if n.alias == peer), None)
    if standby is None:
        standby = next(
            (
                n
                for n in nics
                if p.mac and n.mac == p.mac and n.alias != p.alias and n.teaming == "persistent"
            ),
            None,
        )
    return p, standby


def lease_needed(ctx: HostContext, req: FailoverRequest) -> float:
    """How long the destination must hold the primary: the unplug, the migration, then the
    replug."""
    return (ctx.devices.detach_timeout_s + req.timeout_s + ctx.failover.replug_timeout_s
            + LEASE_MARGIN_S)  # fmt: skip


async def make_plan(ctx: HostContext, dom: Domain, req: FailoverRequest, dest: Registration
                    ) -> Plan:  # fmt: skip
    if lease_needed(ctx, req) > MAX_LEASE_S:
        longest = MAX_LEASE_S - (lease_needed(ctx, req) - req.timeout_s)
        raise InvalidRequest(
            f"timeout_s {req.timeout_s} with failover.replug_timeout_s "
            f"{ctx.failover.replug_timeout_s} needs a reservation longer than a destination "
            f"grants ({MAX_LEASE_S} s); the longest timeout_s is {longest}",
            timeout_s=req.timeout_s, max_timeout_s=longest,
        )  # fmt: skip
    live = await dom.xml()
    p, standby = find_pair(interfaces(live), req.primary)
    if standby is None and not req.force:
        raise InvalidRequest(
            f"primary {p.alias!r} has no virtio standby with <teaming type='persistent'/> and "
            f"MAC {p.mac}; unplugging it would cut the VM off the network (set force to do it "
            "anyway)",
            primary=p.alias,
        )
    guest = "not checked: no standby (forced)"
    if standby is not None and ctx.failover.guest_check == "monitor":
        negotiated, guest = await failover_negotiated(dom, standby.alias)
        if negotiated is False and not req.force:
            raise Conflict(
                f"the guest has no failover bond: {guest}; unplugging {p.alias!r} would cut "
                "it off the network (set force to do it anyway)",
                primary=p.alias, standby=standby.alias, reason="guest_not_negotiated",
            )  # fmt: skip
    elif standby is not None:
        guest = "not checked (failover.guest_check = off)"
    device = await defined_form(dom, live, p.alias)
    # What the definition says, not what runs: a port of a hostdev network runs as
    # <interface type='hostdev'> with this host's VF, and is defined on the network's name.
    kind = ET.fromstring(device)  # noqa: S314 - libvirt's own XML
    fixed_vf = kind.tag == "hostdev" or kind.get("type") == "hostdev"
    pool = (dest.failover_pool or {}).get("kind", "recorded")
    if fixed_vf and pool == "recorded":
        raise InvalidRequest(
            f"primary {p.alias!r} is a PCI passthrough device of this host; {dest.host} has no "
            "primary pool configured ([failover] pool_pci or pool_network) to give it an "
            "equivalent one",
            primary=p.alias, destination=dest.host,
        )  # fmt: skip
    mode, reason = choose_mode(ctx, req, dest, p, fixed_vf)
    mac = p.mac or (standby.mac if standby is not None else "")
    return Plan(mode=mode, mode_reason=reason, primary=p.alias,
                standby=standby.alias if standby else None, mac=mac, destination=dest.host,
                device=device, guest=guest, carry=network_carry(live, device, p.alias))  # fmt: skip


def network_carry(live: str, device: str, alias: str) -> str:
    """For a port of a hostdev network: what the network gave it, as the live definition
    shows it (`managed`, `<vlan>`, `<virtualport>`; they live in the network's definition,
    bridge_driver.c), so that a destination plugging a VF by address keeps them."""
    if ET.fromstring(device).get("type") != "network":  # noqa: S314 - libvirt's own XML
        return ""
    el = device_element(live, alias)
    if el is None or el.get("type") != "hostdev":
        return ""
    carry = ET.Element("carry")
    if el.get("managed"):
        carry.set("managed", str(el.get("managed")))
    for tag in ("vlan", "virtualport"):
        carry.extend(el.findall(tag))
    return ET.tostring(carry, encoding="unicode")


def choose_mode(
    ctx: HostContext, req: FailoverRequest, dest: Registration, p: Nic, fixed_vf: bool
) -> tuple[str, str]:
    """The mode and why. `qemu` (QEMU unplugs the primary during the migration and plugs one
    on the destination by itself) needs a transient <teaming> member, virtio-net failover on
    both hosts, and a destination that finds its own VF: QEMU is started there from this
    host's definition, so a VF given by PCI address would be this host's address."""
    src_caps, dst_caps = ctx.capabilities, dest.capabilities
    missing = []
    # QEMU unplugs a primary it pairs with the standby: a transient <teaming> member, or a
    # device given failover_pair_id through <qemu:override>.
    paired = p.qemu_pair or (p.teaming == "transient" and p.type == "hostdev")
    if not paired:
        missing.append(f"{p.alias!r} is not a transient <teaming> passthrough device, nor "
                       "paired by QEMU (failover_pair_id)")  # fmt: skip
    elif fixed_vf:
        missing.append(f"{p.alias!r} is a VF given by PCI address; in mode qemu {dest.host} "
                       "would start with this host's address (only a hostdev network lets it "
                       "choose its own)")  # fmt: skip
    if not (src_caps and src_caps.virtio_net_failover):
        missing.append(f"{ctx.host} does not report virtio-net failover")
    if not (dst_caps and dst_caps.virtio_net_failover):
        missing.append(f"{dest.host} does not report virtio-net failover")
    if req.mode == "qemu":
        if missing:
            raise Unsupported("mode qemu is not possible: " + "; ".join(missing), reasons=missing)
        return "qemu", "asked for"
    if req.mode == "sequenced":
        return "sequenced", "asked for"
    if not missing:
        return "qemu", "auto: every condition of mode qemu holds"
    return "sequenced", "auto: mode qemu is not possible: " + "; ".join(missing)
