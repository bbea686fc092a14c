"""What an event costs: CPU time per event of the agent process, against a bare libvirtaio
listener's on the same generator, each run alone (nothing else consumes the generator's
events meanwhile), and what nats-server spends behind the agent.

- paced: the generator at 1,000 events/s (10,000 events); CPU per event of each process;
- saturated: the generator as fast as it goes (20,000 events); CPU per event, and the rate at
  which events reach the consumer (the listener's callback; through the agent, a NATS
  subscriber) - the agent-alone throughput against the listener-alone throughput.

Each consumer has a libvirtd of its own (the agents stay connected to theirs while the
listener runs), five rounds, the ratios the medians of the rounds' ratios. A second agent with
fast-ingest batches off (`publisher.batch = false`: one JetStream acknowledgement per message)
runs the same generators in each round: what batching changes.

CPU time is read with psutil (user + system) before the generator starts and once
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
import psutil
from nats.aio.msg import Msg

from agent.bus import subscribed
from agent.embedded import NatsServer, stop_process
from bench.stats import median
from lab.agents import answering
from lab.daemon import LibvirtDaemon

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PACED, SATURATED, RATE = 10_000, 20_000, 1000
KINDS = ("listener_paced", "agent_paced", "unbatched_paced", "listener_saturated",
         "agent_saturated", "unbatched_saturated")  # fmt: skip


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def helper(*args: str) -> subprocess.Popen[str]:
    """A bench/eventgen.py process (generator, listener, plain publisher), once it is ready."""
    p = subprocess.Popen([PY, "-m", "bench.eventgen", *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
    assert p.stdout is not None
    if (line := p.stdout.readline().strip()) != "ready":
        raise RuntimeError(f"helper {args[0]} did not start: {line!r}")
    return p


def go(p: subprocess.Popen[str]) -> None:
    """Tell a ready helper to start."""
    assert p.stdin is not None
    p.stdin.write("go\n")
    p.stdin.flush()


def result(p: subprocess.Popen[str], timeout: float = 900) -> dict[str, Any]:
    """A helper's last line of output: its JSON result."""
    out, _ = p.communicate(timeout=timeout)
    return dict(msgspec.json.decode(out.strip().splitlines()[-1]))


async def listener_alone(uri: str, n: int, rate: int | None) -> dict[str, float]:
    """The bare listener and the generator, nothing else: its CPU per event and its rate."""
    listener = helper("listen", uri, str(n))
    gen = helper("generate", uri, str(n), *(["--rate", str(rate)] if rate else []))
    go(gen)
    await asyncio.to_thread(result, gen)
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


def start_agent(work: Path, server: NatsServer, uri: str, host: str,
                batch: bool) -> subprocess.Popen[bytes]:  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRT_AGENT_")}
    env |= {"VIRT_AGENT_LOG_FORMAT": "json", "VIRT_AGENT_LOG_LEVEL": "warning",
            "VIRT_AGENT_PUBLISHER_BATCH": "true" if batch else "false"}  # fmt: skip
    with open(work / f"{host}.log", "wb") as log:
        return subprocess.Popen(
            [PY, "-m", "agent", "run", "--libvirt-uri", uri, "--nats-url", server.url,
             "--host-id", host, "--http-addr", "", "--state-dir", str(work / host)],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def agent_alone(
    uri: str, server: NatsServer, agent: subprocess.Popen[bytes], host: str, n: int,
    rate: int | None,
) -> dict[str, float]:  # fmt: skip
    """The agent (to a NATS subscriber) and the generator: its CPU per event, nats-server's
    behind it, and the rate at the subscriber."""
    nc = await nats.connect(server.url)
    seen = Counter()
    await nc.subscribe(f"virt.{host}.event.*.lifecycle", cb=seen.on_msg, pending_msgs_limit=-1)
    await subscribed(nc)
    assert server.proc is not None
    gen = helper("generate", uri, str(n), *(["--rate", str(rate)] if rate else []))
    a0, s0 = cpu_s(agent.pid), cpu_s(server.proc.pid)
    go(gen)
    await asyncio.to_thread(result, gen)
    deadline = time.monotonic() + 120
    while seen.count < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    a1, s1 = cpu_s(agent.pid), cpu_s(server.proc.pid)
    await nc.close()
    return {"events": seen.count, "cpu_us_per_event": (a1 - a0) / max(1, seen.count) * 1e6,
            "nats_cpu_us_per_event": (s1 - s0) / max(1, seen.count) * 1e6,
            "events_per_s": seen.count / max(1e-9, (seen.last - seen.first) / 1e9)}  # fmt: skip


async def cost(work: Path, rounds: int = 5) -> dict[str, Any]:
    """`rounds` rounds, each: the listener alone (on a libvirtd of its own) and the agent alone
    (on another), paced and saturated, one after the other; ratios are the medians of each
    round's ratios (the machine's state varies between rounds more than within one)."""
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    with (LibvirtDaemon(work, "listener") as quiet, LibvirtDaemon(work, "agent") as busy,
          LibvirtDaemon(work, "unbatched") as plain, NatsServer(work / "nats") as server):  # fmt: skip
        # The agent as it runs, and the same with one acknowledgement per message (no
        # fast-ingest batches): what batching changes, in the same run.
        agent = start_agent(work, server, busy.test_uri, "cost", batch=True)
        unbatched = start_agent(work, server, plain.test_uri, "unbatched", batch=False)
        try:
            await until_answering(server, "cost")
            await until_answering(server, "unbatched")
            for _ in range(rounds):
                runs["listener_paced"].append(await listener_alone(quiet.test_uri, PACED, RATE))
                runs["agent_paced"].append(
                    await agent_alone(busy.test_uri, server, agent, "cost", PACED, RATE)
                )
                runs["unbatched_paced"].append(
                    await agent_alone(plain.test_uri, server, unbatched, "unbatched", PACED, RATE)
                )
                runs["listener_saturated"].append(
                    await listener_alone(quiet.test_uri, SATURATED, None)
                )
                runs["agent_saturated"].append(
                    await agent_alone(busy.test_uri, server, agent, "cost", SATURATED, None)
                )
                runs["unbatched_saturated"].append(await agent_alone(
                    plain.test_uri, server, unbatched, "unbatched", SATURATED, None))  # fmt: skip
        finally:
            stop_process(agent)
            stop_process(unbatched)
    out: dict[str, Any] = {
        k: {m: round(median([r[m] for r in v]), 1) for m in v[0]} for k, v in runs.items()
    }

    def ratio(a: str, am: str, b: str, bm: str) -> float:
        return round(median([x[am] / y[bm] for x, y in zip(runs[a], runs[b], strict=True)]), 2)

    out["ratios"] = {
        "agent_cpu_per_event_paced": ratio("agent_paced", "cpu_us_per_event",
                                           "listener_paced", "cpu_us_per_event"),
        "agent_cpu_per_event_saturated": ratio("agent_saturated", "cpu_us_per_event",
                                               "listener_saturated", "cpu_us_per_event"),
        "nats_cpu_per_event_paced": ratio("agent_paced", "nats_cpu_us_per_event",
                                          "listener_paced", "cpu_us_per_event"),
        "throughput_alone": ratio("agent_saturated", "events_per_s",
                                  "listener_saturated", "events_per_s"),
        "batched_over_unbatched_paced": ratio("agent_paced", "cpu_us_per_event",
                                              "unbatched_paced", "cpu_us_per_event"),
        "batched_over_unbatched_saturated": ratio("agent_saturated", "cpu_us_per_event",
                                                  "unbatched_saturated", "cpu_us_per_event"),
        "nats_batched_over_unbatched_paced": ratio("agent_paced", "nats_cpu_us_per_event",
                                                   "unbatched_paced", "nats_cpu_us_per_event"),
    }  # fmt: skip
    out["rounds"] = rounds
    return out


async def until_answering(server: NatsServer, host: str) -> None:
    nc = await nats.connect(server.url)
    try:
        await answering(nc, [host], 60)
    finally:
        await nc.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="virt-agent-cost-") as tmp:
        result = asyncio.run(cost(Path(tmp)))
    print(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
