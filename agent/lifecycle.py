"""The agent's states and its ordered, bounded shutdown (SIGTERM/SIGINT or `request_stop`):
stop taking commands, stop what publishes on its own and end running operations, let libvirt
deliver what it holds and deregister the callbacks, queue `agent_stopping` last, flush the
queue and every outstanding ack (steps 0-4, agent/supervisor.py calls them), then withdraw the
registration, drain NATS, close libvirt and HTTP, keep what only memory holds in the spool
(steps 5-7, always) - all within `agent.shutdown_grace_s`."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from typing import TYPE_CHECKING, Any

import structlog
from nats.errors import Error as NatsError

from agent import statedir
from agent.envelope import AgentStopping
from agent.operations import OperationManager, cancel_and_wait

if TYPE_CHECKING:
    from agent.commands import CommandService
    from agent.supervisor import Agent

# Tasks that publish without being asked; stopped first at shutdown.
SELF_PUBLISHING = frozenset({"heartbeat", "overflow-resync", "libvirt-watch", "failover-reconcile"})

# Of shutdown_grace_s, kept for withdrawing the registration and draining NATS.
CLOSE_RESERVE_S = 3.0

log = structlog.get_logger("agent.lifecycle")


class AgentState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


async def shutdown(
    agent: Agent, tasks: list[asyncio.Task[Any]], commands: CommandService,
    operations: OperationManager,
) -> None:  # fmt: skip
    """Steps 0-4 of the ordered shutdown, within the grace less the closing reserve."""
    agent.state = AgentState.STOPPING
    # 0. Stop taking commands: new ones are answered `unavailable`.
    commands.stop_accepting()
    grace = agent.settings.agent.shutdown_grace_s
    agent.stop_deadline = time.monotonic() + grace
    # Steps 1-4 end early enough to leave the closing steps (5-7) their share of the grace.
    deadline = agent.stop_deadline - min(CLOSE_RESERVE_S, grace / 4)
    # 1. Nothing else publishes on its own any more (heartbeat, resyncs, reconcile), and
    #    running operations end - cancelled: a migration is aborted and rolled back, with
    #    libvirt's events still flowing - so their final states go out before
    #    agent_stopping. One still rolling back when the time is up is finished by the
    #    next start (recovery).
    await cancel_and_wait([t for t in tasks if t.get_name() in SELF_PUBLISHING], 1.0)
    await operations.stop(max(0.1, (deadline - time.monotonic()) / 2))
    # 2. Let libvirt dispatch what it already holds (its queue, the socket) until the
    #    callbacks go quiet, then deregister: every event delivered is queued, none after.
    await _quiesce(agent, min(1.0, grace / 4))
    agent.hypervisor.stop_events()
    # 3. The last word of this boot, after every event.
    agent.publisher.submit_host_event(
        AgentStopping(
            host=agent.host,
            boot_id=agent.boot_id,
            reason=agent.stop_reason or "requested",
            counters=agent.publisher.counters(),
        )
    )
    # 4. Everything queued reaches JetStream and is acknowledged.
    flushed = await agent.publisher.flush(max(0.1, deadline - time.monotonic() - 1.0))
    log.info(
        "agent stopping",
        reason=agent.stop_reason,
        flushed=flushed,
        published=agent.publisher.published,
        received=agent.publisher.received,
        dropped=agent.publisher.dropped,
    )


async def _quiesce(agent: Agent, limit: float, quiet: float = 0.05) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = agent.publisher.received
        await asyncio.sleep(quiet)
        if agent.publisher.received == before:
            return


async def close(agent: Agent) -> None:
    """Steps 5-7: what always runs last, after an ordered shutdown or a failure."""
    # What is left of the grace (all of the reserve when no ordered shutdown ran before).
    end = agent.stop_deadline or time.monotonic() + CLOSE_RESERVE_S
    if agent.fleet is not None:
        with contextlib.suppress(NatsError, TimeoutError):
            await asyncio.wait_for(
                agent.fleet.registry.withdraw(agent.host), max(0.1, (end - time.monotonic()) / 3)
            )
    # 5. Drain NATS, 6. close libvirt, 7. stop HTTP. Each step runs even if one before failed.
    try:
        await agent.bus.drain(timeout=max(0.2, end - time.monotonic() - 0.2))
    finally:
        try:
            await agent.hypervisor.close()
        finally:
            if agent.http is not None:
                await agent.http.stop()
            if agent.spool is not None:
                # After a clean flush nothing is left; after a task failed (no ordered
                # shutdown) what only memory holds goes to the spool for the next start.
                agent.publisher.spill()
                agent.spool.close()
            if agent.fleet is not None:
                agent.fleet.journal.close()
            statedir.unlock(agent.state_lock)
            agent.state = AgentState.STOPPED
            log.info("agent stopped")
