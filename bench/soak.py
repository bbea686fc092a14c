"""A soak of the agent's own state: many short operations and many domains created and
removed, against one agent process. What must stay bounded is what grows with uptime - the
journal's operations and idempotency outcomes, the per-domain lock and inference tables, the
process's memory - and what is measured is whether it does.

A libvirtd serves the test driver over TCP; the agent runs as a real process with small
journal bounds. A client defines and starts domains, sends each `migrate` operations (with
`request_id`s) to a registered destination whose libvirt cannot take them (each one a short
operation that starts, runs its step and fails in milliseconds), and destroys and undefines
the domain afterwards, `window` domains at a time. Every tenth of the run it samples the
agent's RSS and the rows of its journal (its SQLite file).

`python -m bench.soak [OPS] [DOMAINS]` runs it alone; `make bench` runs the full size."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import msgspec
import nats
import psutil

from agent.bus import subscribed
from agent.embedded import NatsServer, stop_process
from agent.envelope import FINAL
from agent.registry import Registration, Registry, open_bucket
from lab.agents import agent_env, answering
from lab.daemon import LibvirtDaemon, free_port

ROOT = Path(__file__).resolve().parent.parent
DOMAIN_XML = """<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>
<os><type>hvm</type></os></domain>"""
# The journal bounds the agent runs with: small, so that a soak of this size crosses them
# many times over.
OPERATIONS_MAX = 1000
IDEMPOTENCY_WINDOW_S = 5.0


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / (1024 * 1024)


def domain_entries(http: str) -> dict[str, float]:
    """The agent's `virt_agent_domain_entries`, by table."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {line.split('table="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("virt_agent_domain_entries{")}  # fmt: skip


def journal_rows(db: Path) -> dict[str, int]:
    """Rows in the agent's journal, read from its SQLite file (WAL: a reader beside it)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as c:
        return {f"{t}_rows": c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("operations", "requests")}  # fmt: skip


async def soak(
    work: Path, ops: int = 100_000, domains: int = 10_000, window: int = 16
) -> dict[str, Any]:
    """Run the soak; the samples and the figures (see the module's docstring)."""
    import libvirt  # noqa: PLC0415

    per_domain = max(1, ops // domains)
    host = "soak"
    http = f"127.0.0.1:{free_port()}"
    db = work / "state" / "operations.db"
    with LibvirtDaemon(work, "soak") as daemon, NatsServer(work / "nats") as server:
        env = agent_env(VIRT_AGENT_LOG_FORMAT="json",
                        VIRT_AGENT_COMMANDS_OPERATIONS_MAX=str(OPERATIONS_MAX),
                        VIRT_AGENT_COMMANDS_IDEMPOTENCY_WINDOW_S=str(IDEMPOTENCY_WINDOW_S),
                        VIRT_AGENT_COMMANDS_MAX_OPERATIONS=str(window))  # fmt: skip
        with open(work / "agent.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--libvirt-uri", daemon.test_uri,
                 "--nats-url", server.url, "--host-id", host, "--state-dir",
                 str(work / "state"), "--http-addr", http],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        nc = await nats.connect(server.url)
        conn = await asyncio.to_thread(libvirt.open, daemon.test_uri)
        beating: asyncio.Task[None] | None = None
        try:
            await answering(nc, [host], timeout=60)
            # A destination whose libvirt (a test driver of its own) cannot take a migration.
            # Written again like a live agent's heartbeat: the bucket's entries expire.
            js = nc.jetstream()
            registry = Registry(await open_bucket(nc, 3600, 1), js)
            dest = Registration(host="soak-dest", boot_id="b", version="0",
                                libvirt_uri="test:///default", migration_uri="",
                                capabilities=None, updated=0.0)  # fmt: skip
            await registry.publish(dest)

            async def heartbeat() -> None:
                while True:
                    await asyncio.sleep(5)
                    await registry.publish(dest)

            beating = asyncio.create_task(heartbeat())
            finals: dict[str, asyncio.Future[str]] = {}
            early: dict[str, str] = {}

            async def on_op(msg: Any) -> None:
                op = msgspec.json.decode(msg.data)["data"]["operation"]
                if op["state"] in FINAL:
                    fut = finals.pop(op["id"], None)
                    if fut is None:
                        early[op["id"]] = op["state"]
                    elif not fut.done():
                        fut.set_result(op["state"])

            entries_start = await asyncio.to_thread(domain_entries, http)
            await nc.subscribe(f"virt.{host}.op.>", cb=on_op)
            await subscribed(nc)
            states: dict[str, int] = {}
            samples: list[dict[str, Any]] = []
            done = domains_done = 0
            t0 = time.monotonic()

            async def one_domain(i: int) -> None:
                nonlocal done, domains_done
                name = f"soak{i}"
                dom = await asyncio.to_thread(conn.defineXML, DOMAIN_XML.format(name=name))
                await asyncio.to_thread(dom.create)
                for _ in range(per_domain):
                    reply = msgspec.json.decode((await nc.request(
                        f"virt.{host}.cmd.migrate",
                        msgspec.json.encode({"domain": name, "destination": "soak-dest",
                                             "request_id": uuid.uuid4().hex}),
                        timeout=60,
                    )).data)  # fmt: skip
                    if not reply.get("ok"):
                        raise RuntimeError(f"migrate refused: {reply}")
                    op_id = reply["result"]["operation_id"]
                    if op_id in early:
                        state = early.pop(op_id)
                    else:
                        fut = finals[op_id] = asyncio.get_running_loop().create_future()
                        state = await asyncio.wait_for(fut, 60)
                    states[state] = states.get(state, 0) + 1
                    done += 1
                await asyncio.to_thread(dom.destroy)
                await asyncio.to_thread(dom.undefine)
                domains_done += 1

            sem = asyncio.Semaphore(window)
            next_sample = 0

            async def bounded(i: int) -> None:
                nonlocal next_sample
                async with sem:
                    await one_domain(i)
                if done >= next_sample:
                    next_sample += max(1, ops // 10)
                    samples.append({"operations": done, "domains": domains_done,
                                     "elapsed_s": round(time.monotonic() - t0, 1),
                                     "rss_mb": round(rss_mb(proc.pid), 1),
                                     **await asyncio.to_thread(journal_rows, db)})  # fmt: skip

            await asyncio.gather(*(bounded(i) for i in range(domains)))
            samples.append({"operations": done, "domains": domains,
                            "elapsed_s": round(time.monotonic() - t0, 1),
                            "rss_mb": round(rss_mb(proc.pid), 1),
                            **await asyncio.to_thread(journal_rows, db)})  # fmt: skip
            alive = proc.poll() is None
            # The last domains' events reach the agent's tables, a back-off of one that
            # vanished mid-look ends by the next full reconcile pass: given 30 s.
            deadline = time.monotonic() + 30
            while True:
                entries = await asyncio.to_thread(domain_entries, http)
                if entries == entries_start or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        finally:
            if beating is not None:
                beating.cancel()
            await nc.close()
            await asyncio.to_thread(conn.close)
            stop_process(proc)
    warm = samples[min(1, len(samples) - 1)]
    return {
        "operations": done,
        "domains": domains,
        "states": states,
        "ops_per_s": round(done / max(1e-9, samples[-1]["elapsed_s"]), 1),
        "operations_max": OPERATIONS_MAX,
        "max_operation_rows": max(s.get("operations_rows", 0) for s in samples),
        "max_request_rows": max(s.get("requests_rows", 0) for s in samples),
        "rss_warm_mb": warm["rss_mb"],
        "rss_end_mb": samples[-1]["rss_mb"],
        "rss_end_over_warm": round(samples[-1]["rss_mb"] / warm["rss_mb"], 3),
        "agent_alive": alive,
        # Before, and after the run (every soak domain gone, nothing running).
        "domain_entries_start": entries_start,
        "domain_entries_end": entries,
        "samples": samples,
    }


if __name__ == "__main__":
    n_ops = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    n_domains = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    with tempfile.TemporaryDirectory(prefix="virt-agent-soak-") as tmp:
        result = asyncio.run(soak(Path(tmp), n_ops, n_domains))
    print(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
    os._exit(0)
