"""Raw, scripted lab scenarios: the baselines the agent's own sequences are measured against.

`raw_failover_migration` is what an operator would script by hand: detach the primary and
wait for DEVICE_REMOVED, live-migrate, attach the primary on the destination and wait for
DEVICE_ADDED. `raw_migration` is a plain live migration.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import libvirt

from agent import libvirt_loop
from lab.lab import primary_interface_xml

MIGRATE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
)


class DeviceWaiter:
    """Futures for DEVICE_REMOVED / DEVICE_ADDED of one alias on one connection."""

    def __init__(self, conn: Any, event_id: int) -> None:
        self.conn = conn
        self._waiting: dict[tuple[str, str], asyncio.Future[float]] = {}
        self._cid = conn.domainEventRegisterAny(None, event_id, self._cb, None)

    def expect(self, domain: str, alias: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[(domain, alias)] = fut
        return fut

    def _cb(self, _conn: Any, dom: Any, alias: str, _opaque: Any) -> None:
        fut = self._waiting.pop((dom.name(), alias), None)
        if fut is not None and not fut.done():
            fut.set_result(time.monotonic())

    def close(self) -> None:
        self.conn.domainEventDeregisterAny(self._cid)


async def raw_migration(src_uri: str, dst_uri: str, name: str) -> dict[str, float]:
    libvirt_loop.ensure_registered(asyncio.get_running_loop())
    src, dst = libvirt.open(src_uri), libvirt.open(dst_uri)
    try:
        dom = src.lookupByName(name)
        t0 = time.monotonic()
        await asyncio.to_thread(dom.migrate, dst, MIGRATE_FLAGS, None, "tcp://127.0.0.1", 0)
        return {"migrate_s": time.monotonic() - t0}
    finally:
        src.close()
        dst.close()


async def raw_failover_migration(
    src_uri: str, dst_uri: str, name: str, mac: str, timeout: float = 30.0
) -> dict[str, float]:
    """Detach + wait, migrate, attach + wait; the time of each step and of the whole."""
    libvirt_loop.ensure_registered(asyncio.get_running_loop())
    src, dst = libvirt.open(src_uri), libvirt.open(dst_uri)
    removed = DeviceWaiter(src, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED)
    added = DeviceWaiter(dst, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED)
    try:
        dom = src.lookupByName(name)
        t0 = time.monotonic()
        gone = removed.expect(name, "ua-primary0")
        await asyncio.to_thread(
            dom.detachDeviceAlias, "ua-primary0", libvirt.VIR_DOMAIN_AFFECT_LIVE
        )
        await asyncio.wait_for(gone, timeout)
        t1 = time.monotonic()
        await asyncio.to_thread(dom.migrate, dst, MIGRATE_FLAGS, None, "tcp://127.0.0.1", 0)
        t2 = time.monotonic()
        ddom = dst.lookupByName(name)
        back = added.expect(name, "ua-primary0")
        await asyncio.to_thread(
            ddom.attachDeviceFlags,
            primary_interface_xml(mac),
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )
        await asyncio.wait_for(back, timeout)
        t3 = time.monotonic()
        return {"unplug_s": t1 - t0, "migrate_s": t2 - t1, "replug_s": t3 - t2, "total_s": t3 - t0}
    finally:
        removed.close()
        added.close()
        src.close()
        dst.close()
