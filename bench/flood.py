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
FLOOD_S = 6.0
RATES = (1000.0, 2000.0, 4000.0, 8000.0, 0.0)  # per second; 0: as fast as it goes
PINGS_IDLE = 300
BURST = 2000


def url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:change-me-{user}@127.0.0.1:{server.port}"


async def flooder(nats_url: str, seconds: float, rate: float = 0.0) -> None:
    """hv02: requests at `rate` per second (0: as fast as the connection takes them), 512
    unanswered at most; prints {"sent", "ok", "busy", "s"} as one JSON line."""
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
        if rate and sent % 10 == 0:
            ahead = t0 + sent / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
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
            steps = [await step(server, controller, rate) for rate in RATES]
        finally:
            await controller.close()
            agent.terminate()
            agent.wait(30)
    idle_p99 = pct(idle, 0.99) * 1000
    rows = []
    for rate, f, flooded in steps:
        answered = (f["ok"] + f["busy"]) / f["s"]
        p99 = pct(flooded, 0.99) * 1000
        rows.append({
            "rate": rate or "max", "sent": f["sent"], "served_per_s": round(f["ok"] / f["s"]),
            "busy_per_s": round(f["busy"] / f["s"]), "answered_per_s": round(answered),
            "answered_over_alone": round(answered / alone_per_s, 2),
            "ping_p99_ms": round(p99, 2), "ping_p99_ratio": round(p99 / idle_p99, 2),
            "unanswered": f["sent"] - f["ok"] - f["busy"] - f["other"],
        })  # fmt: skip
    within = [r for r in rows if r["ping_p99_ratio"] <= 2]
    return {
        "step_s": FLOOD_S, "alone_per_s": round(alone_per_s), "ping_p99_idle_ms": round(idle_p99, 2),
        "steps": rows,
        "answered_per_s_within_2x": max((r["answered_per_s"] for r in within), default=0),
    }  # fmt: skip


async def step(server: NatsServer, controller: Any, rate: float) -> tuple[float, Any, list[float]]:
    """One flood at `rate`, the controller pinging meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.flood", "flooder", url(server, "hv02"), str(FLOOD_S),
        str(rate), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # the flood under way
    flooded = await pings(controller, None, until=time.monotonic() + FLOOD_S - 2)
    out, _ = await proc.communicate()
    return rate, json.loads(out.decode().strip().splitlines()[-1]), flooded


async def flood(work: Path) -> dict[str, Any]:
    return await measure(work)


def flood_table(r: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"A flood from one host (hv02, permitted `failover.release`, {r['step_s']} s per rate) "
        "against one agent, the controller pinging it meanwhile, one ping at a time; against the "
        f"same agent in the same run: the controller alone answered {r['alone_per_s']}/s (a burst "
        f"of {BURST} `domain.get`), its idle ping p99 {r['ping_p99_idle_ms']} ms (bench/flood.py). "
        f"Answered per second while the ping p99 stays within 2x idle: "
        f"**{r['answered_per_s_within_2x']}**.",
        "",
        "| flood rate (/s) | answered /s (served, busy) | over the controller alone | "
        "ping p99 (ms) | over idle | never answered |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['rate']} | {s['answered_per_s']} ({s['served_per_s']}, {s['busy_per_s']}) | "
        f"{s['answered_over_alone']} | {s['ping_p99_ms']} | **{s['ping_p99_ratio']}** | "
        f"{s['unanswered']} of {s['sent']} |"
        for s in r["steps"]
    ]
    return lines


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "flooder":
        asyncio.run(flooder(sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
    else:
        with tempfile.TemporaryDirectory(prefix="virt-agent-flood-") as tmp:
            result = asyncio.run(flood(Path(tmp)))
        print(json.dumps(result, indent=2))
        print("\n".join(flood_table(result)))
