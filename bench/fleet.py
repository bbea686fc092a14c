"""Fleet benchmark: N agent processes, each on its own libvirt test driver, on one nats-server.

- Scatter-gather: one `capabilities` request to every host at once, time until the last reply
  (p50/p99 over rounds); baseline: the same scatter-gather to N trivial NATS responders
  answering a reply of the same size, in the same run.
- Aggregate event rate: every host is driven with suspend/resume commands at once; events
  stored in VIRT_EVENTS per second, against one agent driven alone in the same run.
- Message sizes measured here feed the 10,000-host estimate in bench/README.md.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.embedded import NatsServer, stop_process
from bench.stats import pct
from lab.agents import agent_env, answering

ROOT = Path(__file__).resolve().parent.parent


def start_agents(n: int, url: str, work: Path) -> list[subprocess.Popen[bytes]]:
    env = agent_env(VIRT_AGENT_LOG_FORMAT="json", VIRT_AGENT_LOG_LEVEL="warning")
    procs = []
    for i in range(n):
        log = open(work / f"agent{i}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--libvirt-uri", "test:///default",
             "--nats-url", url, "--host-id", f"fleet-{i:03d}", "--state-dir",
             str(work / f"s{i}"), "--http-addr", ""],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        ))  # fmt: skip
    return procs


async def scatter_gather(nc: NATS, hosts: list[str], rounds: int) -> tuple[list[float], int]:
    """Seconds until every host answered `capabilities`, per round; the reply size."""
    times: list[float] = []
    size = 0
    for _ in range(rounds):
        inbox = nc.new_inbox()
        got: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_reply(msg: Msg, q: asyncio.Queue[Msg] = got) -> None:
            await q.put(msg)

        sub = await nc.subscribe(inbox, cb=on_reply)
        t0 = time.monotonic()
        for h in hosts:
            await nc.publish(f"virt.{h}.cmd.capabilities", b"{}", reply=inbox)
        await nc.flush()
        for _ in hosts:
            msg = await asyncio.wait_for(got.get(), 30)
            size = len(msg.data)
        times.append(time.monotonic() - t0)
        await sub.unsubscribe()
    return times, size


async def trivial_responders(nc: NATS, hosts: list[str], size: int) -> list[Any]:
    body = b"{" + b" " * max(0, size - 2) + b"}"

    async def answer(msg: Msg) -> None:
        await msg.respond(body)

    return [await nc.subscribe(f"virt.{h}.cmd.capabilities", cb=answer) for h in hosts]


async def drive(nc: NATS, hosts: list[str], seconds: float) -> None:
    """suspend/resume the test driver's domain `test` on every host, for `seconds`."""

    async def one(h: str) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for verb in ("domain.suspend", "domain.resume"):
                await nc.request(f"virt.{h}.cmd.{verb}", b'{"domain": "test"}', timeout=10)

    await asyncio.gather(*(one(h) for h in hosts))


async def stored_rate(nc: NATS, hosts: list[str], seconds: float) -> float:
    js = nc.jetstream()
    before = (await js.stream_info("VIRT_EVENTS")).state.messages
    t0 = time.monotonic()
    await drive(nc, hosts, seconds)
    await asyncio.sleep(1.0)  # the last acknowledgements
    after = (await js.stream_info("VIRT_EVENTS")).state.messages
    return (after - before) / (time.monotonic() - t0)


async def event_size(nc: NATS, host: str) -> int:
    js = nc.jetstream()
    msg = await js.get_last_msg("VIRT_EVENTS", f"virt.{host}.event.*.lifecycle")
    return len(msg.data) + len(msg.subject)


async def run_fleet(work: Path, n: int, rounds: int = 30, drive_s: float = 5.0) -> dict[str, Any]:
    server = NatsServer(work / "nats").start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        hosts = [f"fleet-{i:03d}" for i in range(n)]
        procs = start_agents(n, server.url, work)
        nc = await nats.connect(server.url)
        try:
            await answering(nc, hosts, 120)
            await scatter_gather(nc, hosts, 3)  # warm-up: the capabilities are probed, cached
            agent_times, size = await scatter_gather(nc, hosts, rounds)
            fake = [f"trivial-{i:03d}" for i in range(n)]
            subs = await trivial_responders(nc, fake, size)
            base_times, _ = await scatter_gather(nc, fake, rounds)
            for s in subs:
                await s.unsubscribe()
            one = await stored_rate(nc, hosts[:1], drive_s)
            many = await stored_rate(nc, hosts, drive_s)
            ev_size = await event_size(nc, hosts[0])
        finally:
            await nc.close()
    finally:
        for p in procs:
            stop_process(p)
        server.stop()
    return {
        "agents": n,
        "scatter_gather_ms": {"p50": round(1000 * pct(agent_times, 0.5), 2),
                              "p99": round(1000 * pct(agent_times, 0.99), 2)},
        "baseline_trivial_responders_ms": {"p50": round(1000 * pct(base_times, 0.5), 2),
                                           "p99": round(1000 * pct(base_times, 0.99), 2)},
        "scatter_gather_p50_ratio": round(pct(agent_times, 0.5) / pct(base_times, 0.5), 2),
        "capabilities_reply_bytes": size,
        "events_per_s": {"one_agent": round(one, 1), f"{n}_agents": round(many, 1)},
        "aggregate_over_one": round(many / one, 2) if one else None,
        "event_message_bytes": ev_size,
    }  # fmt: skip
