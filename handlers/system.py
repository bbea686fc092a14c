"""`ping` (is this host's agent there, and who is it) and `capabilities` (what this host can
do, including virtio-net failover)."""

from __future__ import annotations

import time

import msgspec

from agent.capabilities import Capabilities
from agent.context import Context, Verb
from agent.fields import RequestId


class PingRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: RequestId | None = None


class Pong(msgspec.Struct, frozen=True):
    host: str
    boot_id: str
    version: str
    uptime_s: float
    libvirt_connected: bool


async def ping(ctx: Context, _: PingRequest) -> Pong:
    return Pong(
        host=ctx.host,
        boot_id=ctx.boot_id,
        version=ctx.version,
        uptime_s=round(time.monotonic() - ctx.started_at, 3),
        libvirt_connected=ctx.hypervisor.connected,
    )


class CapabilitiesRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Probe again instead of answering from this connection's cached probe.
    refresh: bool = False
    request_id: RequestId | None = None


async def capabilities(ctx: Context, req: CapabilitiesRequest) -> Capabilities:
    ctx.hypervisor.connection()
    if ctx.capabilities is None or req.refresh:
        return await ctx.probe_capabilities()
    return ctx.capabilities


VERBS = [Verb("ping", PingRequest, ping), Verb("capabilities", CapabilitiesRequest, capabilities)]
