"""What the lab's guests say on their serial console, and the lab's primary NIC template."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lab.lab import (
    bond_members,
    guest_mac,
    primary_interface_xml,
    probes,
)
from tests.support.bus import Collector

PRIMARY = "ua-primary0"


FINAL = ("succeeded", "failed", "rolled_back", "cancelled")


async def final_of(ops: Collector, timeout: float = 180) -> dict[str, Any]:
    ev = await ops.wait_for(lambda e: e["data"]["operation"]["state"] in FINAL, timeout)
    op: dict[str, Any] = ev["data"]["operation"]
    return op


def serial_text(serial: Path, offset: int) -> str:
    return serial.read_bytes()[offset:].decode(errors="replace")


async def bond_now(serial: Path, want: int, timeout: float = 30) -> list[str]:
    """Wait until the guest's latest bond report has `want` members."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        reports = bond_members(await asyncio.to_thread(serial_text, serial, 0))
        if reports and len(reports[-1]) == want:
            return reports[-1]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"bond never had {want} members; reports {reports}")
        await asyncio.sleep(0.2)


async def pings_flow(serial: Path, offset: int, run: int = 20, timeout: float = 30) -> None:
    """The guest's last `run` probes all answered (the bond carries traffic)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = probes(await asyncio.to_thread(serial_text, serial, offset))
        if len(got) >= run and all(p.ok for p in got[-run:]):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"pings do not flow: last {got[-run:]}")
        await asyncio.sleep(0.5)


def template(tmp_path: Path) -> Path:
    """B's pool: the e1000e with its option ROM off (the recorded primary has it on), so the
    two can be told apart (a PCIe NIC: the guest's root ports take no conventional PCI one)."""
    tpl = tmp_path / "vf.xml"
    tpl.write_text(primary_interface_xml(guest_mac(0), rom=False))
    return tpl


def where(host: Any, uuid: str, alias: str = "ua-primary0") -> dict[str, Any]:
    """What one lab host's libvirt says about a domain: running, and if so whether the device
    `alias` is attached and whether a failover record is in its metadata."""
    import libvirt  # noqa: PLC0415

    from agent.failover import NS  # noqa: PLC0415

    conn = host.connect()
    try:
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return {"running": False}
        if not dom.isActive():
            return {"running": False}
        xml = dom.XMLDesc(0)
        try:
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            record = True
        except libvirt.libvirtError:
            record = False
        return {"running": True, "primary": f"<alias name='{alias}'/>" in xml, "record": record}
    finally:
        conn.close()
