"""This host's registration in the JetStream key-value bucket `virt_hosts`: one key per host,
refreshed by the heartbeat, expiring when the agent is gone, deleted on an orderly stop. A
`destination` host id in a command is resolved here."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from agent.capabilities import Capabilities
from agent.errors import NotFound

log = structlog.get_logger("agent.registry")

BUCKET = "virt_hosts"
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a write over another revision


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


_decoder = msgspec.json.Decoder(Registration)


async def open_bucket(nc: NATS, ttl_s: float, replicas: int, domain: str = "") -> KeyValue:
    """The bucket, made if missing, in JetStream `domain` (empty: the connected server's)."""
    js = nc.jetstream(domain=domain or None)
    cfg = KeyValueConfig(
        bucket=BUCKET,
        history=1,
        ttl=ttl_s,
        storage=StorageType.FILE,
        replicas=replicas,
        description="virt-agent host registrations (contract v1)",
    )
    try:
        return await js.create_key_value(cfg)
    except BadRequestError:
        # Exists (another host made it, perhaps with another TTL): use it as it is.
        return await js.key_value(BUCKET)


class Registry:
    """Writes after the first one name the revision this agent wrote last: when another
    writer came between, a second live agent has this host id (a cloned machine, a
    copied configuration) - `twin` names it until this agent is alone again. An earlier
    process of this host that died does not write any more, so a restart is no twin."""

    def __init__(self, kv: KeyValue, js: JetStreamContext, domain: str = "") -> None:
        self.kv = kv
        self._js = js
        # Writes go through the domain's API prefix when the bucket is in another JetStream
        # domain (a leaf node writing into the hub's; nats-py's KeyValue does not do it).
        self._put_pre = f"$JS.{domain}.API.$KV.{BUCKET}." if domain else f"$KV.{BUCKET}."
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
                other = await self.resolve(reg.host)
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

    def _alone(self) -> None:
        if self.twin is not None:
            log.info("no other agent uses this host id any more", other_boot_id=self.twin.boot_id)
            self.twin = None

    async def withdraw(self, host: str) -> None:
        with contextlib.suppress(KeyNotFoundError, NotFoundError):
            await self._write(host, b"", headers={"KV-Operation": "DEL"})

    async def resolve(self, host: str) -> Registration:
        try:
            entry = await self.kv.get(host)
        except (KeyNotFoundError, NotFoundError):
            raise NotFound(f"host {host!r} is not registered in {BUCKET}", host=host) from None
        if entry.value is None:
            raise NotFound(f"host {host!r} is not registered in {BUCKET}", host=host)
        return _decoder.decode(entry.value)

    async def hosts(self) -> list[Registration]:
        """Every registered host. The keys come from the bucket stream's subject counts, not
        nats-py's `KeyValue.keys()`: that decides "no keys" from a consumer-info reply that can
        overtake the consumer's first message, and leaves a consumer on the server for five
        minutes per listing."""
        try:
            info = await self._js.stream_info(f"KV_{BUCKET}", subjects_filter=f"$KV.{BUCKET}.>")
        except NotFoundError:
            return []
        out = []
        for subject in sorted(info.state.subjects or {}):
            try:
                out.append(await self.resolve(subject.removeprefix(f"$KV.{BUCKET}.")))
            except NotFound:
                continue  # withdrawn (a delete marker) or expired between listing and reading
        return out
