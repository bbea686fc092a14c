"""`make bench`: every figure as a ratio against a baseline measured in the same run.

Writes bench/results/latest.json and the results table in bench/README.md.
BENCH_EVENTS (default 120000) sets the events of the throughput rounds, all together;
BENCH_CAMPAIGN_SEEDS (comma-separated; default the fixed seeds and three fresh ones) and
BENCH_CAMPAIGN_FAULTS (default 12) the fault campaign; BENCH_SOAK_OPS and BENCH_SOAK_DOMAINS
(default 100,000 and 10,000) the soak, BENCH_SOAK=0 skips it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from agent.bus import subscribed
from agent.embedded import NatsServer
from bench.allocator import allocator, allocator_table
from bench.cost import cost, go, helper, result
from bench.drain_bench import drain_table, lab_drain
from bench.eventgen import rss_kib
from bench.fleet import run_fleet
from bench.flood import flood, flood_table
from bench.lab_bench import lab_baselines
from bench.soak import soak
from bench.stats import median, pct
from bench.timeline import timeline_svg
from lab.agents import LabAgents
from lab.daemon import LibvirtDaemon
from lab.lab import Lab

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


class Subscriber:
    """Counts lifecycle events from the agent and their callback-to-here latency."""

    def __init__(self) -> None:
        self.count = 0
        self.first = self.last = 0
        self.latencies_ms: list[float] = []
        self.record_latency = False
        self._dec = msgspec.json.Decoder()

    async def on_event(self, msg: Msg) -> None:
        now = time.time_ns()
        ev = self._dec.decode(msg.data)
        if ev["data"]["event"] not in ("suspended", "resumed"):
            return  # the generator's own start and stop of its domain
        if not self.count:
            self.first = now
        self.last = now
        self.count += 1
        if self.record_latency:
            t = ev["time"]
            sent = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
            self.latencies_ms.append((now / 1e9 - sent) * 1000)

    async def on_plain(self, msg: Msg) -> None:
        now = time.time_ns()
        self.count += 1
        self.latencies_ms.append((now - self._dec.decode(msg.data)["t"]) / 1e6)

    def reset(self, latency: bool) -> None:
        self.count = 0
        self.first = self.last = 0
        self.latencies_ms = []
        self.record_latency = latency

    async def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count < n and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def round_(uri: str, n: int, sub: Subscriber) -> tuple[dict[str, Any], dict[str, Any]]:
    """One generator run seen at once by the bare listener and, through the agent, by NATS."""
    listener = helper("listen", uri, str(n))
    gen = helper("generate", uri, str(n))
    sub.reset(latency=False)
    go(gen)
    g = await asyncio.to_thread(result, gen)
    b = await asyncio.to_thread(result, listener)
    await sub.wait(n, 120)
    bare = {
        "events": b["events"],
        "events_per_s": b["events"] / ((b["last_ns"] - b["first_ns"]) / 1e9),
        "rss_kib": b["rss_kib"],
    }
    agent = {
        "events": sub.count,
        "events_per_s": sub.count / ((sub.last - sub.first) / 1e9) if sub.count > 1 else 0.0,
        "generator_events_per_s": g["events"] / g["seconds"],
    }
    return bare, agent


async def latency_baseline(
    nc: nats.NATS, server: NatsServer, role: str, subject: str, count: int
) -> Subscriber:
    """bench/eventgen.py's `role` publishing `count` stamped messages at 1,000/s to `subject`,
    received here."""
    sub = Subscriber()
    await nc.subscribe(subject, cb=sub.on_plain)
    await subscribed(nc)
    pub = helper(role, server.url, str(count), subject, "1000")
    go(pub)
    await asyncio.to_thread(result, pub)
    await sub.wait(count, 30)
    return sub


async def event_bridge(
    daemon: LibvirtDaemon, server: NatsServer, work: Path, total: int, rounds: int = 5
) -> dict[str, Any]:
    """Rounds in which the bare listener and the agent consume the same generator run at the
    same time (same events, same machine load); the ratio is of the medians."""
    uri = daemon.test_uri
    n = total // rounds
    host = "bench"
    nc = await nats.connect(server.url)
    sub = Subscriber()
    started = asyncio.Event()

    async def on_host(msg: Msg) -> None:
        if msg.subject.endswith(".resync"):
            started.set()

    await nc.subscribe(f"virt.{host}.host.>", cb=on_host)
    await nc.subscribe(
        f"virt.{host}.event.*.lifecycle", cb=sub.on_event, pending_msgs_limit=1_000_000
    )
    await subscribed(nc)
    env = dict(os.environ)  # VIRT_AGENT_* settings pass through to the agent under test
    env["VIRT_AGENT_LOG_FORMAT"] = "json"
    env["VIRT_AGENT_LOG_LEVEL"] = "warning"
    agent = subprocess.Popen(
        [PY, "-m", "agent", "run", "--libvirt-uri", uri, "--nats-url", server.url, "--host-id", host,
         "--http-addr", "", "--state-dir", str(work / "agent")],
        env=env, cwd=ROOT, stdout=open(work / "agent.log", "wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    bare: list[dict[str, Any]] = []
    through: list[dict[str, Any]] = []
    try:
        await asyncio.wait_for(started.wait(), 30)
        rss_idle = rss_kib(agent.pid)
        for _ in range(rounds):
            b, a = await round_(uri, n, sub)
            bare.append(b)
            through.append(a)
        rss = rss_kib(agent.pid)

        # Latency at a paced 1,000 events/s: libvirt callback (envelope time) -> subscriber.
        paced = 10_000
        gen = helper("generate", uri, str(paced), "--rate", "1000")
        sub.reset(latency=True)
        go(gen)
        await asyncio.to_thread(result, gen)
        await sub.wait(paced, 60)
        lat = sub.latencies_ms
    finally:
        agent.terminate()
        agent.wait(30)

    # Latency baselines, same subscriber, same rate: plain NATS publishes, and a JetStream
    # publisher's, each publish awaited (what the agent's p99 is held to).
    plain = await latency_baseline(nc, server, "natspub", "bench.plain", paced)
    await nc.jetstream().add_stream(StreamConfig(name="BENCH_JS", subjects=["bench.js"]))
    jsb = await latency_baseline(nc, server, "jspub", "bench.js", paced)
    await nc.close()

    bare_rate = median([r["events_per_s"] for r in bare])
    agent_rate = median([r["events_per_s"] for r in through])
    agent_events = sum(r["events"] for r in through)
    return {
        "rounds": rounds,
        "events_per_round": n,
        "bare_listener": {
            "events_per_s_median": round(bare_rate, 1),
            "events_per_s_rounds": [round(r["events_per_s"], 1) for r in bare],
            "rss_mb": round(max(r["rss_kib"] for r in bare) / 1024, 1),
        },
        "agent": {
            "events_per_s_median": round(agent_rate, 1),
            "events_per_s_rounds": [round(r["events_per_s"], 1) for r in through],
            "generator_events_per_s_rounds": [
                round(r["generator_events_per_s"], 1) for r in through
            ],
            "events_at_subscriber": agent_events,
            "rss_mb_idle": round(rss_idle / 1024, 1),
            "rss_mb_after_events": round(rss / 1024, 1),
        },
        # Paired: each round's agent rate over the bare listener's rate in that same round.
        "throughput_ratio": round(
            median(
                [a["events_per_s"] / b["events_per_s"] for a, b in zip(through, bare, strict=True)]
            ),
            3,
        ),
        "throughput_ratio_rounds": [
            round(a["events_per_s"] / b["events_per_s"], 3)
            for a, b in zip(through, bare, strict=True)
        ],
        "lost": n * rounds - agent_events,
        "rss_ratio": round(rss / max(r["rss_kib"] for r in bare), 2),
        "latency_ms": {
            "events": len(lat),
            "p50": round(pct(lat, 0.5), 3),
            "p99": round(pct(lat, 0.99), 3),
        },
        "baseline_nats_latency_ms": {
            "events": len(plain.latencies_ms),
            "p50": round(pct(plain.latencies_ms, 0.5), 3),
            "p99": round(pct(plain.latencies_ms, 0.99), 3),
        },
        "latency_p99_ratio": round(pct(lat, 0.99) / pct(plain.latencies_ms, 0.99), 2),
        "baseline_jetstream_latency_ms": {
            "events": len(jsb.latencies_ms),
            "p50": round(pct(jsb.latencies_ms, 0.5), 3),
            "p99": round(pct(jsb.latencies_ms, 0.99), 3),
        },
        # The goal: within 1 ms of a JetStream publisher's p99.
        "latency_p99_over_jetstream_ms": round(pct(lat, 0.99) - pct(jsb.latencies_ms, 0.99), 3),
    }


def render_table(res: dict[str, Any]) -> str:
    eb = res["event_bridge"]
    rows = [
        ("Throughput, events/s reaching a NATS subscriber (medians; ratio: median of per-round ratios "
         f"{eb['throughput_ratio_rounds']})",
         f"{eb['agent']['events_per_s_median']:,}",
         f"bare libvirtaio listener {eb['bare_listener']['events_per_s_median']:,}",
         f"**{eb['throughput_ratio']}**", "≥ 0.95"),
        ("Events lost over the throughput rounds", f"{eb['lost']}",
         f"of {eb['events_per_round'] * eb['rounds']:,} generated", "-", "0"),
        ("Latency p50, callback → subscriber at 1,000 ev/s (ms)", f"{eb['latency_ms']['p50']}",
         f"plain NATS {eb['baseline_nats_latency_ms']['p50']}", "-", "-"),
        ("Latency p99, callback → subscriber at 1,000 ev/s (ms)", f"{eb['latency_ms']['p99']}",
         f"plain NATS {eb['baseline_nats_latency_ms']['p99']}", f"**{eb['latency_p99_ratio']}**", "p99 ≤ 5 ms"),
    ]  # fmt: skip
    if "baseline_jetstream_latency_ms" in eb:
        js = eb["baseline_jetstream_latency_ms"]
        rows.append(
            ("Latency p99 over a JetStream publisher's p99, same rate (ms; each publish awaited)",
             f"{eb['latency_p99_over_jetstream_ms']:+}", f"JetStream publisher p50 {js['p50']}, p99 {js['p99']}",
             "-", "≤ +1 ms"))  # fmt: skip
    rows += [
        (f"Agent RSS after {eb['agent']['events_at_subscriber']:,} events (MB)", f"{eb['agent']['rss_mb_after_events']}",
         f"bare listener {eb['bare_listener']['rss_mb']}", f"**{eb['rss_ratio']}**", "≤ 80 MB"),
    ]  # fmt: skip
    lines = [
        f"Run {res['date']} on {res['machine']['cpus']} CPUs, Python {res['machine']['python']}, "
        f"libvirt {res['machine']['libvirt']}.",
        "",
        "| measure | agent | baseline (same run) | ratio | goal |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lb = res.get("lab")
    if lb:
        seq, plain = lb["raw_failover_sequence"], lb["raw_migration"]
        lines += [
            "",
            f"Lab ({lb['accel']} guests, {lb['network']} network), medians of "
            f"{len(seq['lost_probes'])} rounds, directions and order alternating:",
            "",
            "| measure | value | baseline (same run) | ratio |",
            "|---|---|---|---|",
            f"| Guest boot to LAB-READY (s) | {lb['boot']['wall_s']} | guest's own uptime {lb['boot']['guest_uptime_s']} | {lb['boot']['ratio']} |",
            f"| Raw unplug → migrate → replug (s) | {seq['total_s_median']} (unplug {seq['unplug_s_median']}, migrate {seq['migrate_s_median']}, replug {seq['replug_s_median']}) | raw live migration, virtio-only guest {plain['migrate_s_median']} | {lb['sequence_over_plain_migration']} |",
            f"| Lost 50 ms ping probes per round | {seq['lost_probes']} | plain migration {plain['lost_probes']} | - |",
        ]
        ag = lb.get("agent_failover")
        if ag:
            st = ag["steps_s_median"]
            steps = ", ".join(f"{k} {v}" for k, v in st.items())
            lines += [
                f"| migrate_with_failover through the agents, wall time from the request to the final state (s) | {ag['total_s_median']} ({steps}) | raw unplug → migrate → replug {seq['total_s_median']} | **{lb.get('agent_over_raw_direction_paired', lb['agent_over_raw_sequence'])}** (same direction against same direction: {lb.get('agent_over_raw_by_direction', '-')}; per round, mixing directions: {lb.get('agent_over_raw_per_round', '-')}; goal ≤ 1.15) |",
                f"| Lost 50 ms ping probes, migrate_with_failover | {ag['lost_probes']} | raw sequence {seq['lost_probes']}, plain migration {plain['lost_probes']} | - |",
            ]
        lag = lb.get("loop_lag")
        if lag:
            i, b = lag["idle"], lag["during_rounds"]
            lines.append(
                f"| Agents' event-loop lag during the rounds (100 ms timer): mean / p99 ≤ / samples > 10 ms | {b['mean_ms']} ms / {b['p99_ms_at_most']} ms / {b['over_10ms']} of {b['samples']} | idle agents {i['mean_ms']} ms / {i['p99_ms_at_most']} ms / {i['over_10ms']} of {i['samples']} | {lag['mean_ratio']} |"
            )
        if ag and "sequencing_s_median" in lb:
            sq = lb["sequencing_s_median"]
            lines.append(
                f"| The same without the migration step: what the sequencing costs (s) | {sq['agent']} | raw {sq['raw']} | - |"
            )
        if ag and "primary_outage_s" in ag:
            lines.append(
                f"| Primary outage the agent reports, migrate_with_failover (DEVICE_REMOVED → DEVICE_ADDED, s) | {ag['primary_outage_s']} | lost probes, same rounds {ag['lost_probes']} | - |"
            )
        mq = lb.get("agent_failover_mode_qemu")
        if mq:
            lines += [
                f"| migrate_with_failover, mode qemu (QEMU moves the primary), wall time (s) | {mq['total_s_median']} (migrate {mq['migrate_s_median']}) | mode sequenced {ag['total_s_median'] if ag else '-'} | **{lb['mode_qemu_over_sequenced']}** |",
                f"| Lost probes, mode qemu | {mq['lost_probes']} | mode sequenced {ag['lost_probes'] if ag else '-'} | - |",
            ]
        fx = lb.get("agent_failover_standby_rx_guest")
        if fx:
            lines.append(
                f"| Lost probes, migrate_with_failover, guest net_failover with the standby-rx rule | {fx['lost_probes']} | plain migration {plain['lost_probes']} | - |"
            )
    tables: dict[str, Callable[[Any], list[str]]] = {
        "fleet": fleet_table, "faults": fault_table, "campaign": campaign_table,
        "soak": soak_table, "cost": cost_table, "allocator": allocator_table,
        "flood": flood_table, "drain": drain_table,
    }  # fmt: skip
    for key, table in tables.items():
        if res.get(key):
            lines += table(res[key])
    return "\n".join(lines)


def fault_suite() -> list[dict[str, Any]]:
    """The fault tests (marker `faults`) run for real, each reporting its row."""
    with tempfile.TemporaryDirectory(prefix="virt-agent-faults-") as tmp:
        out = Path(tmp) / "faults.jsonl"
        proc = subprocess.run(
            [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "faults", "tests/test_faults.py"],
            cwd=ROOT, env={**os.environ, "VIRT_AGENT_FAULT_REPORT": str(out)},
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
        raise RuntimeError("the fault suite failed; its rows are not figures")
    return rows


def campaign_suite() -> list[dict[str, Any]]:
    """The randomized fault campaign (tests/campaign.py), longer than in CI: the fixed seeds
    and fresh ones, BENCH_CAMPAIGN_FAULTS faults each."""
    seeds = os.environ.get("BENCH_CAMPAIGN_SEEDS") or ",".join(
        ["3", "4"] + [str(random.SystemRandom().randrange(1 << 31)) for _ in range(3)]
    )
    with tempfile.TemporaryDirectory(prefix="virt-agent-campaign-") as tmp:
        out = Path(tmp) / "campaign.jsonl"
        proc = subprocess.run(
            [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
             "tests/test_campaign.py"],
            cwd=ROOT, capture_output=True, text=True, check=False,
            env={**os.environ, "VIRT_AGENT_CAMPAIGN_REPORT": str(out),
                 "VIRT_AGENT_CAMPAIGN_SEEDS": seeds,
                 "VIRT_AGENT_CAMPAIGN_FAULTS": os.environ.get("BENCH_CAMPAIGN_FAULTS", "12")},
        )  # fmt: skip
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    if proc.returncode != 0:
        # A failing schedule is a finding: its row goes into the table with its problems.
        print(proc.stdout[-3000:], file=sys.stderr)
    return rows


def campaign_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "Fault campaign (tests/campaign.py, run by the benchmark: seeded random schedules of "
        "NATS node and cluster kills, freezes, stream deletion, libvirtd restarts, agent "
        "SIGKILL/SIGTERM and a full disk, against an independent libvirt listener's ground "
        "truth; time to ready: from the end of a fault to `/readyz` 200, the worst of the run; "
        "virt_domains: from the end of the run until the bucket equals libvirt's listing):",
        "",
        "| seed | faults applied | events | stored | lost | duplicated | max time to ready (s) | virt_domains right after (s) | problems |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['seed']} | {r['faults']} | {r['events']:,} | {r['stored']:,} | {r['lost']} | "
        f"{r['duplicated']} | {r['max_ready_s']} | {r.get('current_state_s', '-')} | "
        f"{'; '.join(r['problems']) or 'none'} |"
        for r in rows
    ]
    return lines


# What an event cost with one JetStream acknowledgement per message, before fast-ingest batches
# (the previous `make bench`, 2026-12-05, three rounds): the figures today's are set beside.
COST_BEFORE = {"agent_paced_us": 229.0, "listener_paced_us": 110.6, "agent_paced_ratio": 2.26,
               "agent_saturated_ratio": 1.17, "nats_paced_us": 108.0, "nats_paced_ratio": 1.17,
               "throughput_alone": 1.05}  # fmt: skip


def cost_table(c: dict[str, Any]) -> list[str]:
    r, b = c["ratios"], COST_BEFORE
    lp, ls, ap, as_ = (c[k] for k in ("listener_paced", "listener_saturated", "agent_paced",
                                      "agent_saturated"))  # fmt: skip
    lines = [
        "",
        "What an event costs (bench/cost.py: each consumer alone on the generator; CPU time "
        f"of the process per event; medians of {c.get('rounds', 3)} rounds; before: the previous "
        "run, one acknowledgement per message):",
        "",
        "| measure | agent | baseline (same run) | ratio | before | goal |",
        "|---|---|---|---|---|---|",
        f"| CPU per event at a paced 1,000 events/s (µs) | {ap['cpu_us_per_event']:.1f} | bare listener {lp['cpu_us_per_event']:.1f} | **{r['agent_cpu_per_event_paced']}** | {b['agent_paced_ratio']} ({b['agent_paced_us']:.0f} vs {b['listener_paced_us']:.0f}) | ≤ 1.4 |",
        f"| CPU per event, saturated (µs) | {as_['cpu_us_per_event']:.1f} | bare listener {ls['cpu_us_per_event']:.1f} | **{r['agent_cpu_per_event_saturated']}** | {b['agent_saturated_ratio']} | ≤ 1.1 |",
        f"| nats-server CPU per event behind the agent, paced (µs) | {ap['nats_cpu_us_per_event']:.1f} | bare listener {lp['cpu_us_per_event']:.1f} | {r['nats_cpu_per_event_paced']} | {b['nats_paced_ratio']} ({b['nats_paced_us']:.0f} µs) | no higher than before |",
        f"| Throughput alone, saturated (events/s reaching the consumer) | {as_['events_per_s']:,.0f} | bare listener alone {ls['events_per_s']:,.0f} | **{r['throughput_alone']}** | {b['throughput_alone']} | - |",
    ]  # fmt: skip
    if "unbatched_paced" in c:
        up, us = c["unbatched_paced"], c["unbatched_saturated"]
        lines += [
            f"| Fast-ingest batches against one acknowledgement per message (`publisher.batch = false`), agent CPU per event, paced | {ap['cpu_us_per_event']:.1f} | unbatched agent {up['cpu_us_per_event']:.1f} | **{r['batched_over_unbatched_paced']}** | - | < 1 |",
            f"| The same, saturated | {as_['cpu_us_per_event']:.1f} | unbatched agent {us['cpu_us_per_event']:.1f} | {r['batched_over_unbatched_saturated']} | - | - |",
            f"| The same, nats-server CPU per event, paced | {ap['nats_cpu_us_per_event']:.1f} | behind the unbatched agent {up['nats_cpu_us_per_event']:.1f} | **{r['nats_batched_over_unbatched_paced']}** | - | ≤ 1 |",
        ]  # fmt: skip
    return lines


def soak_table(k: dict[str, Any]) -> list[str]:
    entries = ", ".join(f"{t} {k['domain_entries_start'][t]:.0f} → {v:.0f}"
                        for t, v in k["domain_entries_end"].items())  # fmt: skip
    return [
        "",
        f"Soak (bench/soak.py): {k['operations']:,} short `migrate` operations with request ids "
        f"over {k['domains']:,} domains created and removed, one agent process, journal bound "
        f"`commands.operations_max` = {k['operations_max']:,} and a 5 s idempotency window; "
        f"{k['ops_per_s']:,} operations/s:",
        "",
        "| measure | end of the run | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| Agent RSS (MB) | {k['rss_end_mb']} | after the first tenth of the run: {k['rss_warm_mb']} | **{k['rss_end_over_warm']}** |",
        f"| Journal rows, most seen (operations / idempotency outcomes) | {k['max_operation_rows']:,} / {k['max_request_rows']:,} | the bound {k['operations_max']:,} / - | {k['max_operation_rows'] / k['operations_max']:.3f} |",
        f"| Per-domain entries before → after (`virt_agent_domain_entries`) | {entries} | - | - |",
    ]


def fleet_table(f: dict[str, Any]) -> list[str]:
    n = f["agents"]
    sg, base = f["scatter_gather_ms"], f["baseline_trivial_responders_ms"]
    ev = f["events_per_s"]
    hosts, vms, hb_s = 10_000, 50, 30
    ev_bytes, cap_bytes = f["event_message_bytes"], f["capabilities_reply_bytes"]
    steady = hosts * vms / 600  # one event per VM every 10 minutes
    burst = hosts * 0.1 * vms * 12 / 600  # 10% of hosts evacuated in 10 min, ~12 events per VM
    per_host_ms = sg["p50"] / n
    return [
        "",
        f"Fleet: {n} agent processes (each on its own test driver) on one nats-server, 2 CPUs:",
        "",
        "| measure | agents | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| Scatter-gather `capabilities` to all {n} hosts, time to the last reply p50 / p99 (ms) | {sg['p50']} / {sg['p99']} | {n} trivial NATS responders, same reply size: {base['p50']} / {base['p99']} | {f['scatter_gather_p50_ratio']} |",
        f"| Events stored per second, every host driven at once by suspend/resume commands over NATS (each a request round trip) | {ev[f'{n}_agents']} | one agent driven alone: {ev['one_agent']} | {f['aggregate_over_one']} |",
        "",
        f"What 10,000 hosts need from NATS, from this run's sizes (an event {ev_bytes} B with its "
        f"subject, a `capabilities` reply {cap_bytes} B) and stated assumptions:",
        "",
        "| what | figure | from |",
        "|---|---|---|",
        f"| client connections | {hosts:,} (+ controllers) | one per agent: ≈{hosts // 3:,} per node on a 3-node cluster (nats-server handles far more) |",
        f"| heartbeats + registry writes | {2 * hosts / hb_s:,.0f} msg/s | `heartbeat` host event and `virt_hosts` put every {hb_s} s per host |",
        f"| domain events, steady | {steady:,.0f} msg/s, {steady * ev_bytes / 1e6:.2f} MB/s | {vms} VMs per host, one event per VM per 10 min |",
        f"| domain events, evacuation burst | {burst:,.0f} msg/s, {burst * ev_bytes / 1e6:.2f} MB/s | 10% of hosts evacuated within 10 min, ~12 events per VM migration |",
        f"| VIRT_EVENTS storage, replicas 3, 7 days | {3 * 7 * 86400 * (steady + 2 * hosts / hb_s / 2) * ev_bytes / 1e9:,.0f} GB | steady events + heartbeats, `events_max_age_s` 7 days |",
        f"| scatter-gather to every host | ≈{per_host_ms * hosts / 1000:.1f} s at this run's {per_host_ms:.2f} ms per host (one requester, linear) | p50 above ÷ {n}; split across requesters or subject wildcards to go faster |",
    ]


def fault_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "Faults (the fault suite, tests/test_faults.py, run by the benchmark; recovery: from the "
        "end of the fault to the first JetStream acknowledgement, or for the SIGKILL case from "
        "the restart to the last event stored):",
        "",
        "| fault | events generated | stored | lost | duplicates | time to recover (s) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['fault']} | {r['generated']:,} | {r['stored']:,} | {r['lost']} | {r['duplicates']} | {r['recover_s']} |"
        for r in rows
    ]
    return lines


def update_readme(table: str) -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")


async def main() -> None:
    import libvirt  # noqa: PLC0415

    n = int(os.environ.get("BENCH_EVENTS", "120000"))
    res: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "libvirt": ".".join(
                str(libvirt.getVersion() // d % 1000) for d in (1_000_000, 1000, 1)
            ),
        },
    }
    with tempfile.TemporaryDirectory(prefix="virt-agent-bench-") as tmp:
        work = Path(tmp)
        with LibvirtDaemon(work, "bench") as daemon, NatsServer(work / "nats") as server:
            res["event_bridge"] = await event_bridge(daemon, server, work, n)
    with tempfile.TemporaryDirectory(prefix="virt-agent-cost-") as tmp:
        res["cost"] = await cost(Path(tmp))
    with tempfile.TemporaryDirectory(prefix="virt-agent-alloc-") as tmp:
        res["allocator"] = await allocator(Path(tmp))
    with tempfile.TemporaryDirectory(prefix="virt-agent-flood-") as tmp:
        res["flood"] = await flood(Path(tmp))
    if os.environ.get("BENCH_FLEET", "1") != "0":
        with tempfile.TemporaryDirectory(prefix="virt-agent-fleet-") as tmp:
            n_agents = int(os.environ.get("BENCH_FLEET_AGENTS", "24"))
            res["fleet"] = await run_fleet(Path(tmp), n_agents)
    if os.environ.get("BENCH_SOAK", "1") != "0":
        with tempfile.TemporaryDirectory(prefix="virt-agent-soak-") as tmp:
            res["soak"] = await soak(Path(tmp), int(os.environ.get("BENCH_SOAK_OPS", "100000")),
                                     int(os.environ.get("BENCH_SOAK_DOMAINS", "10000")))  # fmt: skip
    if os.environ.get("BENCH_FAULTS", "1") != "0":
        res["faults"] = fault_suite()
        res["campaign"] = campaign_suite()
    if os.environ.get("BENCH_LAB", "1") != "0":
        # a and b for the migration figures, c too for the drain
        with (Lab(hosts=3).session() as lab,
              tempfile.TemporaryDirectory(prefix="virt-agent-bench-lab-") as tmp):  # fmt: skip
            agents = await LabAgents(lab, Path(tmp)).start()
            try:
                res["lab"] = await lab_baselines(lab, agents)
                res["drain"] = await lab_drain(lab, agents)
            finally:
                await agents.stop()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "latest.json").write_text(json.dumps(res, indent=2) + "\n")
    table = render_table(res)
    update_readme(table)
    draw_timeline(res)
    print(table)


def draw_timeline(res: dict[str, Any]) -> None:
    """docs/failover-timeline.svg: one migrate_with_failover of each guest variant."""
    lines = (res.get("lab") or {}).get("timelines") or {}
    rows = [lines[k] for k in ("stock", "standby_rx") if k in lines]
    if rows:
        svg = timeline_svg(rows, "migrate_with_failover: steps, and the guest's 50 ms pings "
                           "(red: lost)")  # fmt: skip
        (ROOT / "docs" / "failover-timeline.svg").write_text(svg)


if __name__ == "__main__":
    if sys.argv[1:] == ["--render"]:
        # Re-draw the README table from the stored results, without measuring again.
        stored = json.loads((HERE / "results" / "latest.json").read_text())
        update_readme(render_table(stored))
        draw_timeline(stored)
    else:
        asyncio.run(main())
