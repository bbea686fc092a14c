"""Waiting for operations, and the failover pair the plan tests use."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.client import Client as NATS

from tests import nic_forms
from tests.support.bus import call


def running_pair(conn: Any, name: str) -> Any:
    """A running test-driver domain with the lab's stand-in pair: a virtio standby and an
    e1000e primary of the same MAC."""
    dom = conn.defineXML(nic_forms.domain_xml(nic_forms.E1000E_PRIMARY, name=name, kind="test"))
    dom.create()
    return dom


async def ended(nc: NATS, host: str, op_id: str, timeout: float = 30) -> dict[str, Any]:
    """The operation once it is no longer running (operation.get)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = (await call(nc, host, "operation.get", {"operation_id": op_id}))["result"]
        if got["state"] != "running":
            return dict(got)
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.1)
