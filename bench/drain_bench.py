"""Drain figures in the three-host lab. Host a's guests (three failover pairs, one of them
paired by QEMU, and a virtio-only guest) are moved off a twice in each round: once by the same
migrations run one after another through the agents (migrate_with_failover for the pairs,
migrate for the other, each to the destination the drain's dry run chose) and once by one
`host.drain` per concurrency. The figures: the drain's makespan against the sum of the
sequential migrations' wall times (same round), and the guest-visible outage, the guests'
lost 50 ms probes from the request to SETTLE_S after the end, summed over the guests.
Between runs every guest goes back to a, one at a time (not measured)."""

from __future__ import annotations

import asyncio
from typing import Any

import libvirt

from bench.stats import median
from lab.agents import LabAgents
from lab.lab import Lab, probes

GUESTS = ("bench-failover", "bench-virtio", "bench-standby-rx", "bench-qemu")
PROBE_S = 0.05  # the guests' ping interval (lab/guest.py)
SETTLE_S = 5.0  # a stock guest's replug outage (≤ 3 s) and the probe's 1 s timeout
PARALLEL = (2, 4)


def running_on(lab: Lab, name: str) -> str:
    """The lab host whose libvirt runs the domain `name`."""
    for h in lab.hosts:
        conn = h.connect()
        try:
            try:
                if conn.lookupByName(name).isActive():
                    return str(h.name)
            except libvirt.libvirtError:
                continue
        finally:
            conn.close()
    raise RuntimeError(f"{name} runs nowhere")


def _offsets(lab: Lab) -> dict[str, int]:
    return {g: lab.serial_path(g).stat().st_size for g in GUESTS}


def _lost(lab: Lab, offsets: dict[str, int]) -> dict[str, int]:
    out = {}
    for g, off in offsets.items():
        text = lab.serial_path(g).read_bytes()[off:].decode(errors="replace")
        out[g] = sum(1 for p in probes(text) if not p.ok)
    return out


def _check(op: dict[str, Any], what: str) -> dict[str, Any]:
    if op["state"] != "succeeded":
        raise RuntimeError(f"{what} in the drain benchmark: {op['state']}: {op.get('error')}")
    return op


async def _home(lab: Lab, agents: LabAgents) -> None:
    """Every bench guest back on a, one at a time."""
    for g in GUESTS:
        at = await asyncio.to_thread(running_on, lab, g)
        if at == "a":
            continue
        verb = "migrate" if g == "bench-virtio" else "migrate_with_failover"
        body = {"domain": g, "destination": agents.host_id("a")}
        _check((await agents.operation(at, verb, body))[0], f"{verb} {g} back to a")
    await asyncio.sleep(SETTLE_S)


async def _sequential(lab: Lab, agents: LabAgents, plan: list[dict[str, Any]]) -> dict[str, Any]:
    offsets = _offsets(lab)
    walls = []
    for entry in plan:
        verb = "migrate_with_failover" if entry["failover"] else "migrate"
        body = {"domain": entry["domain"]["name"], "destination": entry["destination"]}
        op, wall = await agents.operation("a", verb, body)
        _check(op, f"{verb} {body['domain']}")
        walls.append(wall)
    await asyncio.sleep(SETTLE_S)
    lost = _lost(lab, offsets)
    return {"sum_s": round(sum(walls), 3), "walls_s": [round(w, 3) for w in walls],
            "lost_probes": lost}  # fmt: skip


async def _drain(lab: Lab, agents: LabAgents, parallel: int) -> dict[str, Any]:
    offsets = _offsets(lab)
    op, wall = await agents.operation("a", "host.drain", {"max_parallel": parallel})
    _check(op, f"host.drain max_parallel {parallel}")
    await asyncio.sleep(SETTLE_S)
    lost = _lost(lab, offsets)
    await agents.request("a", "host.undrain", {})
    domains = (op.get("result") or {}).get("domains") or []
    return {
        "makespan_s": round(wall, 3),
        "lost_probes": lost,
        "primary_outage_s": sum(d.get("primary_outage_s") or 0.0 for d in domains),
        "destinations": {d["domain"]["name"]: d["destination"] for d in domains},
    }


async def lab_drain(lab: Lab, agents: LabAgents, rounds: int = 2) -> dict[str, Any]:
    """Drain host a `rounds` times per concurrency in PARALLEL, each against the same
    migrations one after another; the bench guests must be running (lab_baselines)."""
    await _home(lab, agents)
    seq: list[dict[str, Any]] = []
    drains: dict[int, list[dict[str, Any]]] = {p: [] for p in PARALLEL}
    for i in range(rounds):
        plan = (await agents.request("a", "host.drain", {"dry_run": True}))["plan"]
        unplaced = [e for e in plan if not e.get("destination")]
        if unplaced or len(plan) != len(GUESTS):
            raise RuntimeError(f"the drain benchmark's plan: {plan}")
        # Which comes first alternates between rounds, so drift in the lab favours neither.
        order: list[int | None] = [None, *PARALLEL] if i % 2 == 0 else [*PARALLEL, None]
        for what in order:
            if what is None:
                seq.append(await _sequential(lab, agents, plan))
            else:
                drains[what].append(await _drain(lab, agents, what))
            await _home(lab, agents)

    def outage(runs: list[dict[str, Any]]) -> float:
        return median([PROBE_S * sum(r["lost_probes"].values()) for r in runs])

    seq_sum = median([r["sum_s"] for r in seq])
    out: dict[str, Any] = {
        "guests": len(GUESTS),
        "sequential": {
            "sum_s_median": round(seq_sum, 3),
            "guest_outage_s_median": round(outage(seq), 2),
            "runs": seq,
        },
    }
    for p, runs in drains.items():
        makespan = median([r["makespan_s"] for r in runs])
        out[f"drain_parallel_{p}"] = {
            "makespan_s_median": round(makespan, 3),
            "makespan_over_sequential": round(makespan / seq_sum, 3),
            "guest_outage_s_median": round(outage(runs), 2),
            "primary_outage_s_median": round(median([r["primary_outage_s"] for r in runs]), 3),
            "runs": runs,
        }
    return out


def drain_table(d: dict[str, Any]) -> list[str]:
    seq = d["sequential"]
    lines = [
        "",
        f"Draining lab host a of its {d['guests']} guests (three failover pairs, one paired by "
        "QEMU, and a virtio-only guest) toward b and c, each admitting 2 incoming migrations, "
        "against the same migrations one after another through the agents to the same "
        f"destinations (medians of {len(seq['runs'])} rounds, order alternating; "
        "bench/drain_bench.py). Guest-visible outage: the guests' lost 50 ms probes, summed.",
        "",
        "| run | wall time (s) | over the sequential sum | guest-visible outage (s) | "
        "primary outage, summed (s) |",
        "|---|---|---|---|---|",
        f"| sequential migrations | {seq['sum_s_median']} (sum) | 1 | "
        f"{seq['guest_outage_s_median']} | - |",
    ]
    for key, r in d.items():
        if key.startswith("drain_parallel_"):
            lines.append(
                f"| `host.drain` max_parallel {key.rsplit('_', 1)[1]} | {r['makespan_s_median']} "
                f"(makespan) | **{r['makespan_over_sequential']}** | {r['guest_outage_s_median']}"
                f" | {r['primary_outage_s_median']} |"
            )
    return lines
