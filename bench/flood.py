"""What a flood from one host costs the others: one agent (a `virt-agent run` process, hv01,
test driver) on a nats-server with config/nats-server.conf.example; a flooder process with
hv02's credentials sends permitted `failover.release` requests as fast as it can for a while,
and the controller pings hv01 meanwhile, one at a time.

Figures, all from one run: the commands per second the agent answers under the flood (served,
and refused busy), as a ratio to what it answers the controller alone; the controller's p99
ping under the flood as a ratio to its idle p99 (goal: at most 2x).

    python -m bench.flood        (also part of `make bench`)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats

from agent.embedded import NatsServer
from bench.stats import pct
from lab.agents import agent_env, answering

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "config" / "nats-server.conf.example"
FLOOD_S = 10.0
PINGS_IDLE = 300
BURST = 2000


def url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:change-me-{user}@127.0.0.1:{server.port}"


async def flooder(nats_url: str, seconds: float) -> None:
    """hv02: requests as fast as the connection takes them, 512 unanswered at most; prints
    {"sent", "ok", "busy", "s"} as one JSON line."""
    nc = await nats.connect(nats_url, inbox_prefix="_INBOX_hv02", pending_size=64 * 1024 * 1024)
    counts = {"ok": 0, "busy": 0, "other": 0}
    window = asyncio.Semaphore(512)

    async def on_reply(msg: Any) -> None:
        window.release()
        if msg.data.startswith(b'{"ok":true'):
            counts["ok"] += 1
        elif b'"unavailable"' in msg.data:
            counts["busy"] += 1
        else:
            counts["other"] += 1

    await nc.subscribe("_INBOX_hv02.flood.*", cb=on_reply)
    await nc.flush()
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            await asyncio.wait_for(window.acquire(), 5)
        except TimeoutError:
            break
        sent += 1
        await nc.publish("virt.hv01.cmd.failover.release.hv02", b'{"reservation_id": "ab12"}',
                         reply=f"_INBOX_hv02.flood.{sent}")  # fmt: skip
    elapsed = time.monotonic() - t0
    await asyncio.sleep(2)
    print(json.dumps({"sent": sent, **counts, "s": round(elapsed, 3)}), flush=True)
    await nc.close()


async def pings(nc: Any, n: int | None, until: float | None = None) -> list[float]:
    out: list[float] = []
    while (n is not None and len(out) < n) or (until is not None and time.monotonic() < until):
        t0 = time.perf_counter()
        msg = await nc.request("virt.hv01.cmd.ping", b"{}", timeout=30)
        out.append(time.perf_counter() - t0)
        assert msgspec.json.decode(msg.data)["ok"] in (True, False)
        await asyncio.sleep(0.005)
    return out


async def measure(work: Path) -> dict[str, Any]:
    with NatsServer(work / "nats", config_file=CONF) as server:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--host-id", "hv01", "--nats-url",
             url(server, "hv01"), "--libvirt-uri", "test:///default", "--state-dir",
             str(work / "hv01"), "--http-addr", "127.0.0.1:0", "--log-level", "warning"],
            cwd=ROOT, env=agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        controller = await nats.connect(url(server, "controller"), inbox_prefix="_INBOX_controller")
        try:
            await answering(controller, ["hv01"])
            idle = await pings(controller, PINGS_IDLE)
            # The controller alone: a burst, answered as fast as the agent can.
            t0 = time.perf_counter()
            await asyncio.gather(*(controller.request("virt.hv01.cmd.domain.get",
                                   b'{"domain": "test"}', timeout=60) for _ in range(BURST)))  # fmt: skip
            alone_per_s = BURST / (time.perf_counter() - t0)
            flood = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.flood", "flooder", url(server, "hv02"), str(FLOOD_S),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await asyncio.sleep(1.0)  # the flood under way
            flooded = await pings(controller, None, until=time.monotonic() + FLOOD_S - 2)
            out, _ = await flood.communicate()
            f = json.loads(out.decode().strip().splitlines()[-1])
        finally:
            await controller.close()
            agent.terminate()
            agent.wait(30)
    answered = (f["ok"] + f["busy"]) / f["s"]
    idle_p99, flood_p99 = pct(idle, 0.99) * 1000, pct(flooded, 0.99) * 1000
    return {
        "flood_s": f["s"], "sent": f["sent"], "served_per_s": round(f["ok"] / f["s"]),
        "busy_per_s": round(f["busy"] / f["s"]), "answered_per_s": round(answered),
        "alone_per_s": round(alone_per_s), "answered_over_alone": round(answered / alone_per_s, 2),
        "ping_p99_idle_ms": round(idle_p99, 2), "ping_p99_flood_ms": round(flood_p99, 2),
        "ping_p99_ratio": round(flood_p99 / idle_p99, 2), "pings_under_flood": len(flooded),
        "unanswered": f["sent"] - f["ok"] - f["busy"] - f["other"],
    }  # fmt: skip


async def flood(work: Path) -> dict[str, Any]:
    return await measure(work)


def flood_table(r: dict[str, Any]) -> list[str]:
    return [
        "",
        f"A flood from one host (hv02, permitted `failover.release`, {r['flood_s']} s) against "
        "one agent, the controller pinging meanwhile; ratios against the same agent in the same "
        "run (bench/flood.py):",
        "",
        "| | value | baseline | ratio |",
        "|---|---|---|---|",
        f"| requests answered per second under the flood (served {r['served_per_s']}, busy "
        f"{r['busy_per_s']}) | {r['answered_per_s']} | the controller alone, a burst of {BURST}: "
        f"{r['alone_per_s']} | **{r['answered_over_alone']}** |",
        f"| controller's ping p99 under the flood (ms) | {r['ping_p99_flood_ms']} | idle "
        f"{r['ping_p99_idle_ms']} | **{r['ping_p99_ratio']}** (goal ≤ 2) |",
        f"| flood requests never answered | {r['unanswered']} | of {r['sent']} | - |",
    ]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "flooder":
        asyncio.run(flooder(sys.argv[2], float(sys.argv[3])))
    else:
        with tempfile.TemporaryDirectory(prefix="virt-agent-flood-") as tmp:
            result = asyncio.run(flood(Path(tmp)))
        print(json.dumps(result, indent=2))
        print("\n".join(flood_table(result)))
