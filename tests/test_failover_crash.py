"""Crash safety of migrate-with-failover, in the lab, with both agents as real processes: the
source agent, and separately the destination agent, dies (exit without cleanup, as kill -9)
at every step boundary; after a restart the VM runs on exactly one host with its primary
attached, no failover record is left, and the operation's final state is reported."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.crashpoints import EXIT_STATUS
from lab.agents import answering
from tests.support.agents import AgentProcess
from tests.support.bus import Collector, call
from tests.support.guests import bond_now, final_of, pings_flow, where

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

# point -> (where the VM must end, the operation's final state)
CASES = {
    "plan": ("a", "failed"),
    "reserve": ("a", "failed"),
    "unplug": ("a", "failed"),
    "migrate": ("a", "rolled_back"),
    "replug": ("b", "succeeded"),
    "verify": ("b", "succeeded"),
    "dest.reserve": ("a", "failed"),
    "dest.replug": ("b", "succeeded"),
}


class Agents:
    """One agent process per lab host; restartable with the same identity and state."""

    def __init__(self, start: Callable[..., AgentProcess], nats_url: str, tmp: Path) -> None:
        self.start_process = start
        self.nats_url = nats_url
        self.tmp = tmp
        self.ids = {"a": f"ca{uuid.uuid4().hex[:6]}", "b": f"cb{uuid.uuid4().hex[:6]}"}
        self.procs: dict[str, AgentProcess] = {}

    def start(self, name: str, uri: str, exit_at: str = "") -> AgentProcess:
        env = {
            "VIRT_AGENT_FAILOVER_PEER_TIMEOUT_S": "3",
            "VIRT_AGENT_FAILOVER_RECONCILE_INTERVAL_S": "1",
        }
        p = self.start_process(
            "--libvirt-uri", uri, "--nats-url", self.nats_url, "--host-id", self.ids[name],
            "--state-dir", str(self.tmp / f"state-{name}"), "--http-addr", "127.0.0.1:0",
            env=env, crash_at=exit_at,
        )  # fmt: skip
        self.procs[name] = p
        return p

    async def ready(self, nc: Any, name: str) -> None:
        try:
            await answering(nc, [self.ids[name]])
        except TimeoutError:
            raise AssertionError(
                f"agent {name} not ready:\n{self.procs[name].output()[-3000:]}"
            ) from None


async def wait_exit(p: AgentProcess, timeout: float = 120) -> int:
    return await asyncio.to_thread(p.wait, timeout)


@pytest.mark.parametrize("point", list(CASES))
async def test_an_agent_killed_at_a_step_boundary_leaves_one_vm_with_one_primary(
    point: str,
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    agent_process: Callable[..., AgentProcess],
    nats_server: Any,
    nc: Any,
    collect: Callable[[str], Awaitable[Collector]],
    tmp_path: Path,
) -> None:
    hosts = {"a": host_a, "b": host_b}
    end_on, final_state = CASES[point]
    victim = "b" if point.startswith("dest.") else "a"
    agents = Agents(agent_process, nats_server.url, tmp_path)
    agents.start("a", host_a.uri, point if victim == "a" else "")
    agents.start("b", host_b.uri, point if victim == "b" else "")
    await agents.ready(nc, "a")
    await agents.ready(nc, "b")
    dom = await asyncio.to_thread(guest, "a", "failover")
    u = dom.UUIDString()
    serial = lab.serial_path(dom.name())
    offset = serial.stat().st_size
    ops = await collect(f"virt.{agents.ids['a']}.op.>")

    # The operation's precondition: a guest whose bond holds both NICs (on a busy machine the
    # guest may still be bringing it up; the plan would refuse it, and no step be reached).
    await bond_now(serial, 2, timeout=90)
    req = {"domain": u, "destination": agents.ids["b"]}
    reply: Any = "no reply (the agent may die before it answers)"
    with contextlib.suppress(Exception):
        reply = await call(nc, agents.ids["a"], "migrate_with_failover", req, timeout=30)
    try:
        status = await wait_exit(agents.procs[victim])
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the agent never reached {point}; the reply was {reply}; its "
                             f"log: {agents.procs[victim].output()[-3000:]}") from None  # fmt: skip
    assert status == EXIT_STATUS, agents.procs[victim].output()[-3000:]
    agents.start(victim, hosts[victim].uri)
    await agents.ready(nc, victim)

    op = await final_of(ops, 150)
    assert op["state"] == final_state, op
    got = await call(nc, agents.ids["a"], "operation.get", {"operation_id": op["id"]})
    assert got["result"]["state"] == final_state

    other = "b" if end_on == "a" else "a"
    assert await asyncio.to_thread(where, hosts[end_on], u) == {
        "running": True, "primary": True, "record": False,
    }, f"the VM ends on {end_on} with its primary"  # fmt: skip
    assert (await asyncio.to_thread(where, hosts[other], u))["running"] is False
    await bond_now(serial, 2)
    await pings_flow(serial, offset)


async def test_a_migrate_whose_agent_died_after_the_migration_is_decided_from_both_libvirts(
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    agent_process: Callable[..., AgentProcess],
    nats_server: Any,
    nc: Any,
    collect: Callable[[str], Awaitable[Collector]],
    tmp_path: Path,
) -> None:
    """The source agent dies (crash point `migrate.done`) after a plain migrate completed but before it recorded the outcome: after its restart the operation ends `succeeded`, because the domain runs on B and not on A - not `failed` for having been interrupted."""
    agents = Agents(agent_process, nats_server.url, tmp_path)
    first = agents.start("a", host_a.uri, "migrate.done")
    agents.start("b", host_b.uri)
    await agents.ready(nc, "a")
    await agents.ready(nc, "b")
    dom = await asyncio.to_thread(guest, "a", "virtio")
    u = dom.UUIDString()
    ops = await collect(f"virt.{agents.ids['a']}.op.>")
    reply = await call(nc, agents.ids["a"], "migrate",
                       {"domain": u, "destination": agents.ids["b"]})  # fmt: skip
    assert reply["ok"] is True, reply
    assert await wait_exit(first) == EXIT_STATUS, first.output()[-3000:]
    agents.start("a", host_a.uri)
    await agents.ready(nc, "a")
    op = await final_of(ops, 150)
    assert op["id"] == reply["result"]["operation_id"]
    assert op["state"] == "succeeded", op
    assert (await asyncio.to_thread(where, host_b, u))["running"] is True
    assert (await asyncio.to_thread(where, host_a, u))["running"] is False
