"""Operation events are snapshots: each carries the operation as it was when recorded, however
many steps follow before the publisher sends it (house item 2)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from agent.operations import Progress
from tests.support.agents import RunningAgent
from tests.support.bus import stream_messages


async def test_every_step_appears_in_virt_ops_in_order(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: Any
) -> None:
    """A runner records `plan`, `reserve`, `unplug` without an await between them, and notes
    progress: VIRT_OPS holds one event per record, each with the step it was recorded at, in
    order, and only the last with the final state."""
    agent = await start_agent()
    fleet = agent.agent.fleet
    assert fleet is not None
    release = asyncio.Event()

    async def runner(p: Progress) -> dict[str, Any]:
        p.step("plan", mode="sequenced")
        p.step("reserve")
        p.update(percent=10)
        p.step("unplug")
        await release.wait()
        return {"done": True}

    op = fleet.operations.start("migrate", "6695eb01-f6a4-8304-79aa-97f2502e193f", runner)
    await asyncio.sleep(0.2)
    release.set()
    for _ in range(100):
        if fleet.operations.get(op.id).state == "succeeded":
            break
        await asyncio.sleep(0.05)
    await agent.settled()
    events = [e["data"]["operation"] for _, e, _ in
              await stream_messages(nc, "VIRT_OPS", f"virt.{agent.host}.op.{op.id}")]  # fmt: skip
    assert [(o["state"], o["step"], len(o["steps"])) for o in events] == [
        ("running", "", 0),
        ("running", "plan", 1),
        ("running", "reserve", 2),
        ("running", "reserve", 2),
        ("running", "unplug", 3),
        ("succeeded", "unplug", 3),
    ]
    assert events[3]["progress"] == {"percent": 10}
    assert events[4]["progress"] == {}
    assert "duration_s" not in events[1]["steps"][0]


async def test_what_an_operation_logs_names_it_and_its_step(
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """Log lines from inside a runner carry the operation's id, verb and domain, and the step
    it is in (house item 7); the command's own task is left as it was."""
    agent = await start_agent()
    fleet = agent.agent.fleet
    assert fleet is not None
    seen: list[dict[str, Any]] = []

    async def runner(p: Progress) -> dict[str, Any]:
        p.step("plan")
        seen.append(structlog.contextvars.get_contextvars())
        p.step("reserve")
        seen.append(structlog.contextvars.get_contextvars())
        return {}

    op = fleet.operations.start("migrate", "6695eb01-f6a4-8304-79aa-97f2502e193f", runner)
    for _ in range(100):
        if len(seen) == 2:
            break
        await asyncio.sleep(0.05)
    assert [(c["operation_id"], c["operation"], c["step"]) for c in seen] == [
        (op.id, "migrate", "plan"), (op.id, "migrate", "reserve")]  # fmt: skip
    assert "step" not in structlog.contextvars.get_contextvars()
