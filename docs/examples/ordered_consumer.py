"""Read VIRT_EVENTS in `sequence` order within each boot and name every gap that no `resync`
(`missed`) or `spool_overflow` accounts for. An envelope that names another host than its
subject's host token is forged (contract v1.2, "Contained hosts") and skipped.
Run: python ordered_consumer.py [NATS_URL]"""

import asyncio
import json
import sys

import nats


async def consume(
    url: str, durable: str = "monitor", limit: int | None = None, inbox: str = "_INBOX"
) -> list[str]:
    nc = await nats.connect(url, inbox_prefix=inbox)
    sub = await nc.jetstream().subscribe("virt.*.>", stream="VIRT_EVENTS", durable=durable)
    last: dict[str, int] = {}  # "<host>:<boot_id>" -> highest sequence seen
    named: set[tuple[str, int]] = set()  # sequences a resync or spool_overflow accounted for
    said = []
    try:
        while limit is None or limit > 0:
            msg = await sub.next_msg(timeout=None)
            ev = json.loads(msg.data)
            host = msg.subject.split(".")[1]  # virt.<host>.event... : the server checked it
            if (
                ev.get("source") != f"/virt/{host}"
                or ev["data"].get("host", host) != host
                or not ev["id"].startswith(host + ":")
            ):
                said.append(f"forged: {msg.subject} carries {ev.get('source')} {ev.get('id')}")
                print(said[-1], flush=True)
            else:
                check(ev, last, named, said)
            await msg.ack()
            limit = None if limit is None else limit - 1
    finally:
        await nc.close()
    return said


def check(ev: dict, last: dict[str, int], named: set[tuple[str, int]], said: list[str]) -> None:
    """One event of a host: a gap before it that nothing accounts for is said."""
    boot, _, tail = ev["id"].rpartition(":")
    seq = int(tail)
    if ev["type"] == "virt.host.resync":
        gone = ev["data"].get("missed")
    elif ev["type"] == "virt.host.spool_overflow":
        gone = ev["data"]
    else:
        gone = None
    if gone:
        first, end = gone["first_sequence"], gone["last_sequence"] + 1
        named.update((boot, s) for s in range(first, end))
    prev = last.get(boot, 0)
    unnamed = [s for s in range(prev + 1, seq) if (boot, s) not in named]
    if unnamed:
        said.append(f"{boot}: not (yet) seen {unnamed[0]}..{unnamed[-1]}")
        print(said[-1], flush=True)
    last[boot] = max(prev, seq)  # a late one (seq < prev) fills a gap said before


if __name__ == "__main__":
    asyncio.run(consume(sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"))
