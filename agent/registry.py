"""This host's registration in the JetStream key-value bucket `virt_hosts`: one key per host,
refreshed by the heartbeat, expiring when the agent is gone, deleted on an orderly stop. A
`destination` host id in a command is resolved here."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from agent.capabilities import Capabilities
from agent.errors import NotFound
from agent.kv import bucket_stream, keys, open_kv, put_prefix
from agent.settings import LibvirtSettings

log = structlog.get_logger("agent.registry")

BUCKET = "virt_hosts"
STREAM = f"KV_{BUCKET}"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a write over another revision


class Maintenance(msgspec.Struct, frozen=True, kw_only=True):
    """A host being emptied (`draining`) or emptied (`drained`) by `host.drain` (contract
    v1.2): it admits no incoming migration, and starts no domain unless forced, until
    `host.undrain`."""

    state: str
    operation_id: str
    since: str  # RFC 3339


class Capacity(msgspec.Struct, frozen=True, kw_only=True):
    """What a drain's planner reads of a destination (agent/placement.py): the memory it would
    admit now, its architecture, its inbound limit."""

    memory_kib: int
    arch: str
    inbound_limit: int
    cpu: str = ""  # `vendor/model` of the host CPU (agent/hypervisor.py host_cpu)


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    boot_id: str
    version: str
    libvirt_uri: str
    # Where other hosts' libvirt migrates to; empty: peer-to-peer through libvirt_uri.
    migration_uri: str
    capabilities: Capabilities | None
    updated: float
    # Where this host finds primary NICs for migrated-in domains (agent/pool.py).
    failover_pool: dict[str, Any] | None = None
    # Leaf-node mode: the JetStream domain of this host's own streams, which the hub's
    # streams source from (virt-agent hub-sync). None: the host publishes to the hub's.
    jetstream_domain: str | None = None
    # Contract v1.2: this host admits incoming migrations (failover.admit).
    admission: bool = False
    maintenance: Maintenance | None = None
    capacity: Capacity | None = None


_decoder = msgspec.json.Decoder(Registration)


@dataclass(frozen=True)
class UriPolicy:
    """Which libvirt and migration URIs of another host's registration this agent will open:
    a registration is data from another host, and some libvirt URIs run programs
    (`qemu+ext://...?command=`, `qemu+ssh://...?command=`)."""

    transports: frozenset[str]
    params: frozenset[str]
    migration_schemes: frozenset[str]

    @classmethod
    def of(cls, s: LibvirtSettings) -> UriPolicy:
        return cls(frozenset(s.peer_uri_transports), frozenset(s.peer_uri_params),
                   frozenset(s.peer_migration_schemes))  # fmt: skip

    def refuses(self, reg: Registration) -> str:
        """Why `reg`'s URIs are not accepted; empty when they are."""
        uri = urlsplit(reg.libvirt_uri)
        _, _, transport = uri.scheme.partition("+")
        if not uri.scheme or any(c.isspace() for c in reg.libvirt_uri):
            return f"libvirt_uri {reg.libvirt_uri!r} is not a libvirt URI"
        if transport not in self.transports:
            return f"libvirt_uri transport {transport!r} is not in libvirt.peer_uri_transports"
        for name, _ in parse_qsl(uri.query, keep_blank_values=True):
            if name not in self.params:
                return f"libvirt_uri parameter {name!r} is not in libvirt.peer_uri_params"
        if reg.migration_uri:
            mig = urlsplit(reg.migration_uri)
            if mig.scheme not in self.migration_schemes or mig.query:
                return (f"migration_uri {reg.migration_uri!r}: scheme not in "
                        "libvirt.peer_migration_schemes, or parameters")  # fmt: skip
        return ""


def bucket_config(ttl_s: float, replicas: int) -> StreamConfig:
    """Entries expire `ttl_s` after their last write (agent/kv.py: nothing lets one host erase
    another's)."""
    return bucket_stream(BUCKET, "virt-agent host registrations (contract v1)", replicas,
                         max_age=ttl_s, duplicate_window=min(120.0, ttl_s))  # fmt: skip


async def open_bucket(nc: NATS, ttl_s: float, replicas: int, domain: str = "") -> KeyValue:
    """The bucket, made if missing, in JetStream `domain` (empty: the connected server's)."""
    return await open_kv(nc, bucket_config(ttl_s, replicas), BUCKET, domain)


class Registry:
    """Writes after the first one name the revision this agent wrote last: when another
    writer came between, a second live agent has this host id (a cloned machine, a
    copied configuration) - `twin` names it until this agent is alone again. An earlier
    process of this host that died does not write any more, so a restart is no twin."""

    def __init__(
        self, kv: KeyValue, js: JetStreamContext, domain: str = "", policy: UriPolicy | None = None
    ) -> None:
        self.kv = kv
        self.policy = policy
        self._js = js
        self._put_pre = put_prefix(BUCKET, domain)
        self._revision: int | None = None
        self.twin: Registration | None = None

    async def publish(self, reg: Registration) -> None:
        data = msgspec.json.encode(msgspec.structs.replace(reg, updated=time.time()))
        if self._revision is not None:
            try:
                self._revision = await self._write(reg.host, data, last=self._revision)
            except KeyWrongLastSequenceError:
                pass
            else:
                self._alone()
                return
            try:
                other = await self._read(reg.host, uris=False)
            except NotFound:
                other = None  # expired or withdrawn meanwhile: nobody else writes
            if other is not None and other.boot_id != reg.boot_id:
                if self.twin is None or self.twin.boot_id != other.boot_id:
                    log.error("another live agent uses this host id; give each host its own",
                              host=reg.host, other_boot_id=other.boot_id,
                              other_version=other.version)  # fmt: skip
                self.twin = other
            else:
                self._alone()
        self._revision = await self._write(reg.host, data)

    async def _write(
        self, key: str, data: bytes, last: int | None = None, headers: dict[str, str] | None = None
    ) -> int:
        """One KV write (a put; with `last`, only over that revision); its revision."""
        hdrs = dict(headers or {})
        if last is not None:
            hdrs["Nats-Expected-Last-Subject-Sequence"] = str(last)
        try:
            ack = await self._js.publish(self._put_pre + key, data, headers=hdrs or None)
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=exc.description) from None
            raise
        return int(ack.seq)

    def forget_revision(self) -> None:
        """The bucket was made again: the next write names no earlier revision."""
        self._revision = None

    def _alone(self) -> None:
        if self.twin is not None:
            log.info("no other agent uses this host id any more", other_boot_id=self.twin.boot_id)
            self.twin = None

    async def withdraw(self, host: str) -> None:
        with contextlib.suppress(KeyNotFoundError, NotFoundError):
            await self._write(host, b"", headers={"KV-Operation": "DEL"})

    async def resolve(self, host: str) -> Registration:
        """`host`'s registration, if it is one this agent accepts: well-formed, under its own
        key, with URIs this agent's settings allow (contract v1.2, "Contained hosts")."""
        return await self._read(host, uris=True)

    async def _read(self, host: str, uris: bool) -> Registration:
        try:
            entry = await self.kv.get(host)
        except (KeyNotFoundError, NotFoundError):
            raise NotFound(f"host {host!r} is not registered in {BUCKET}", host=host) from None
        if entry.value is None:
            raise NotFound(f"host {host!r} is not registered in {BUCKET}", host=host)
        try:
            reg = _decoder.decode(entry.value)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            reason = f"its entry is malformed ({str(exc)[:200]})"
        else:
            reason = "" if reg.host == host else f"its entry names another host ({reg.host[:64]!r})"
            if not reason and uris and self.policy is not None:
                reason = self.policy.refuses(reg)
            if not reason:
                return reg
        log.warning("registry entry not accepted", host=host, reason=reason)
        raise NotFound(f"host {host!r} is not registered in {BUCKET}: {reason}", host=host,
                       reason=reason)  # fmt: skip

    async def hosts(self) -> list[Registration]:
        """Every registered host."""
        out = []
        for host in await keys(self._js, BUCKET):
            try:
                out.append(await self.resolve(host))
            except NotFound:
                continue  # withdrawn (a delete marker) or expired between listing and reading
        return out
