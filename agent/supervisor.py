"""The agent's lifecycle: one TaskGroup owns every long-lived task.

Start: HTTP, `agent_started`, libvirt (retried with back-off; its events are spooled until
NATS is there) with `libvirt_connected` and a `resync` snapshot; NATS, then JetStream (asked
again while it does not answer); then what acts beside other hosts (agent/fleet.py: registry,
journal, peers, reconciler - the handlers' Context), the publisher and the commands; ready once
commands are heard and the host is registered.

Stop (SIGTERM/SIGINT or `request_stop`), ordered and bounded: stop taking commands, stop what
publishes on its own and end running operations, let libvirt deliver what it holds and
deregister the callbacks, queue `agent_stopping` last, flush the queue and every outstanding
ack (steps 0-4), then withdraw the registration, drain NATS, close libvirt and HTTP, keep what
only memory holds in the spool (steps 5-7, always) - all within `agent.shutdown_grace_s`.
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
from nats.errors import Error as NatsError

from agent import __version__, statedir
from agent.backoff import Backoff, until_done
from agent.bus import JETSTREAM_UNANSWERED, Bus
from agent.commands import CommandService
from agent.context import HostContext
from agent.current_state import CurrentState
from agent.deadletter import DeadLetters
from agent.envelope import (
    AgentStarted,
    AgentStopping,
    Subjects,
)
from agent.errors import AgentError, Unavailable
from agent.fleet import Fleet, open_jetstream
from agent.http import HttpServer
from agent.hypervisor import Hypervisor
from agent.inference import Resyncs
from agent.metrics import Metrics, measure_loop_lag
from agent.operations import OperationManager, cancel_and_wait, cancel_for_sure
from agent.publisher import Publisher
from agent.settings import Settings
from agent.spool import Spool
from agent.streams import Streams
from handlers import all_verbs

log = structlog.get_logger("agent.supervisor")

# Tasks that publish without being asked; stopped first at shutdown.
SELF_PUBLISHING = frozenset({"heartbeat", "overflow-resync", "libvirt-watch", "failover-reconcile"})

# Of shutdown_grace_s, kept for withdrawing the registration and draining NATS.
CLOSE_RESERVE_S = 3.0


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
        self.state_lock = statedir.lock(settings.state_dir)
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
        self.streams = Streams(settings.nats, self.subjects, self.metrics,
                               settings.agent.registration_ttl_s)  # fmt: skip
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
        self.host_ctx = HostContext(
            host=self.host, boot_id=self.boot_id, version=__version__, subjects=self.subjects,
            hypervisor=self.hypervisor, metrics=self.metrics, started_at=self.started_at,
            devices=settings.devices, failover=settings.failover,
        )  # fmt: skip
        self.verbs = all_verbs()
        # Once NATS is up (agent/fleet.py): the handlers' whole Context, and the commands.
        self.fleet: Fleet | None = None
        self.commands: CommandService | None = None
        self._stop = asyncio.Event()
        self.resyncs = Resyncs(self.host, self.hypervisor, self.publisher, self.metrics,
                               settings.libvirt, self._stop, self._after_connect)  # fmt: skip
        # Every domain's state in virt_domains, from what the resyncs' tracker knows.
        self.current = CurrentState(
            self.host, self.resyncs.tracker, self.metrics, settings.nats.stream_replicas,
            settings.nats.hub_domain,
        )  # fmt: skip
        self.stop_deadline: float | None = None
        self.ready = asyncio.Event()
        # What grows with the domains a host has seen, read at each scrape.
        entries = self.metrics.domain_entries
        entries.labels("tracked").set_function(lambda: len(self.resyncs.tracker.known))
        entries.labels("locks").set_function(lambda: len(self.host_ctx.domain_locks))
        entries.labels("reconciler").set_function(
            lambda: self.fleet.reconciler.entries() if self.fleet else 0
        )
        entries.labels("operations").set_function(
            lambda: self.fleet.operations.entries() if self.fleet else 0
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
            "unique_host_id": self.fleet is None or self.fleet.registry.twin is None,
            "fleet_objects": not self.streams.unsafe,
            **self.publisher.ready(),
        }
        out: dict[str, Any] = {"ready": all(checks.values()), "checks": checks}
        if self.streams.unsafe:
            out["fleet_objects"] = self.streams.unsafe
        return out

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
            js = None
        else:
            js = await until_done(
                lambda: open_jetstream(nc, self.settings, self.streams),
                transient=JETSTREAM_UNANSWERED, stop=self._stop, backoff=Backoff(1.0, 10.0),
                what="JetStream not answering; libvirt's events spooled",
            )  # fmt: skip
        if js is None:  # stopped before NATS, or JetStream, answered
            libvirt_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await libvirt_up
            return
        recoverable = frozenset(v.name for v in self.verbs.values() if v.recover)
        fleet = self.fleet = Fleet.build(nc, self.settings, self.host_ctx, js,
                                         self.publisher.submit_op_event, recoverable)  # fmt: skip
        ctx = fleet.context()
        commands = self.commands = CommandService(self.settings.commands, ctx, self.verbs,
                                                  fleet.journal)  # fmt: skip
        operations = fleet.operations
        await self.publisher.attach(nc, self.streams)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.publisher.run(), name="publisher"),
                tg.create_task(self.publisher.watch_acks(), name="ack-watchdog"),
                tg.create_task(self.streams.watch(nc), name="streams"),
                tg.create_task(commands.run(nc), name="commands"),
                tg.create_task(operations.run(), name="operations"),
                tg.create_task(self.current.run(nc), name="current-state"),
                tg.create_task(measure_loop_lag(self.metrics), name="loop-lag"),
            ]
            if await libvirt_up:
                await commands.listening.wait()  # ready means commands are heard
                await fleet.register()
                tasks += [
                    tg.create_task(self.resyncs.watch(), name="libvirt-watch"),
                    tg.create_task(self.resyncs.on_overflow(), name="overflow-resync"),
                    tg.create_task(fleet.heartbeat(self.publisher), name="heartbeat"),
                    tg.create_task(fleet.reconciler.run(), name="failover-reconcile"),
                ]
                await operations.started()
                for op in list(operations.orphans):
                    recover = self.verbs[op.verb].recover
                    assert recover is not None  # only such verbs' operations are orphans
                    operations.adopt(op, recover(ctx, op))
                self.state = AgentState.RUNNING
                self.ready.set()
                log.info("agent running", event_types=len(self.hypervisor.registered))
                await self._stop.wait()
            await self._shutdown(tasks, commands, operations)
            await cancel_for_sure(tasks)

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
            await self.host_ctx.probe_capabilities()
        except AgentError as exc:
            log.warning("capabilities probe failed", error=exc.message)
        if self.fleet is not None:
            await self.fleet.register()

    async def resync(self, reason: str) -> None:
        await self.resyncs.resync(reason)

    # ------------------------------------------------------------ the ordered, bounded stop

    async def _shutdown(
        self, tasks: list[asyncio.Task[Any]], commands: CommandService,
        operations: OperationManager,
    ) -> None:  # fmt: skip
        """Steps 0-4 of the ordered shutdown, within the grace less the closing reserve."""
        self.state = AgentState.STOPPING
        # 0. Stop taking commands: new ones are answered `unavailable`.
        commands.stop_accepting()
        grace = self.settings.agent.shutdown_grace_s
        self.stop_deadline = time.monotonic() + grace
        # Steps 1-4 end early enough to leave the closing steps (5-7) their share of the grace.
        deadline = self.stop_deadline - min(CLOSE_RESERVE_S, grace / 4)
        # 1. Nothing else publishes on its own any more (heartbeat, resyncs, reconcile), and
        #    running operations end - cancelled: a migration is aborted and rolled back, with
        #    libvirt's events still flowing - so their final states go out before
        #    agent_stopping. One still rolling back when the time is up is finished by the
        #    next start (recovery).
        await cancel_and_wait([t for t in tasks if t.get_name() in SELF_PUBLISHING], 1.0)
        await operations.stop(max(0.1, (deadline - time.monotonic()) / 2))
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
        """Steps 5-7: what always runs last, after an ordered shutdown or a failure."""
        # What is left of the grace (all of the reserve when no ordered shutdown ran before).
        end = self.stop_deadline or time.monotonic() + CLOSE_RESERVE_S
        if self.fleet is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.wait_for(
                    self.fleet.registry.withdraw(self.host), max(0.1, (end - time.monotonic()) / 3)
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
                if self.fleet is not None:
                    self.fleet.journal.close()
                statedir.unlock(self.state_lock)
                self.state = AgentState.STOPPED
                log.info("agent stopped")
