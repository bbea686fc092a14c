"""Agent-to-agent requests: this agent calling a verb on another host's agent over NATS
request/reply (the `failover.*` verbs). The subject ends with this host's id (contract v1.1:
`virt.<dest>.cmd.failover.reserve.<caller>`), which the server's permissions let only this
host use, so the destination knows who calls. A reply's error comes back as the same
AgentError family, so callers handle a peer's `not_found` like their own; a destination that
does not know the v1.1 form (a previous release) answers `not_found` before anything was
unplugged, so a mixed pair fails safe."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta
from nats.aio.client import Client as NATS

from agent.bus import request
from agent.envelope import Subjects
from agent.errors import AgentError, NotFound, from_reply
from agent.fields import (
    MAX_LEASE_S,
    Alias,
    DeviceXml,
    DomainName,
    DomainUUID,
    HostId,
    Mac,
    OpId,
    RequestId,
)

# ---------------------------------------------------------------- the agent-to-agent verbs


class ReserveRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """failover.reserve: hold a primary NIC here for a domain the caller migrates here."""

    operation_id: OpId
    domain: DomainUUID
    alias: Alias
    source: HostId
    # How long the source may still need it (its migration timeout and replug window); the
    # lease is at least this.
    lease_s: Annotated[float, Meta(ge=0, le=MAX_LEASE_S)] = 0.0
    request_id: RequestId | None = None
    # The primary as the source recorded it, the MAC it must carry (a plain <hostdev> has
    # none: the standby's) and what its hostdev network gave it (agent/failover.py Record):
    # with them the reply says what this host will plug, for the definition the domain
    # arrives with.
    device: DeviceXml | None = None
    mac: Mac | None = None
    carry: DeviceXml | None = None


class ReserveReply(msgspec.Struct, frozen=True):
    reservation_id: str
    resource: str
    pool: str
    expires_in_s: float
    # The device this host will plug (when the request gave the recorded one).
    definition: str | None = None


class PrimaryAsk(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The primary an admission reserves: what failover.reserve takes (the caller is the
    source)."""

    alias: Alias
    device: DeviceXml | None = None
    mac: Mac | None = None
    carry: DeviceXml | None = None


class AdmitRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """failover.admit (contract v1.2): admit one incoming migration - an inbound slot, the
    domain's memory and, with `primary`, the VF reservation, under one lease."""

    operation_id: OpId
    domain: DomainUUID
    name: DomainName
    memory_kib: Annotated[int, Meta(ge=1, le=1 << 42)]
    vcpus: Annotated[int, Meta(ge=1, le=16384)]
    primary: PrimaryAsk | None = None
    lease_s: Annotated[float, Meta(ge=0, le=MAX_LEASE_S)] = 0.0
    request_id: RequestId | None = None


class AdmitReply(msgspec.Struct, frozen=True):
    admission_id: str
    expires_in_s: float
    reservation_id: str | None = None
    # With a primary: what failover.reserve answers (resource, pool, the device to plug).
    resource: str | None = None
    pool: str | None = None
    definition: str | None = None


class ReleaseRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """failover.release: give a reservation or an admission back - by its id, or by the
    operation it was made for (when the source never got the reply)."""

    reservation_id: OpId | None = None
    operation_id: OpId | None = None
    request_id: RequestId | None = None
    admission_id: OpId | None = None


class ReleaseReply(msgspec.Struct, frozen=True):
    released: bool


class ReplugRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """failover.replug: plug the primary owed to a domain that arrived here."""

    domain: DomainUUID
    alias: Alias
    operation_id: OpId | None = None
    request_id: RequestId | None = None


class ReplugReply(msgspec.Struct, frozen=True):
    settled: str
    why: str
    attached: bool
    plugged_at_ns: int | None = None


R = TypeVar("R")
# The verb each request is sent as (and served under: handlers/failover/__init__.py).
VERBS: dict[type[Any], str] = {
    ReserveRequest: "failover.reserve",
    ReleaseRequest: "failover.release",
    ReplugRequest: "failover.replug",
    AdmitRequest: "failover.admit",
}


class Peers:
    def __init__(self, nc: NATS, prefix: str, me: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.me = me

    async def reserve(self, host: str, req: ReserveRequest, timeout: float) -> ReserveReply:
        return await self._call(host, req, ReserveReply, timeout)

    async def admit(self, host: str, req: AdmitRequest, timeout: float) -> AdmitReply:
        return await self._call(host, req, AdmitReply, timeout)

    async def release(self, host: str, req: ReleaseRequest, timeout: float) -> ReleaseReply:
        return await self._call(host, req, ReleaseReply, timeout)

    async def replug(self, host: str, req: ReplugRequest, timeout: float) -> ReplugReply:
        return await self._call(host, req, ReplugReply, timeout)

    async def _call(self, host: str, req: Any, reply: type[R], timeout: float) -> R:
        verb = VERBS[type(req)]
        subject = Subjects(self.prefix, host).cmd(f"{verb}.{self.me}")
        msg = await request(self.nc, host, subject, msgspec.json.encode(req), timeout)
        try:
            result = from_reply(msg.data, host)
        except NotFound as exc:
            if exc.details.get("verb") != f"{verb}.{self.me}":
                raise
            raise NotFound(
                f"{host} does not know contract v1.1's agent-to-agent subjects (a previous "
                f"release?): upgrade it before migrating to it", **exc.details,
            ) from None  # fmt: skip
        try:
            return msgspec.convert(result, reply)
        except msgspec.ValidationError as exc:
            raise AgentError(f"{host}: a {verb} reply this agent cannot read: {exc}",
                             peer=host) from None  # fmt: skip
