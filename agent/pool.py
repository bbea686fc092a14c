"""This host's pool of primary NICs for domains migrated in with failover: reservations with a
lease (kept in the journal, so they survive a restart) and the definition plugged for one.

Kinds, from [failover] in the configuration:
- `recorded` (no pool configured): plug what the source recorded at unplug - right for
  emulated NICs and for `type='network'` interfaces on a hostdev network (this host's libvirt
  picks a free VF from its own network of the same name);
- `template:<name>`: a device template; the domain's MAC and alias are put into it;
- `network:<name>`: an `<interface type='network'>` on a libvirt hostdev network;
- `pci:<address>`: one VF by PCI address (`<interface type='hostdev' managed='yes'>`), each
  address held by at most one reservation and not in use by a running domain.
"""

from __future__ import annotations

import time
import uuid
import xml.etree.ElementTree as ET

from agent.devices import template_xml
from agent.errors import Conflict, Forbidden, InvalidRequest, Unavailable
from agent.operations import Journal, Reservation
from agent.settings import DeviceSettings, FailoverSettings

# Elements of a recorded primary that name a resource of the source host (its VF or network
# port, its tap, its guest PCI slot): never carried to another host.
HOST_SPECIFIC = frozenset({"source", "target", "address", "actual", "script", "downscript",
                           "backenddomain", "backend"})  # fmt: skip
# Who the device is to the guest and to libvirt: always the recorded one's.
IDENTITY = ("mac", "alias", "teaming")
HOSTDEV_ORDER = {"driver": 0, "source": 1, "teaming": 2}


class Pool:
    def __init__(
        self, settings: FailoverSettings, devices: DeviceSettings, journal: Journal
    ) -> None:
        self.settings = settings
        self.devices = devices
        self.journal = journal

    @property
    def kind(self) -> str:
        s = self.settings
        if s.pool_template:
            return "template"
        if s.pool_network:
            return "network"
        if s.pool_pci:
            return "pci"
        return "recorded"

    def describe(self) -> dict[str, object]:
        """What the registry advertises."""
        s = self.settings
        out: dict[str, object] = {"kind": self.kind}
        if s.pool_template:
            out["template"] = s.pool_template
        if s.pool_network:
            out["network"] = s.pool_network
        if s.pool_pci:
            out["size"] = len(s.pool_pci)
        return out

    def active(self) -> list[Reservation]:
        return self.journal.reservations(time.time())

    def reserve(
        self,
        operation: str,
        domain: str,
        pci_in_use: set[str],
        lease_s: float = 0.0,
        caller: str = "",
    ) -> Reservation:
        """Hold a primary for `domain` on behalf of `caller`; the same operation asking again
        gets the same one. The lease is `pool.lease_s`, or longer when the caller says its
        migration may take longer, up to `failover.max_lease_s`; one caller holds at most
        `failover.max_reservations_per_caller`."""
        s = self.settings
        if lease_s > s.max_lease_s:
            raise InvalidRequest(
                f"lease_s {lease_s:g} exceeds failover.max_lease_s ({s.max_lease_s:g})",
                lease_s=lease_s, max_lease_s=s.max_lease_s,
            )  # fmt: skip
        active = self.active()
        for r in active:
            if r.operation == operation:
                self.check_caller(r, caller)
                return r
        if caller and sum(r.caller == caller for r in active) >= s.max_reservations_per_caller:
            raise Conflict(
                f"host {caller!r} already holds {s.max_reservations_per_caller} reservations "
                "here (failover.max_reservations_per_caller)",
                caller=caller, limit=s.max_reservations_per_caller,
            )  # fmt: skip
        if s.pool_pci:
            held = {r.resource for r in active}
            free = [a for a in s.pool_pci if f"pci:{a}" not in held and a not in pci_in_use]
            if not free:
                raise Unavailable(
                    f"no free VF: {len(s.pool_pci)} in the pool, all reserved or in use",
                    pool_size=len(s.pool_pci),
                )
            resource = f"pci:{free[0]}"
        elif s.pool_template:
            resource = f"template:{s.pool_template}"
        elif s.pool_network:
            resource = f"network:{s.pool_network}"
        else:
            resource = "recorded"
        r = Reservation(
            id=uuid.uuid4().hex,
            operation=operation,
            domain=domain,
            resource=resource,
            expires=time.time() + max(s.lease_s, lease_s),
            caller=caller,
        )
        self.journal.add_reservation(r)
        return r

    @staticmethod
    def check_caller(r: Reservation, caller: str) -> None:
        """Only the host a reservation was made for may use or release it (a reservation of a
        v1 caller names none, and any caller may)."""
        if r.caller and caller != r.caller:
            raise Forbidden(
                f"reservation {r.id} belongs to host {r.caller!r}, not {caller or 'a v1 caller'!r}",
                reservation_id=r.id,
            )

    def get(self, reservation_id: str) -> Reservation | None:
        return next((r for r in self.active() if r.id == reservation_id), None)

    def for_operation(self, operation: str) -> Reservation | None:
        return next((r for r in self.active() if r.operation == operation), None)

    def release(self, reservation_id: str) -> bool:
        return self.journal.drop_reservation(reservation_id)

    def definition(self, resource: str, recorded: str) -> str:
        """The device to plug here for a reservation: this host's resource with the recorded
        primary's MAC, alias and teaming; for a VF or a network port also everything else it
        had (VLAN, port profile, driver, ROM, link state...) - only what names a resource of
        the source host is left behind. A template keeps its own definition otherwise."""
        rec = ET.fromstring(recorded)  # noqa: S314 - written by the agent itself
        kind, _, name = resource.partition(":")
        if kind == "recorded":
            return recorded
        if kind == "template":
            dev = ET.fromstring(template_xml(self.devices, name))  # noqa: S314 - operator's file
            for tag in IDENTITY:
                for old in dev.findall(tag):
                    dev.remove(old)
        elif kind == "network":
            dev = ET.Element("interface", type="network")
            ET.SubElement(dev, "source", network=name)
        elif kind == "pci":
            dom_, bus, rest = name.split(":")
            slot, fn = rest.split(".")
            pci = {"domain": f"0x{dom_}", "bus": f"0x{bus}", "slot": f"0x{slot}",
                   "function": f"0x{fn}"}  # fmt: skip
            if rec.tag == "hostdev":
                # A plain PCI hostdev stays one (its source address carries no type).
                dev = ET.Element("hostdev", mode="subsystem", type="pci", managed="yes")
                ET.SubElement(ET.SubElement(dev, "source"), "address", pci)
            else:
                dev = ET.Element("interface", type="hostdev", managed="yes")
                ET.SubElement(ET.SubElement(dev, "source"), "address", {"type": "pci", **pci})
        else:
            raise ValueError(f"unknown pool resource {resource!r}")
        # A template is the operator's whole definition but for who the device is; a VF or a
        # network port takes over the rest of the recorded primary too.
        template = kind == "template"
        have = {el.tag for el in dev}
        for el in rec:
            if el.tag in IDENTITY or not (template or el.tag in HOST_SPECIFIC or el.tag in
                                          have):  # fmt: skip
                dev.append(el)
        if dev.tag == "hostdev":
            # libvirt's order (its schema's PCI part, as libxml2 checks it, must stay together).
            dev[:] = sorted(dev, key=lambda el: HOSTDEV_ORDER.get(el.tag, len(HOSTDEV_ORDER)))
        return ET.tostring(dev, encoding="unicode")
