"""What an event costs: CPU time per event of the agent process, against a bare libvirtaio
listener's on the same generator, each run alone (nothing else consumes the generator's
events meanwhile), and what nats-server spends behind the agent.

- paced: the generator at 1,000 events/s (10,000 events); CPU per event of each process;
- saturated: the generator as fast as it goes (20,000 events); CPU per event, and the rate at
  which events reach the consumer (the listener's callback; through the agent, a NATS
  subscriber) - the agent-alone throughput against the listener-alone throughput.

CPU time is read from /proc/<pid>/stat (user + system) before the generator starts and once
every event has arrived, so idle time before and after costs nothing.

`python -m bench.cost` runs it alone and prints the figures; `make bench` includes them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.msg import Msg

from agent.bus import subscribed
from agent.embedded import NatsServer, stop_process
from lab.daemon import LibvirtDaemon

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
PACED, SATURATED, RATE = 10_000, 20_000, 1000


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def helper(*args: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([PY, "-m", "bench.eventgen", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert p.stdout is not None
    if (line := p.stdout.readline().strip()) != "ready":
        raise RuntimeError(f"helper {args[0]} did not start: {line!r}")
    return p


def go(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()


def output(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = p.communicate(timeout=600)
    return dict(msgspec.json.decode(out.strip().splitlines()[-1]))


async def listener_alone(uri: str, n: int, rate: int | None) -> dict[str, float]:
    """The bare listener and the generator, nothing else: its CPU per event and its rate."""
    listener = helper("listen", uri, str(n))
    gen = helper("generate", uri, str(n), *(["--rate", str(rate)] if rate else []))
    go(gen)
    await asyncio.to_thread(output, gen)
    # The listener prints once the last event arrived, with its CPU time since ready.
    assert listener.stdout is not None
    line = await asyncio.to_thread(listener.stdout.readline)
    got = dict(msgspec.json.decode(line))
    listener.wait(30)
    return {"events": got["events"], "cpu_us_per_event": got["cpu_s"] / got["events"] * 1e6,
            "events_per_s": got["events"] / ((got["last_ns"] - got["first_ns"]) / 1e9)}  # fmt: skip


class Counter:
    def __init__(self) -> None:
        self.count = 0
        self.first = self.last = 0

    async def on_msg(self, msg: Msg) -> None:
        now = time.time_ns()
        if b'"suspended"' not in msg.data and b'"resumed"' not in msg.data:
            return
        self.first = self.first or now
        self.last = now
        self.count += 1


async def agent_alone(
    uri: str, server: NatsServer, agent: subprocess.Popen[bytes], n: int, rate: int | None
) -> dict[str, float]:
    """The agent (to a NATS subscriber) and the generator: its CPU per event, nats-server's
    behind it, and the rate at the subscriber."""
    nc = await nats.connect(server.url)
    seen = Counter()
    await nc.subscribe("virt.cost.event.*.lifecycle", cb=seen.on_msg, pending_msgs_limit=-1)
    await subscribed(nc)
    assert server.proc is not None
    gen = helper("generate", uri, str(n), *(["--rate", str(rate)] if rate else []))
    a0, s0 = cpu_s(agent.pid), cpu_s(server.proc.pid)
    go(gen)
    await asyncio.to_thread(output, gen)
    deadline = time.monotonic() + 120
    while seen.count < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    a1, s1 = cpu_s(agent.pid), cpu_s(server.proc.pid)
    await nc.close()
    return {"events": seen.count, "cpu_us_per_event": (a1 - a0) / max(1, seen.count) * 1e6,
            "nats_cpu_us_per_event": (s1 - s0) / max(1, seen.count) * 1e6,
            "events_per_s": seen.count / max(1e-9, (seen.last - seen.first) / 1e9)}  # fmt: skip


async def cost(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with LibvirtDaemon(work, "cost") as daemon, NatsServer(work / "nats") as server:
        uri = daemon.test_uri
        out["listener_paced"] = await listener_alone(uri, PACED, RATE)
        out["listener_saturated"] = await listener_alone(uri, SATURATED, None)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIRT_AGENT_")}
        env |= {"VIRT_AGENT_LOG_FORMAT": "json", "VIRT_AGENT_LOG_LEVEL": "warning"}
        with open(work / "agent.log", "wb") as log:
            agent = subprocess.Popen(
                [PY, "-m", "agent", "run", "--libvirt-uri", uri, "--nats-url", server.url,
                 "--host-id", "cost", "--http-addr", "", "--state-dir", str(work / "agent")],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            nc = await nats.connect(server.url)
            try:  # ready: its streams exist and it answers
                for _ in range(300):
                    try:
                        await nc.request("virt.cost.cmd.ping", b"{}", timeout=1)
                        break
                    except Exception:  # not up yet
                        await asyncio.sleep(0.1)
            finally:
                await nc.close()
            out["agent_paced"] = await agent_alone(uri, server, agent, PACED, RATE)
            out["agent_saturated"] = await agent_alone(uri, server, agent, SATURATED, None)
        finally:
            stop_process(agent)
    lp, ls, ap, as_ = (out[k] for k in ("listener_paced", "listener_saturated", "agent_paced",
                                        "agent_saturated"))  # fmt: skip
    out["ratios"] = {
        "agent_cpu_per_event_paced": round(ap["cpu_us_per_event"] / lp["cpu_us_per_event"], 2),
        "agent_cpu_per_event_saturated": round(as_["cpu_us_per_event"] / ls["cpu_us_per_event"], 2),
        "nats_cpu_per_event_paced": round(ap["nats_cpu_us_per_event"] / lp["cpu_us_per_event"], 2),
        "throughput_alone": round(as_["events_per_s"] / ls["events_per_s"], 3),
    }
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="virt-agent-cost-") as tmp:
        result = asyncio.run(cost(Path(tmp)))
    print(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
