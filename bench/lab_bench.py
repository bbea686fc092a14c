"""Lab figures: guest boot, raw live migration, raw unplug → migrate → replug, and the agents'
migrate-with-failover, with the guest's lost ping probes.

Each round moves the failover guest there and back, once with the raw script and once with
migrate_with_failover through the agents (which one first and which direction alternate
between rounds), the virtio-only guest with a plain migration, the standby-rx guest with
migrate_with_failover, and a QEMU-paired guest with migrate_with_failover in mode qemu (QEMU
moves the primary). Lost probes are counted
from the start of each sequence to 5 s after its end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.stats import median
from lab.agents import LabAgents
from lab.lab import Lab, guest_mac, probes, wait_for_serial
from lab.scenarios import raw_failover_migration, raw_migration

# After a sequence: the replug outage of a stock guest (≤ 3 s) and the 1 s probe timeout.
SETTLE_S = 5.0
IDLE_S = 10.0
LAG = "virt_agent_loop_lag_seconds"


def lag_snapshot(agents: LabAgents) -> dict[str, float]:
    """The agents' loop-lag histograms, summed over the lab hosts."""
    total: dict[str, float] = {}
    for h in agents.lab.hosts:
        for k, v in agents.metric(h.name, LAG).items():
            total[k] = total.get(k, 0.0) + v
    return total


def lag_window(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Loop lag between two snapshots: samples, mean, the bucket bound under which 99% fall,
    and how many were later than 10 ms."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    n = d.get("_count", 0.0)
    buckets = sorted(
        (float(k.split('le="')[1].rstrip('"}')), v)
        for k, v in d.items() if k.startswith("_bucket") and "+Inf" not in k
    )  # fmt: skip
    p99 = next((le for le, c in buckets if c >= 0.99 * n), float("inf"))
    le10 = next((c for le, c in buckets if le == 0.01), n)
    return {
        "samples": int(n),
        "mean_ms": round(1000 * d.get("_sum", 0.0) / n, 3) if n else 0.0,
        "p99_ms_at_most": p99 * 1000,
        "over_10ms": int(n - le10),
    }


async def _settled(lab: Lab, name: str) -> None:
    serial = lab.serial_path(name)
    await asyncio.to_thread(wait_for_serial, serial, " ok", 60)
    await asyncio.sleep(SETTLE_S)


def _timeline(lab: Lab, name: str, offset: int, label: str, op: dict[str, Any]) -> dict[str, Any]:
    """One migration's steps and the guest's probes since `offset`, probe times in seconds
    from the first of them (the operation's start, within one probe interval)."""
    text = lab.serial_path(name).read_bytes()[offset:].decode(errors="replace")
    ps = probes(text)
    t0 = ps[0].uptime if ps else 0.0
    return {"label": label,
            "steps": [{"step": s["step"], "duration_s": s.get("duration_s", 0.0)}
                      for s in op["steps"]],
            "probes": [{"t": round(p.uptime - t0, 3), "ok": p.ok} for p in ps]}  # fmt: skip


def _lost_since(lab: Lab, name: str, offset: int) -> tuple[int, int]:
    text = lab.serial_path(name).read_bytes()[offset:].decode(errors="replace")
    ps = probes(text)
    return sum(1 for p in ps if not p.ok), len(ps)


async def lab_baselines(lab: Lab, agents: LabAgents, rounds: int = 6) -> dict[str, Any]:
    a, b = lab.host("a"), lab.host("b")
    out: dict[str, Any] = {"accel": lab.accel, "network": "bridge"}

    # Boot: wall time from define+start to the guest's LAB-READY, against the guest's own
    # uptime at that line (kernel + init): the ratio is what libvirt and QEMU add.
    t0 = time.monotonic()
    await asyncio.to_thread(lab.boot, "a", "bench-failover", "failover", 0)
    boot_wall = time.monotonic() - t0
    ready = lab.serial_path("bench-failover").read_text()
    guest_uptime = float(ready.split("LAB-READY uptime=", 1)[1].split()[0])
    out["boot"] = {
        "wall_s": round(boot_wall, 2),
        "guest_uptime_s": guest_uptime,
        "ratio": round(boot_wall / guest_uptime, 2),
    }
    await asyncio.to_thread(lab.boot, "a", "bench-virtio", "virtio", 1)
    # The same failover pair, the guest's net_failover with the standby-rx rule (lab/guest.py).
    await asyncio.to_thread(lab.boot, "a", "bench-standby-rx", "failover", 2, 90.0, "standby-rx")
    # The pair paired by QEMU itself (failover_pair_id): mode qemu.
    await asyncio.to_thread(lab.boot, "a", "bench-qemu", "qemu-failover", 3)
    for name in ("bench-failover", "bench-virtio", "bench-standby-rx", "bench-qemu"):
        await _settled(lab, name)

    # The agents' event loops while nothing happens (the baseline of the lag figures).
    idle0 = await asyncio.to_thread(lag_snapshot, agents)
    await asyncio.sleep(IDLE_S)
    idle1 = await asyncio.to_thread(lag_snapshot, agents)

    plain: list[dict[str, float]] = []
    fixed: list[dict[str, float]] = []
    by_qemu: list[dict[str, Any]] = []
    seq: list[dict[str, Any]] = []
    agent: list[dict[str, Any]] = []
    ratios: list[float] = []
    timelines: dict[str, dict[str, Any]] = {}
    for i in range(rounds):
        # Directions alternate: A→B in even rounds, B→A in odd ones (each guest comes back
        # within the round or in the next one). The failover guest goes A→B and back in each
        # round, once by the raw script and once by the agents, which of them first alternating.
        there = (a, b) if i % 2 == 0 else (b, a)
        offset = lab.serial_path("bench-virtio").stat().st_size
        r = await raw_migration(there[0].uri, there[1].uri, "bench-virtio")
        await asyncio.sleep(SETTLE_S)
        r["lost"], r["probes"] = _lost_since(lab, "bench-virtio", offset)
        plain.append(r)

        order = ("raw", "agent") if i % 2 == 0 else ("agent", "raw")
        for who, (src, dst) in zip(order, ((a, b), (b, a)), strict=True):
            offset = lab.serial_path("bench-failover").stat().st_size
            if who == "raw":
                r = await raw_failover_migration(src.uri, dst.uri, "bench-failover", guest_mac(0))
            else:
                op, wall = await agents.failover("bench-failover", src.name, dst.name)
                if op["state"] != "succeeded":
                    raise RuntimeError(f"migrate_with_failover failed: {op['error']}")
                r = {s["step"] + "_s": s["duration_s"] for s in op["steps"]}
                r["total_s"] = wall
                r["primary_outage_s"] = op["result"]["primary_outage_s"]
            await asyncio.sleep(SETTLE_S)
            if who == "agent" and "stock" not in timelines:
                timelines["stock"] = _timeline(lab, "bench-failover", offset, "stock guest", op)
            r["lost"], r["probes"] = _lost_since(lab, "bench-failover", offset)
            r["direction"] = f"{src.name}→{dst.name}"
            (seq if who == "raw" else agent).append(r)
        ratios.append(agent[-1]["total_s"] / seq[-1]["total_s"])

        offset = lab.serial_path("bench-standby-rx").stat().st_size
        op, wall = await agents.failover("bench-standby-rx", there[0].name, there[1].name)
        if op["state"] != "succeeded":
            raise RuntimeError(f"migrate_with_failover failed in the benchmark: {op['error']}")
        await asyncio.sleep(SETTLE_S)
        if "standby_rx" not in timelines:
            timelines["standby_rx"] = _timeline(lab, "bench-standby-rx", offset,
                                                "standby-rx guest", op)  # fmt: skip
        lost, n = _lost_since(lab, "bench-standby-rx", offset)
        fixed.append({"total_s": wall, "lost": lost, "probes": n})

        offset = lab.serial_path("bench-qemu").stat().st_size
        op, wall = await agents.failover("bench-qemu", there[0].name, there[1].name)
        if op["state"] != "succeeded" or op["steps"][0]["mode"] != "qemu":
            raise RuntimeError(f"migrate_with_failover (mode qemu) in the benchmark: {op}")
        await asyncio.sleep(SETTLE_S)
        lost, n = _lost_since(lab, "bench-qemu", offset)
        by_qemu.append({"total_s": wall, "lost": lost, "probes": n,
                        "migrate_s": op["steps"][3]["duration_s"]})  # fmt: skip

    busy1 = await asyncio.to_thread(lag_snapshot, agents)
    idle, busy = lag_window(idle0, idle1), lag_window(idle1, busy1)
    out["loop_lag"] = {
        "idle": idle,
        "during_rounds": busy,
        "mean_ratio": round(busy["mean_ms"] / idle["mean_ms"], 2) if idle["mean_ms"] else None,
    }
    plain_migrate = median([r["migrate_s"] for r in plain])
    seq_total = median([r["total_s"] for r in seq])
    out["raw_migration"] = {
        "migrate_s_median": round(plain_migrate, 3),
        "lost_probes": [int(r["lost"]) for r in plain],
    }
    out["raw_failover_sequence"] = {
        "unplug_s_median": round(median([r["unplug_s"] for r in seq]), 3),
        "migrate_s_median": round(median([r["migrate_s"] for r in seq]), 3),
        "replug_s_median": round(median([r["replug_s"] for r in seq]), 3),
        "total_s_median": round(seq_total, 3),
        "lost_probes": [int(r["lost"]) for r in seq],
    }
    out["sequence_over_plain_migration"] = round(seq_total / plain_migrate, 2)
    agent_total = median([r["total_s"] for r in agent])
    out["agent_failover"] = {
        "total_s_median": round(agent_total, 3),
        "steps_s_median": {
            step: round(median([r[step + "_s"] for r in agent]), 3)
            for step in ("plan", "reserve", "unplug", "migrate", "replug", "verify")
        },
        "lost_probes": [int(r["lost"]) for r in agent],
        # What the agent reports: DEVICE_REMOVED on the source to DEVICE_ADDED there.
        "primary_outage_s": [r["primary_outage_s"] for r in agent],
    }
    qemu_total = median([r["total_s"] for r in by_qemu])
    out["agent_failover_mode_qemu"] = {
        "total_s_median": round(qemu_total, 3),
        "migrate_s_median": round(median([r["migrate_s"] for r in by_qemu]), 3),
        "lost_probes": [int(r["lost"]) for r in by_qemu],
    }
    out["mode_qemu_over_sequenced"] = round(qemu_total / agent_total, 3)
    out["agent_over_raw_sequence"] = round(agent_total / seq_total, 3)
    out["agent_over_raw_per_round"] = [round(x, 3) for x in ratios]
    out["agent_over_raw_median_of_rounds"] = round(median(ratios), 3)
    # Migration times depend on the direction here; each direction's agent runs against the
    # raw runs of the same direction, and the two ratios averaged: the headline figure.
    by_dir = {}
    for d in ("a→b", "b→a"):
        ag_d = [r["total_s"] for r in agent if r["direction"] == d]
        raw_d = [r["total_s"] for r in seq if r["direction"] == d]
        by_dir[d] = round(median(ag_d) / median(raw_d), 3)
    out["agent_over_raw_by_direction"] = by_dir
    out["agent_over_raw_direction_paired"] = round(sum(by_dir.values()) / len(by_dir), 3)
    # What the agent adds besides the migration itself (the noisiest part): the other steps.
    out["sequencing_s_median"] = {
        "agent": round(median([r["total_s"] - r["migrate_s"] for r in agent]), 3),
        "raw": round(median([r["total_s"] - r["migrate_s"] for r in seq]), 3),
    }
    out["timelines"] = timelines
    out["agent_failover_standby_rx_guest"] = {
        "total_s_median": round(median([r["total_s"] for r in fixed]), 3),
        "lost_probes": [int(r["lost"]) for r in fixed],
    }
    return out
