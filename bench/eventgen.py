"""Benchmark helpers run as separate processes: the event generator and the bare listener.

python -m bench.eventgen generate URI COUNT [--rate R]
    suspend/resume one test-driver domain COUNT times (2 events each), as fast as possible
    or paced at R events/s; prints {"events": n, "seconds": t} as JSON.
python -m bench.eventgen listen URI COUNT
    the baseline: a bare libvirtaio listener counting lifecycle events until COUNT arrive;
    prints {"events": n, "first_ns": .., "last_ns": .., "rss_kib": .., "cpu_s": ..} as JSON
    (cpu_s: its CPU time from ready to the last event).
python -m bench.eventgen natspub NATS_URL SUBJECT COUNT RATE
    the latency baseline: plain NATS messages stamped with their send time.
python -m bench.eventgen jspub NATS_URL SUBJECT COUNT RATE
    the same as JetStream publishes, each awaited (its stream made by the caller): the
    baseline of what a JetStream publisher's message takes to reach a subscriber.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid

import libvirt
import libvirtaio
import psutil

DOMAIN_XML = """<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>
<os><type>hvm</type></os></domain>"""


def rss_kib(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default), KiB."""
    return int(psutil.Process(pid).memory_info().rss // 1024)


def generate(uri: str, pairs: int, rate: float | None) -> None:
    conn = libvirt.open(uri)
    dom = conn.defineXML(DOMAIN_XML.format(name=f"bench-{uuid.uuid4().hex[:8]}"))
    dom.create()
    print("ready", flush=True)
    sys.stdin.readline()  # the orchestrator says go once its listeners are in place
    interval = 2.0 / rate if rate else 0.0
    start = time.perf_counter()
    for i in range(pairs):
        if interval:
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        dom.suspend()
        dom.resume()
    elapsed = time.perf_counter() - start
    dom.destroy()
    dom.undefine()
    conn.close()
    print(json.dumps({"events": pairs * 2, "seconds": elapsed}), flush=True)


async def listen(uri: str, count: int) -> None:
    libvirtaio.virEventRegisterAsyncIOImpl()
    conn = libvirt.open(uri)
    seen = 0
    first = last = 0
    done = asyncio.Event()

    def cb(_c: object, _d: object, event: int, _detail: int, _o: object) -> None:
        nonlocal seen, first, last
        if event not in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            return
        last = time.time_ns()
        if not seen:
            first = last
        seen += 1
        if seen >= count:
            done.set()

    conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)
    print("ready", flush=True)
    cpu0 = time.process_time()
    try:
        await asyncio.wait_for(done.wait(), 600)
    finally:
        cpu = time.process_time() - cpu0
        out = {"events": seen, "first_ns": first, "last_ns": last, "rss_kib": rss_kib(),
               "cpu_s": cpu}  # fmt: skip
        print(json.dumps(out), flush=True)
        conn.close()


async def natspub(url: str, subject: str, count: int, rate: float, js: bool = False) -> None:
    """Latency baseline: plain NATS publishes carrying their send time, paced at `rate`/s
    (`js`: JetStream publishes, each acknowledgement awaited)."""
    import nats  # noqa: PLC0415 - only this role needs it

    nc = await nats.connect(url)
    jsc = nc.jetstream()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        data = json.dumps({"t": time.time_ns()}).encode()
        if js:
            await jsc.publish(subject, data)
        else:
            await nc.publish(subject, data)
    await nc.flush()
    await nc.close()
    print(json.dumps({"events": count, "seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    cmd, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "generate":
        r = float(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--rate" else None
        generate(target, n // 2, r)
    elif cmd in ("natspub", "jspub"):
        asyncio.run(natspub(target, sys.argv[4], n, float(sys.argv[5]), cmd == "jspub"))
    else:
        asyncio.run(listen(target, n))
