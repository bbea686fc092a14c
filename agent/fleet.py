"""What the agent builds once NATS is up, to act beside the other hosts: JetStream (the
streams, the virt_hosts bucket), this host's entry in the registry, the journal of long
operations, the other hosts' agents (peers), the owed-primary reconciler with its pool - and
from them the handlers' Context, whose parts are then all there."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.errors import BucketNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from agent import __version__
from agent.admission import Admissions
from agent.context import Context, HostContext
from agent.envelope import Heartbeat
from agent.errors import AgentError
from agent.failover import Reconciler
from agent.journal import Journal
from agent.operations import OperationManager, Publish
from agent.peers import Peers
from agent.pool import Pool
from agent.publisher import Publisher
from agent.registry import STREAM, Maintenance, Registration, Registry, UriPolicy, open_bucket
from agent.settings import Settings
from agent.streams import Streams

log = structlog.get_logger("agent.fleet")


@dataclass(frozen=True)
class JetStream:
    bucket: KeyValue
    # Leaf-node mode: the JetStream domain of the server this agent publishes to.
    domain: str


async def open_jetstream(nc: NATS, settings: Settings, streams: Streams) -> JetStream:
    """The streams and the virt_hosts bucket, made where missing (in leaf-node mode: the
    streams in the local JetStream domain, the bucket in the hub's). Raises what JetStream
    answers, or its silence: the caller asks again."""
    await streams.ensure(nc, startup=True)
    agent, hub = settings.agent, settings.nats.hub_domain
    domain = ((await nc.jetstream().account_info()).domain or "") if hub else ""
    bucket = await open_bucket(nc, agent.registration_ttl_s, settings.nats.stream_replicas, hub)
    await streams.ensure(nc)  # now with the bucket, which may have been there already
    return JetStream(bucket, domain)


@dataclass
class Fleet:
    settings: Settings
    host: HostContext
    registry: Registry
    journal: Journal
    operations: OperationManager
    peers: Peers
    reconciler: Reconciler
    jetstream_domain: str
    admissions: Admissions
    nc: NATS | None = None

    @classmethod
    def build(
        cls, nc: NATS, settings: Settings, host: HostContext, js: JetStream, publish: Publish,
        recoverable: frozenset[str],
    ) -> Fleet:  # fmt: skip
        hub = settings.nats.hub_domain
        journal = Journal(Path(settings.state_dir) / "operations.db")
        host.metrics.journal_bytes.set_function(journal.size_bytes)
        c = settings.commands
        operations = OperationManager(
            journal, host.host, publish, c.max_operations, host.metrics, recoverable,
            (c.operations_max, c.operations_retention_s, c.idempotency_window_s),
        )  # fmt: skip
        reconciler = Reconciler(
            host.hypervisor, host.host, settings.failover,
            Pool(settings.failover, settings.devices, journal, host.hypervisor, host.metrics),
            host.metrics, host.lock,
            operations.holder, settings.devices.detach_timeout_s,
        )  # fmt: skip
        return cls(
            settings, host, Registry(js.bucket, nc.jetstream(domain=hub or None), hub,
                               UriPolicy.of(settings.libvirt)), journal,
            operations, Peers(nc, settings.subject_prefix, host.host), reconciler, js.domain,
            Admissions(settings.failover, journal, host.hypervisor, host.metrics), nc,
        )  # fmt: skip

    def context(self) -> Context:
        return Context.of(self.host, operations=self.operations, registry=self.registry,
                          peers=self.peers, reconciler=self.reconciler,
                          admissions=self.admissions, announce=self.register)  # fmt: skip

    async def register(self) -> None:
        """This host's virt_hosts entry, written again (heartbeat, libvirt reconnected)."""
        h = self.host
        try:
            capacity = await self.admissions.capacity() if h.hypervisor.connected else None
        except AgentError:
            capacity = None  # libvirt went away meanwhile: the next registration says
        m = self.journal.maintenance()
        try:
            await self.registry.publish(
                Registration(
                    host=h.host,
                    boot_id=h.boot_id,
                    version=__version__,
                    libvirt_uri=self.settings.libvirt.uri,
                    migration_uri=self.settings.libvirt.migration_uri,
                    capabilities=h.capabilities,
                    failover_pool=self.reconciler.pool.describe(),
                    jetstream_domain=self.jetstream_domain or None,
                    admission=True,
                    maintenance=msgspec.convert(m, Maintenance) if m else None,
                    capacity=capacity,
                    updated=0.0,
                )
            )
        except (NoStreamResponseError, BucketNotFoundError, NotFoundError):
            await self._bucket_again()
        except (NatsError, OSError) as exc:
            log.warning("could not refresh the virt_hosts registration", error=str(exc))
        h.metrics.duplicate_host_id.set(0 if self.registry.twin is None else 1)

    async def _bucket_again(self) -> None:
        """virt_hosts is gone (deleted, or NATS lost its store): made again, loudly, with this
        host's registration; asked again at the next heartbeat if that fails too."""
        s, nc = self.settings, self.nc
        assert nc is not None
        try:
            ttl, replicas = s.agent.registration_ttl_s, s.nats.stream_replicas
            self.registry.kv = await open_bucket(nc, ttl, replicas, s.nats.hub_domain)
            log.error("the virt_hosts bucket was missing (deleted, or NATS lost its store); "
                      "created again")  # fmt: skip
            self.host.metrics.streams_recreated.labels(STREAM).inc()
            self.registry.forget_revision()
            try:
                await self.register()
            except Exception:
                # The registration is refreshed at the next heartbeat; the agent runs on.
                log.exception("heartbeat: the registration failed")
        except (NatsError, OSError) as exc:
            log.warning("could not create the virt_hosts bucket again", error=str(exc))

    async def heartbeat(self, publisher: Publisher) -> None:
        """Every heartbeat interval: a `heartbeat` host event and the registration again."""
        h = self.host
        while True:
            await asyncio.sleep(self.settings.agent.heartbeat_interval_s)
            publisher.submit_host_event(
                Heartbeat(
                    host=h.host,
                    boot_id=h.boot_id,
                    uptime_s=round(time.monotonic() - h.started_at, 3),
                    counters=publisher.counters(),
                    queue_depth=publisher.depth,
                )
            )
            try:
                await self.register()
            except Exception:
                # The registration is refreshed at the next heartbeat; the agent runs on.
                log.exception("heartbeat: the registration failed")
