"""This host's primary NICs for domains migrated in with failover: one allocator per host.

Kinds, from [failover] in the configuration:
- `recorded` (no pool configured): plug what the source recorded at unplug - right for
  emulated NICs and for `type='network'` interfaces on a hostdev network (this host's libvirt
  picks a free VF from its own network of the same name). A recorded device that names a PCI
  address is the source host's VF: it is never plugged here;
- `template:<name>`: a device template; the domain's MAC and alias are put into it. A template
  that names a VF by address is that one VF;
- `network:<name>`: an `<interface type='network'>` on a libvirt hostdev network, as long as
  the network has a VF nobody holds or reserved;
- `pci:<address>`: one VF by PCI address (`<interface type='hostdev'>`).

A VF is in exactly one state: free -> reserved (a lease) -> plugging (no expiry: libvirt is
preparing it for a domain) -> in use (a domain's live or persistent definition holds it), or
quarantined (its plug failed; `pool.unquarantine` clears it). What the domains hold is
scanned, and the VF chosen, under one lock, and a plug's reservation is consumed under the
same lock once the device is in the domain's live definition: a VF cannot be handed out twice
by a scan that missed a plug in between. Held too, and never handed out: a VF that a domain
uses as a macvtap passthrough (`type='direct' mode='passthrough'`, by its netdev), a VF of a
libvirt hostdev network (the network's own allocation), and a VF whose IOMMU group has a
member held by a domain (VFIO gives a group to one VM).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import libvirt
import structlog

from agent.devices import pci_sources, template_xml
from agent.errors import AgentError, Conflict, Forbidden, InvalidRequest, NotFound, Unavailable
from agent.hypervisor import Hypervisor
from agent.journal import Journal, Reservation
from agent.metrics import Metrics
from agent.nicxml import names_vf, network_of, parse, pci_address
from agent.settings import DeviceSettings, FailoverSettings

log = structlog.get_logger("agent.pool")

# Elements of a recorded primary that name a resource of the source host (its VF or network
# port, its tap, its guest PCI slot): never carried to another host.
HOST_SPECIFIC = frozenset({"source", "target", "address", "actual", "script", "downscript",
                           "backenddomain", "backend"})  # fmt: skip
# Who the device is to the guest and to libvirt: always the recorded one's.
IDENTITY = ("mac", "alias", "teaming")
# libvirt refuses <mtu> on an <interface type='hostdev'> (qemu_validate.c).
NOT_ON_HOSTDEV = frozenset({"mtu"})
SYSFS = Path(os.environ.get("VIRT_AGENT_SYSFS", "/sys"))
RELEASED_KEPT = 4096  # operations whose reservation was released, remembered for late reserves
STATES = ("free", "reserved", "plugging", "in_use", "quarantined")


class InUse:
    """What this host's domains and networks hold, from one scan."""

    def __init__(self) -> None:
        self.pci: dict[str, str] = {}  # address -> the domain (uuid) holding it
        self.network_vfs: set[str] = set()  # VFs of libvirt hostdev networks
        # hostdev network name -> (VFs, connections), for `network:` capacity
        self.networks: dict[str, tuple[int, int]] = {}


def check_lease(s: FailoverSettings, lease_s: float) -> None:
    """A lease a caller asks for here (a reservation, an admission) is at most
    `failover.max_lease_s`."""
    if lease_s > s.max_lease_s:
        raise InvalidRequest(
            f"lease_s {lease_s:g} exceeds failover.max_lease_s ({s.max_lease_s:g})",
            lease_s=lease_s, max_lease_s=s.max_lease_s,
        )  # fmt: skip


class Pool:
    def __init__(
        self,
        settings: FailoverSettings,
        devices: DeviceSettings,
        journal: Journal,
        hv: Hypervisor | None = None,
        metrics: Metrics | None = None,
        sysfs: Path | None = None,
    ) -> None:
        self.settings = settings
        self.devices = devices
        self.journal = journal
        self.hv = hv
        self.sysfs = sysfs or SYSFS
        self._lock = asyncio.Lock()
        # A VF a template names by address: the pool is that one VF.
        template_vf = (
            names_vf(template_xml(devices, settings.pool_template))
            if settings.pool_template else None
        )  # fmt: skip
        self.vfs: list[str] = list(settings.pool_pci) or ([template_vf] if template_vf else [])
        # Operations whose reservation was released, oldest first (an ordered set).
        self._released: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._last_in_use: dict[str, str] = {}
        # A plug that a crash interrupted: its reservation is held again, with a new lease
        # (the domain's record decides whether the VF ends in it).
        journal.requeue_plugging(time.time() + settings.lease_s)
        if metrics is not None:
            for state in STATES:
                metrics.track(metrics.vfs.labels(state), functools.partial(self.count, state))

    # ------------------------------------------------------------ what the registry says

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
        s = self.settings
        out: dict[str, object] = {"kind": self.kind}
        if s.pool_template:
            out["template"] = s.pool_template
        if s.pool_network:
            out["network"] = s.pool_network
        if self.vfs:
            out["size"] = len(self.vfs)
        return out

    # ------------------------------------------------------------ state

    def active(self) -> list[Reservation]:
        return self.journal.reservations(time.time())

    def get(self, reservation_id: str) -> Reservation | None:
        return next((r for r in self.active() if r.id == reservation_id), None)

    def for_operation(self, operation: str) -> Reservation | None:
        return next((r for r in self.active() if r.operation == operation), None)

    def quarantined(self) -> dict[str, str]:
        return self.journal.quarantined()

    def states(self) -> dict[str, str]:
        """Each VF of the pool and its state (in use as of the last scan)."""
        held = {r.vf: r.state for r in self.active() if r.vf}
        bad = self.quarantined()
        out = {}
        for vf in self.vfs:
            if vf in bad:
                out[vf] = "quarantined"
            elif vf in held:
                out[vf] = held[vf]
            elif vf in self._last_in_use:
                out[vf] = "in_use"
            else:
                out[vf] = "free"
        return out

    def count(self, state: str) -> int:
        return sum(st == state for st in self.states().values())

    @staticmethod
    def check_caller(r: Reservation, caller: str) -> None:
        """Only the host a reservation was made for may use or release it (a reservation of a
        v1 caller names none, and any caller may)."""
        if r.caller and caller != r.caller:
            raise Forbidden(
                f"reservation {r.id} belongs to host {r.caller!r}, not {caller or 'a v1 caller'!r}",
                reservation_id=r.id,
            )

    # ------------------------------------------------------------ the scan

    def _conn(self) -> tuple[Hypervisor, Any]:
        hv = self.hv
        if hv is None or hv.conn is None or not hv.connected:
            raise Unavailable("libvirt is not connected; no primary can be reserved yet")
        return hv, hv.conn

    async def scan(self, domains: bool = True) -> InUse:
        """What every domain (live and persistent definitions; unless `domains` is false) and
        network holds."""
        hv, conn = self._conn()
        sysfs = self.sysfs

        def look() -> InUse:
            out = InUse()
            for d in conn.listAllDomains(0) if domains else []:
                with contextlib.suppress(libvirt.libvirtError):  # gone meanwhile
                    xmls = []
                    if d.isActive():
                        xmls.append(d.XMLDesc(0))
                    if d.isPersistent():
                        xmls.append(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                    for xml in xmls:
                        for a in pci_sources(xml) | passthrough_vfs(xml, sysfs):
                            out.pci.setdefault(a, d.UUIDString())
            with contextlib.suppress(libvirt.libvirtError):  # a driver without networks
                for n in conn.listAllNetworks(0):
                    with contextlib.suppress(libvirt.libvirtError):
                        hostdev_network(n.name(), n.XMLDesc(0), out, sysfs)
            return out

        found = await hv.call(look)
        if domains:
            self._last_in_use = found.pci
        return found

    def _neighbours(self, vf: str) -> set[str]:
        group = self.sysfs / "bus" / "pci" / "devices" / vf / "iommu_group" / "devices"
        try:
            return {p.name for p in group.iterdir()} - {vf}
        except OSError:
            return set()

    def _free_vfs(self, held: set[str], found: InUse) -> list[str]:
        bad = self.quarantined()
        taken = held | found.pci.keys()
        return [
            vf for vf in self.vfs
            if vf not in taken and vf not in bad and vf not in found.network_vfs
            and not (self._neighbours(vf) & (taken | found.network_vfs))
        ]  # fmt: skip

    # ------------------------------------------------------------ reserve, release, plug

    async def reserve(
        self,
        operation: str,
        domain: str,
        lease_s: float = 0.0,
        caller: str = "",
        device: str | None = None,
    ) -> Reservation:
        """Hold a primary for `domain` on behalf of `caller`; the same operation asking again
        gets the same one. The lease is `failover.lease_s`, or longer when the caller says its
        migration may take longer, up to `failover.max_lease_s`; one caller holds at most
        `failover.max_reservations_per_caller`. `device`: the primary the source recorded
        (its hostdev network, for the capacity of the recorded kind)."""
        s = self.settings
        check_lease(s, lease_s)
        if operation in self._released:
            raise Conflict(f"the reservation of operation {operation} was already released",
                           operation_id=operation)  # fmt: skip
        async with self._lock:
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
            self._conn()  # a destination without libvirt takes no migration: `unavailable`
            network = self._network_taken(device)
            # Only what the decision needs is read: every domain for a VF, networks for a port.
            found = await self.scan(domains=bool(self.vfs)) if self.vfs or network else InUse()
            if network:
                self._check_network(network, found, active)
            vf = ""
            if self.vfs:
                free = self._free_vfs({r.vf for r in active if r.vf}, found)
                if not free:
                    raise Unavailable(
                        f"no free VF: {len(self.vfs)} in the pool, all reserved, in use or "
                        f"quarantined ({len(self.quarantined())})",
                        pool_size=len(self.vfs), reason="no_free_primary",
                    )  # fmt: skip
                vf = free[0]
            if s.pool_pci:
                resource = f"pci:{vf}"
            elif s.pool_template:
                resource = f"template:{s.pool_template}"
            elif s.pool_network:
                resource = f"network:{s.pool_network}"
            else:
                resource = "recorded"
            r = Reservation(
                id=uuid.uuid4().hex, operation=operation, domain=domain, resource=resource,
                expires=time.time() + max(s.lease_s, lease_s), caller=caller, vf=vf,
                network=network,
            )  # fmt: skip
            self.journal.add_reservation(r)
            return r

    def _network_taken(self, device: str | None) -> str:
        """The libvirt network a reservation here takes a port of: the pool's, or for the
        recorded kind the network the recorded primary names; "" for a VF or a template."""
        if self.kind == "network":
            return self.settings.pool_network
        if self.kind == "recorded" and device:
            return network_of(device) or ""
        return ""

    def _check_network(self, name: str, found: InUse, active: list[Reservation]) -> None:
        """A hostdev network has a VF for one more reservation (others are not counted)."""
        if name not in found.networks:
            return  # not a hostdev network here (a bridge, say): libvirt gives ports freely
        size, used = found.networks[name]
        held = sum(r.network == name for r in active)
        if used + held >= size:
            raise Unavailable(
                f"no free VF in network {name!r}: {size} in all, {used} in use, {held} reserved",
                network=name, reason="no_free_primary",
            )  # fmt: skip

    async def release(self, reservation_id: str) -> bool:
        async with self._lock:
            r = self.get(reservation_id)
            if r is not None:
                self._remember_released(r.operation)
            return self.journal.drop_reservation(reservation_id)

    async def release_operation(self, operation: str) -> bool:
        """Give back an operation's reservation - also one whose reserve is still running
        (it waits for the lock) or has not arrived yet (it is refused when it does)."""
        async with self._lock:
            self._remember_released(operation)
            r = self.for_operation(operation)
            return r is not None and self.journal.drop_reservation(r.id)

    def _remember_released(self, operation: str) -> None:
        self._released[operation] = None
        while len(self._released) > RELEASED_KEPT:
            self._released.popitem(last=False)

    async def take(self, operation: str, domain: str, device: str) -> Reservation:
        """The reservation a plug of `operation`'s primary uses here: the one the source made,
        or a new one (the reconcile loop plugging an owed primary nobody reserved)."""
        r = self.for_operation(operation)
        if r is not None:
            return r
        if self.kind == "recorded":
            self.definition("recorded", device)  # refused here if it names the source's VF
        self._released.pop(operation, None)  # a rollback gave it back; the domain came anyway
        return await self.reserve(operation, domain, device=device)

    @contextlib.asynccontextmanager
    async def plugging(self, r: Reservation) -> AsyncIterator[None]:
        """Around the attach of a reservation's device: no expiry meanwhile; consumed once the
        device is attached; a VF whose plug failed is quarantined."""
        async with self._lock:
            if not self.journal.set_reservation_state(r.id, "plugging"):
                raise Conflict(f"reservation {r.id} is gone (expired or released)",
                               reservation_id=r.id)  # fmt: skip
        try:
            yield
        except BaseException as exc:
            async with self._lock:
                if r.vf and _vf_fault(exc):
                    why = getattr(exc, "message", None) or repr(exc)
                    self.journal.quarantine(r.vf, why)
                    self.journal.drop_reservation(r.id)
                    log.error("VF quarantined: its plug failed",  # noqa: TRY400 - no traceback vf=r.vf, error=why,
                              domain=r.domain, operation_id=r.operation)  # fmt: skip
                else:
                    self.journal.set_reservation_state(
                        r.id, "reserved", time.time() + self.settings.lease_s
                    )
            raise
        async with self._lock:
            self.journal.drop_reservation(r.id)
            if r.vf:
                self._last_in_use[r.vf] = r.domain

    def unquarantine(self, vf: str) -> bool:
        return self.journal.unquarantine(vf)

    # ------------------------------------------------------------ the device to plug

    def definition(self, resource: str, recorded: str, mac: str = "", carry: str = "") -> str:
        """The device to plug here for a reservation: this host's resource with the recorded
        primary's MAC, alias and teaming; for a VF or a network port also everything else it
        had (VLAN, port profile, driver, ROM, link state...) - only what names a resource of
        the source host is left behind. A template keeps its own definition otherwise.
        `mac`: the standby's MAC, for a recorded plain <hostdev> (which has none). `carry`:
        what the source's live definition had from its hostdev network (`<carry>` with
        `managed`, `<vlan>`, `<virtualport>`), kept when the port becomes another kind."""
        rec = parse(recorded)
        kind, _, name = resource.partition(":")
        if kind == "recorded":
            if names_vf(recorded):
                raise Forbidden(
                    "the recorded primary names a VF of the source host by its PCI address; "
                    "it is plugged only there, and this host has no pool to give another",
                    reason="no_pool_for_vf",
                )  # fmt: skip
            return recorded
        extra = parse(carry) if carry else None
        dev = self._resource_element(kind, name, rec, extra)
        template = kind == "template"
        have = {el.tag for el in dev}
        for el in rec:
            if el.tag in IDENTITY or not (template or el.tag in HOST_SPECIFIC or el.tag in
                                          have):  # fmt: skip
                dev.append(el)
        if not template and extra is not None:
            dev.extend(el for el in extra if dev.find(el.tag) is None)
        if dev.find("mac") is None and mac:
            dev.insert(0, ET.Element("mac", address=mac))
        if dev.get("type") == "hostdev":
            for el in [e for e in dev if e.tag in NOT_ON_HOSTDEV]:
                dev.remove(el)
        return ET.tostring(dev, encoding="unicode")

    def _resource_element(
        self, kind: str, name: str, rec: ET.Element, extra: ET.Element | None
    ) -> ET.Element:
        """This host's resource as a device element, before the recorded primary's parts."""
        if kind == "template":
            dev = parse(template_xml(self.devices, name))
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
            # An interface, so that libvirt sets the VF's MAC (a plain <hostdev> has none and
            # the guest would never pair it with its standby). libvirt's default is
            # unmanaged; the recorded attribute (or the source network's) is kept.
            managed = rec.get("managed") or (extra.get("managed") if extra is not None else None)
            dev = ET.Element("interface", type="hostdev")
            if managed:
                dev.set("managed", managed)
            ET.SubElement(ET.SubElement(dev, "source"), "address", {"type": "pci", **pci})
        else:
            raise ValueError(f"unknown pool resource {kind}:{name}")
        return dev


def _vf_fault(exc: BaseException) -> bool:
    """Whether a failed plug says something about the VF (not: the domain vanished, libvirt
    went away, the agent is stopping)."""
    if isinstance(exc, (asyncio.CancelledError, Unavailable)):
        return False
    if isinstance(exc, NotFound):
        return bool(exc.details.get("libvirt_code") != libvirt.VIR_ERR_NO_DOMAIN)
    return isinstance(exc, AgentError)


def passthrough_vfs(domain_xml: str, sysfs: Path) -> set[str]:
    """PCI addresses of the netdevs a domain uses as macvtap passthrough (`type='direct'
    mode='passthrough'`), found through sysfs."""
    out = set()
    for src in parse(domain_xml).iterfind("devices/interface[@type='direct']/source"):
        if src.get("mode") == "passthrough" and src.get("dev"):
            with contextlib.suppress(OSError):
                out.add(
                    (sysfs / "class" / "net" / str(src.get("dev")) / "device")
                    .resolve(strict=True)
                    .name
                )
    return out


def hostdev_network(name: str, xml: str, out: InUse, sysfs: Path) -> None:
    """A libvirt network with `<forward mode='hostdev'>`: its VFs and how many it gave out."""
    fwd = parse(xml).find("forward")
    if fwd is None or fwd.get("mode") != "hostdev":
        return
    vfs = {pci_address(a) for a in fwd.iterfind("address[@type='pci']")}
    for itf in fwd.iterfind("interface"):
        with contextlib.suppress(OSError):
            vfs.add(
                (sysfs / "class" / "net" / str(itf.get("dev")) / "device").resolve(strict=True).name
            )
    out.network_vfs |= vfs
    out.networks[name] = (len(vfs), int(fwd.get("connections", "0")))
