"""What a `failover.reserve` costs the destination: the allocator scans every domain's live and
persistent definition (and the networks) under its lock before it decides. Measured with N
domains defined on a libvirtd serving the test driver, as a ratio to `virsh list --all` of the
same libvirtd in the same run (what an operator's own look at the host costs).

    python -m bench.allocator        (also part of `make bench`)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from agent.hypervisor import Hypervisor
from agent.journal import Journal
from agent.metrics import Metrics
from agent.pool import Pool
from agent.settings import DeviceSettings, FailoverSettings, LibvirtSettings
from lab.daemon import LibvirtDaemon

ROUNDS = 15
SIZES = (10, 100, 1000)


def define(uri: str, n: int, start: int) -> None:
    conn = libvirt.open(uri)
    try:
        for i in range(start, n):
            vf = (f"<interface type='hostdev' managed='yes'><mac address='52:54:00:00:{i // 256:02x}:"
                  f"{i % 256:02x}'/><source><address type='pci' domain='0x0000' bus='0x{40 + i // 256:02x}'"
                  f" slot='0x{i % 32:02x}' function='0x{i // 32 % 8:x}'/></source></interface>")  # fmt: skip
            dom = conn.defineXML(
                f"<domain type='test'><name>alloc{i}</name><memory>65536</memory><os><type>hvm"
                f"</type></os><devices>{vf}</devices></domain>"
            )
            if i % 2 == 0:
                dom.create()  # half of them run: a live and a persistent definition each
    finally:
        conn.close()


def virsh_list(uri: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["virsh", "-c", uri, "list", "--all"], check=True, capture_output=True)
    return time.perf_counter() - t0


async def measure(daemon: LibvirtDaemon, work: Path) -> dict[str, Any]:
    uri = daemon.test_uri
    hv = Hypervisor(LibvirtSettings(), uri, "bench", lambda _e: None, Metrics())
    await hv.connect()
    pool = Pool(FailoverSettings(pool_pci=["0000:3b:02.0"]), DeviceSettings(),
                Journal(work / "ops.db"), hv)  # fmt: skip
    out: dict[str, Any] = {"rounds": ROUNDS, "sizes": {}}
    defined = 0
    try:
        for n in SIZES:
            await asyncio.to_thread(define, uri, n, defined)
            defined = n
            reserve_s, virsh_s = [], []
            for i in range(ROUNDS):
                t0 = time.perf_counter()
                r = await pool.reserve(f"{n:04x}{i:04x}", "bench")
                reserve_s.append(time.perf_counter() - t0)
                await pool.release(r.id)
                virsh_s.append(await asyncio.to_thread(virsh_list, uri))
            res_ms = statistics.median(reserve_s) * 1000
            virsh_ms = statistics.median(virsh_s) * 1000
            out["sizes"][str(n)] = {"reserve_ms_p50": round(res_ms, 2),
                                    "virsh_list_all_ms_p50": round(virsh_ms, 2),
                                    "ratio": round(res_ms / virsh_ms, 2)}  # fmt: skip
    finally:
        await hv.close()
    return out


async def allocator(work: Path) -> dict[str, Any]:
    with LibvirtDaemon(work, "alloc") as daemon:
        return await measure(daemon, work)


def allocator_table(a: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "What `failover.reserve` costs the destination: the allocator's scan of every domain's "
        "live and persistent definition under its lock, against `virsh list --all` of the same "
        f"libvirtd (test driver over TCP, half the domains running), median of {a['rounds']}:",
        "",
        "| domains defined | reserve (ms) | `virsh list --all` (ms) | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {s['reserve_ms_p50']} | {s['virsh_list_all_ms_p50']} | {s['ratio']} |"
        for n, s in a["sizes"].items()
    ]
    return lines


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="virt-agent-alloc-") as tmp:
        result = asyncio.run(allocator(Path(tmp)))
    print(json.dumps(result, indent=2))
    print("\n".join(allocator_table(result)))
