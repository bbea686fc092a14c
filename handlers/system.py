"""`ping`: is this host's agent there, and who is it."""

from __future__ import annotations

import time

import msgspec

from handlers import Context, Verb


class PingRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    request_id: str | None = None


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


VERBS = [Verb("ping", PingRequest, ping)]
