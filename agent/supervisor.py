"""The agent's lifecycle: one TaskGroup owns every long-lived task; ordered, bounded shutdown.

Start: HTTP, NATS and the streams, the publisher, `agent_started`, libvirt (retried with
back-off) with `libvirt_connected` and a `resync` snapshot. Stop (SIGTERM/SIGINT or
`request_stop`): deregister the libvirt callbacks, queue `agent_stopping` last, flush the queue
and every outstanding ack, drain NATS, close libvirt - all within `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
import uuid
from pathlib import Path
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.kv import KeyValue

from agent import __version__, statedir
from agent.backoff import Backoff, until_done
from agent.bus import JETSTREAM_UNANSWERED, Bus
from agent.commands import CommandService
from agent.deadletter import DeadLetters
from agent.envelope import (
    AgentStarted,
    AgentStopping,
    Heartbeat,
    Subjects,
)
from agent.errors import AgentError, Unavailable
from agent.failover import Reconciler
from agent.http import HttpServer
from agent.hypervisor import Hypervisor
from agent.inference import Resyncs
from agent.metrics import Metrics
from agent.operations import Journal, OperationManager, cancel_and_wait
from agent.peers import Peers
from agent.pool import Pool
from agent.publisher import Publisher
from agent.registry import Registration, Registry, open_bucket
from agent.settings import Settings
from agent.spool import Spool
from agent.streams import Streams
from handlers import Context, all_verbs

# Tasks that publish without being asked; stopped first at shutdown.
SELF_PUBLISHING = frozenset({"heartbeat", "overflow-resync", "libvirt-watch", "failover-reconcile"})

# Of shutdown_grace_s, kept for withdrawing the registration and draining NATS.
CLOSE_RESERVE_S = 3.0

log = structlog.get_logger("agent.supervisor")


class AgentState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Agent:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = settings.host_id
        self.boot_id = uuid.uuid4().hex
        self.subjects = Subjects(settings.subject_prefix, settings.host_id)
        self.metrics = Metrics()
        # Before anything in the state directory is opened: one agent per directory.
        self._state_lock = statedir.lock(settings.state_dir)
        self.spool = (
            Spool(Path(settings.state_dir) / "spool", settings.publisher.spool_max_bytes)
            if settings.publisher.spool_max_bytes
            else None
        )
        self.publisher = Publisher(
            settings.publisher, self.subjects, self.boot_id, self.metrics, self.spool,
            DeadLetters(Path(settings.state_dir) / "dead-letters.jsonl",
                        settings.publisher.dead_letter_max_bytes),
        )  # fmt: skip
        self.streams = Streams(settings.nats, self.subjects, self.metrics)
        self.journal: Journal | None = None
        self.hypervisor = Hypervisor(
            settings.libvirt,
            settings.libvirt.uri,
            settings.host_id,
            self.publisher.submit_event,
            self.metrics,
        )
        self.bus = Bus(settings.nats, f"virt-agent/{settings.host_id}", self.metrics,
                       settings.host_id)  # fmt: skip
        self.http: HttpServer | None = None
        if settings.http.listen:
            self.http = HttpServer(settings.http.listen, self.metrics, self.health, self.readiness)
        self.state = AgentState.STARTING
        self.stop_reason = ""
        self.started_at = time.monotonic()
        self.ctx = Context(
            host=self.host,
            boot_id=self.boot_id,
            version=__version__,
            subjects=self.subjects,
            hypervisor=self.hypervisor,
            metrics=self.metrics,
            started_at=self.started_at,
            devices=settings.devices,
            failover=settings.failover,
        )
        self.verbs = all_verbs()
        self.commands = CommandService(settings.commands, self.ctx, self.verbs)
        self.registry: Registry | None = None
        self.operations: OperationManager | None = None
        self.reconciler: Reconciler | None = None
        self._stop = asyncio.Event()
        self.resyncs = Resyncs(self.host, self.hypervisor, self.publisher, self.metrics,
                               settings.libvirt, self._stop, self._after_connect)  # fmt: skip
        self._stop_deadline: float | None = None
        self.ready = asyncio.Event()
        self._jetstream_domain = ""  # leaf-node mode: the local server's JetStream domain
        # What grows with the domains a host has seen, read at each scrape.
        entries = self.metrics.domain_entries
        entries.labels("tracked").set_function(lambda: len(self.resyncs.tracker.known))
        entries.labels("locks").set_function(lambda: len(self.ctx.domain_locks))
        entries.labels("reconciler").set_function(
            lambda: self.reconciler.entries() if self.reconciler else 0
        )
        entries.labels("operations").set_function(
            lambda: self.operations.entries() if self.operations else 0
        )

    # ------------------------------------------------------------ control

    def request_stop(self, reason: str = "requested") -> None:
        """Ask for an orderly shutdown; repeated calls are harmless."""
        if not self._stop.is_set():
            self.stop_reason = reason
            log.info("stop requested", reason=reason)
            self._stop.set()

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "state": self.state.value, "boot_id": self.boot_id}

    def readiness(self) -> dict[str, Any]:
        checks = {
            "running": self.state is AgentState.RUNNING,
            "libvirt": self.hypervisor.connected,
            "nats": self.bus.connected,
            "streams": self.streams.present,
            "unique_host_id": self.registry is None or self.registry.twin is None,
            **self.publisher.ready(),
        }
        return {"ready": all(checks.values()), "checks": checks}

    # ------------------------------------------------------------ run

    async def run(self) -> None:
        with structlog.contextvars.bound_contextvars(host=self.host, boot_id=self.boot_id):
            try:
                await self._run()
            finally:
                await self._close()

    async def _run(self) -> None:
        log.info("agent starting", version=__version__, libvirt_uri=self.settings.libvirt.uri)
        if self.http is not None:
            await self.http.start()
        self.publisher.submit_host_event(
            AgentStarted(
                host=self.host,
                boot_id=self.boot_id,
                version=__version__,
                pid=os.getpid(),
                libvirt_uri=self.settings.libvirt.uri,
            )
        )
        # libvirt first: its events are spooled until NATS is there (a host that boots during
        # a NATS outage records everything from its first event).
        libvirt_up = asyncio.create_task(self._libvirt_startup(), name="libvirt-startup")
        try:
            nc = await self.bus.connect(self._stop)
        except Unavailable:
            libvirt_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await libvirt_up
            return
        bucket = await until_done(
            lambda: self._jetstream(nc), transient=JETSTREAM_UNANSWERED, stop=self._stop,
            backoff=Backoff(1.0, 10.0), what="JetStream not answering; libvirt's events spooled",
        )  # fmt: skip
        if bucket is None:  # stopped before JetStream answered
            libvirt_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await libvirt_up
            return
        hub = self.settings.nats.hub_domain
        self.registry = Registry(bucket, nc.jetstream(domain=hub or None), hub)
        self.ctx.registry = self.registry
        journal = self.journal = Journal(Path(self.settings.state_dir) / "operations.db")
        self.commands.outcomes.store = journal
        self.ctx.operations = self.operations = OperationManager(
            journal,
            self.host,
            self.publisher.submit_op_event,
            self.settings.commands.max_operations,
            self.metrics,
            recoverable=frozenset(v.name for v in self.verbs.values() if v.recover),
            retention=(self.settings.commands.operations_max,
                       self.settings.commands.operations_retention_s,
                       self.settings.commands.idempotency_window_s),
        )  # fmt: skip
        self.ctx.peers = Peers(nc, self.settings.subject_prefix, self.host)
        self.ctx.reconciler = self.reconciler = Reconciler(
            self.hypervisor,
            self.host,
            self.settings.failover,
            Pool(self.settings.failover, self.settings.devices, journal),
            self.metrics,
            self.ctx.lock,
            self.operations.holder,
            self.settings.devices.detach_timeout_s,
        )
        await self.publisher.attach(nc, self.streams)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.publisher.run(), name="publisher"),
                tg.create_task(self.publisher.watch_acks(), name="ack-watchdog"),
                tg.create_task(self.streams.watch(nc), name="streams"),
                tg.create_task(self.commands.run(nc), name="commands"),
                tg.create_task(self.operations.run(), name="operations"),
                tg.create_task(self._measure_loop_lag(), name="loop-lag"),
            ]
            if await libvirt_up:
                await self.commands.listening.wait()  # ready means commands are heard
                await self._register()
                tasks += [
                    tg.create_task(self.resyncs.watch(), name="libvirt-watch"),
                    tg.create_task(self.resyncs.on_overflow(), name="overflow-resync"),
                    tg.create_task(self._heartbeat(), name="heartbeat"),
                    tg.create_task(self.reconciler.run(), name="failover-reconcile"),
                ]
                await self.operations.started()
                for op in list(self.operations.orphans):
                    recover = self.verbs[op.verb].recover
                    assert recover is not None  # only such verbs' operations are orphans
                    self.operations.adopt(op, recover(self.ctx, op))
                self.state = AgentState.RUNNING
                self.ready.set()
                log.info("agent running", event_types=len(self.hypervisor.registered))
                await self._stop.wait()
            await self._shutdown(tasks)
            await _cancel_for_sure(tasks)

    async def _jetstream(self, nc: NATS) -> KeyValue:
        """The streams and the virt_hosts bucket, made where missing (in leaf-node mode: the
        streams in the local JetStream domain, the bucket in the hub's)."""
        await self.streams.ensure(nc, startup=True)
        ttl = (
            self.settings.agent.heartbeat_interval_s
            * self.settings.agent.registration_ttl_heartbeats
        )
        hub = self.settings.nats.hub_domain
        if hub:
            self._jetstream_domain = (await nc.jetstream().account_info()).domain or ""
        return await open_bucket(nc, ttl, self.settings.nats.stream_replicas, hub)

    async def _shutdown(self, tasks: list[asyncio.Task[Any]]) -> None:
        self.state = AgentState.STOPPING
        # 0. Stop taking commands: new ones are answered `unavailable`.
        self.commands.stop_accepting()
        grace = self.settings.agent.shutdown_grace_s
        self._stop_deadline = time.monotonic() + grace
        # Steps 1-4 end early enough to leave the closing steps (5-7) their share of the grace.
        deadline = self._stop_deadline - min(CLOSE_RESERVE_S, grace / 4)
        # 1. Nothing else publishes on its own any more (heartbeat, resyncs, reconcile), and
        #    running operations end - cancelled: a migration is aborted and rolled back, with
        #    libvirt's events still flowing - so their final states go out before
        #    agent_stopping. One still rolling back when the time is up is finished by the
        #    next start (recovery).
        await cancel_and_wait([t for t in tasks if t.get_name() in SELF_PUBLISHING], 1.0)
        if self.operations is not None:
            await self.operations.stop(max(0.1, (deadline - time.monotonic()) / 2))
        # 2. Let libvirt dispatch what it already holds (its queue, the socket) until the
        #    callbacks go quiet, then deregister: every event delivered is queued, none after.
        await self._quiesce(min(1.0, grace / 4))
        self.hypervisor.stop_events()
        # 3. The last word of this boot, after every event.
        self.publisher.submit_host_event(
            AgentStopping(
                host=self.host,
                boot_id=self.boot_id,
                reason=self.stop_reason or "requested",
                counters=self.publisher.counters(),
            )
        )
        # 4. Everything queued reaches JetStream and is acknowledged.
        flushed = await self.publisher.flush(max(0.1, deadline - time.monotonic() - 1.0))
        log.info(
            "agent stopping",
            reason=self.stop_reason,
            flushed=flushed,
            published=self.publisher.published,
            received=self.publisher.received,
            dropped=self.publisher.dropped,
        )

    async def _quiesce(self, limit: float, quiet: float = 0.05) -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = self.publisher.received
            await asyncio.sleep(quiet)
            if self.publisher.received == before:
                return

    async def _close(self) -> None:
        # What is left of the grace (all of the reserve when no ordered shutdown ran before).
        end = self._stop_deadline or time.monotonic() + CLOSE_RESERVE_S
        if self.registry is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.wait_for(
                    self.registry.withdraw(self.host), max(0.1, (end - time.monotonic()) / 3)
                )
        # 5. Drain NATS, 6. close libvirt, 7. stop HTTP. Each step runs even if one before failed.
        try:
            await self.bus.drain(timeout=max(0.2, end - time.monotonic() - 0.2))
        finally:
            try:
                await self.hypervisor.close()
            finally:
                if self.http is not None:
                    await self.http.stop()
                if self.spool is not None:
                    # After a clean flush nothing is left; after a task failed (no ordered
                    # shutdown) what only memory holds goes to the spool for the next start.
                    self.publisher.spill()
                    self.spool.close()
                if self.journal is not None:
                    self.journal.close()
                statedir.unlock(self._state_lock)
                self.state = AgentState.STOPPED
                log.info("agent stopped")

    # ------------------------------------------------------------ long-lived tasks

    async def _libvirt_startup(self) -> bool:
        """Connect to libvirt (events flow from here on) and take the startup snapshot; False
        if asked to stop first."""
        if not await self.hypervisor.reconnect(self._stop):
            return False
        await self.resyncs.announce("startup")
        return True

    async def _after_connect(self) -> None:
        """Once libvirt is (re)connected and its snapshot out: capabilities, registration."""
        try:
            await self.ctx.probe_capabilities()
        except AgentError as exc:
            log.warning("capabilities probe failed", error=exc.message)
        await self._register()

    async def resync(self, reason: str) -> None:
        await self.resyncs.resync(reason)

    async def _register(self) -> None:
        if self.registry is None:
            return
        try:
            await self.registry.publish(
                Registration(
                    host=self.host,
                    boot_id=self.boot_id,
                    version=__version__,
                    libvirt_uri=self.settings.libvirt.uri,
                    migration_uri=self.settings.libvirt.migration_uri,
                    capabilities=self.ctx.capabilities,
                    failover_pool=self.reconciler.pool.describe() if self.reconciler else None,
                    jetstream_domain=self._jetstream_domain or None,
                    updated=0.0,
                )
            )
        except NatsError as exc:
            log.warning("could not refresh the virt_hosts registration", error=str(exc))
        self.metrics.duplicate_host_id.set(0 if self.registry.twin is None else 1)

    async def _measure_loop_lag(self, period: float = 0.1) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(period)
            self.metrics.loop_lag.observe(max(0.0, loop.time() - t0 - period))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.agent.heartbeat_interval_s)
            self.publisher.submit_host_event(
                Heartbeat(
                    host=self.host,
                    boot_id=self.boot_id,
                    uptime_s=round(time.monotonic() - self.started_at, 3),
                    counters=self.publisher.counters(),
                    queue_depth=self.publisher.depth,
                )
            )
            await self._register()


async def _cancel_for_sure(tasks: list[asyncio.Task[Any]], attempts: int = 10) -> None:
    """Cancel the tasks, and again those still running a second later: on Python 3.11 a
    cancellation that arrives just as an awaited reply does is lost inside `asyncio.wait_for`
    (nats-py's requests use it), and such a task would run on and hold the shutdown (seen:
    20 s, the stream check loop). Each one still running is named."""
    pending = [t for t in tasks if not t.done()]
    for _ in range(attempts):
        for t in pending:
            t.cancel()
        _, slow = await asyncio.wait(pending, timeout=1.0) if pending else (set(), set())
        if not slow:
            return
        log.warning("tasks still running after cancellation; cancelled again",
                    tasks=sorted(t.get_name() for t in slow))  # fmt: skip
        pending = list(slow)
