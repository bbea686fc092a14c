"""Every domain's current state from the `virt_domains` bucket (contract v1.2, "Current
state"), then each change as it happens - no replay of VIRT_EVENTS. A value is trusted only
under its own key (`<host>.<uuid>`, the host its writer's credentials allow).
Run: python current_state.py [NATS_URL] [HOST]"""

import asyncio
import json
import sys

import nats


async def watch(url: str, host: str = "*", limit: int | None = None,
                inbox: str = "_INBOX") -> list[str]:  # fmt: skip
    nc = await nats.connect(url, inbox_prefix=inbox)
    kv = await nc.jetstream().key_value("virt_domains")
    said = []
    try:
        async for e in await kv.watch(f"{host}.*"):  # the current values first, then changes
            if e is None:
                line = "-- the current state is above; changes follow"
            elif e.operation in ("DEL", "PURGE"):
                line = f"{e.key}: gone from its host"
            else:
                v = json.loads(e.value)
                if e.key != f"{v['host']}.{v['uuid']}":
                    continue  # not under its own key: not that host's word
                line = f"{v['host']} {v['name']} {v['state']} ({v['reason']}) since {v['time']}"
            print(line, flush=True)
            said.append(line)
            if limit is not None and len(said) >= limit:
                break
    finally:
        await nc.close()
    return said


if __name__ == "__main__":
    asyncio.run(watch(*(sys.argv[1:3] or ["nats://127.0.0.1:4222"])))
