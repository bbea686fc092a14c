"""NIC definitions as libvirt reads them: PCI addresses, the VF or network a device names, and
what a failover pool template may be. No libvirt connection, no settings: used by the
settings' checks, the device plumbing and the pool alike."""

from __future__ import annotations

import xml.etree.ElementTree as ET


def pci_address(a: ET.Element) -> str:
    """`0000:3b:02.1` from libvirt's `<address domain= bus= slot= function=/>` (hex or decimal,
    as libvirt accepts them)."""
    parts = [_c_int(a.get(k, "0")) for k in ("domain", "bus", "slot", "function")]
    return "{:04x}:{:02x}:{:02x}.{:x}".format(*parts)


def _c_int(v: str) -> int:
    """A number as libvirt reads one (strtoul, base 0): 0x hex, a leading 0 octal, else decimal."""
    v = v.strip().lower()
    if v.startswith("0x"):
        return int(v, 16)
    if len(v) > 1 and v.startswith("0"):
        return int(v, 8)
    return int(v)


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - libvirt's, the operator's or the agent's own XML


def names_vf(device: str) -> str | None:
    """The host PCI address a device definition names (a VF by address), if any."""
    el = parse(device)
    if el.tag == "hostdev" and el.get("type") == "pci":
        a = el.find("source/address")
    elif el.tag == "interface" and el.get("type") == "hostdev":
        a = el.find("source/address[@type='pci']")
    else:
        return None
    return pci_address(a) if a is not None else None


def network_of(device: str) -> str | None:
    el = parse(device)
    if el.tag == "interface" and el.get("type") == "network":
        src = el.find("source")
        return src.get("network") if src is not None else None
    return None


def check_template(xml: str) -> str:
    """Why a failover pool template cannot work, or "" (checked when settings load)."""
    el = parse(xml)
    if el.tag == "hostdev":
        return ("a plain <hostdev> cannot carry the standby's MAC (libvirt sets a VF's MAC only "
                "for an <interface type='hostdev'>); use <interface type='hostdev'>")  # fmt: skip
    if el.tag != "interface":
        return f"a failover primary is an <interface>, not <{el.tag}>"
    teaming = el.find("teaming")
    if teaming is not None and teaming.get("type") == "transient" and el.get("type") != "hostdev":
        return ("<teaming type='transient'> is accepted by libvirt's qemu driver only on an "
                "<interface type='hostdev'>")  # fmt: skip
    return ""
