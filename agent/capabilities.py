"""What this host can do: libvirt and QEMU versions, a domain-capabilities summary, and
whether virtio-net failover works here - QEMU's `failover` property (probed from the emulator
libvirt names) together with libvirt's `<teaming>` support (libvirt >= 6.1)."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import msgspec

from agent.hypervisor import Hypervisor

TEAMING_MIN_LIBVIRT = 6_001_000


class DomainCaps(msgspec.Struct, frozen=True):
    emulator: str
    domain_type: str
    arch: str
    # The default machine type for this domain type and arch.
    machine: str


class Capabilities(msgspec.Struct, frozen=True):
    libvirt_version: str
    hypervisor: str
    domain_caps: DomainCaps | None
    qemu_failover: bool
    libvirt_teaming: bool
    # Both: the guest can bond a passthrough primary with a virtio standby.
    virtio_net_failover: bool
    event_types: list[str]
    # Why a probe gave no answer, if one did not.
    notes: list[str]


def _domcaps(conn: libvirt.virConnect) -> tuple[DomainCaps | None, list[str]]:
    notes: list[str] = []
    for virt_type in ("kvm", "qemu"):
        try:
            xml = conn.getDomainCapabilities(None, None, None, virt_type, 0)
        except libvirt.libvirtError as exc:
            notes.append(f"domain capabilities ({virt_type}): {str(exc).strip()}")
            continue
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own answer, not client input
        return (
            DomainCaps(
                emulator=root.findtext("path", ""),
                domain_type=root.findtext("domain", virt_type),
                arch=root.findtext("arch", ""),
                machine=root.findtext("machine", ""),
            ),
            notes,
        )
    return None, notes


_probe_cache: dict[tuple[str, float], bool] = {}


def qemu_has_failover(emulator: str) -> bool:
    """`<emulator> -device virtio-net-pci,help` lists `failover`; cached per binary and mtime."""
    try:
        key = (emulator, Path(emulator).stat().st_mtime)
    except OSError:
        return False
    if key not in _probe_cache:
        out = subprocess.run(
            [emulator, "-device", "virtio-net-pci,help"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        _probe_cache[key] = "failover=" in out.stdout or "failover " in out.stdout
    return _probe_cache[key]


async def probe(hv: Hypervisor) -> Capabilities:
    conn = hv.connection()
    lib, hyp = await hv.versions()

    def _probe() -> tuple[DomainCaps | None, bool, bool, list[str]]:
        caps, notes = _domcaps(conn)
        qemu = bool(caps and caps.emulator and qemu_has_failover(caps.emulator))
        if caps and caps.emulator and not qemu:
            notes.append(f"{caps.emulator} lists no virtio-net-pci failover property")
        teaming = conn.getLibVersion() >= TEAMING_MIN_LIBVIRT
        return caps, qemu, teaming, notes

    caps, qemu, teaming, notes = await hv.call(_probe)
    return Capabilities(
        libvirt_version=lib,
        hypervisor=hyp,
        domain_caps=caps,
        qemu_failover=qemu,
        libvirt_teaming=teaming,
        virtio_net_failover=qemu and teaming,
        event_types=[k.event_type for k in hv.registered],
        notes=notes,
    )
