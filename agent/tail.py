"""`virt-agent events`: tail the bus, one readable line per event (or raw JSON)."""

from __future__ import annotations

import asyncio
import re
import sys
from typing import Any, TextIO

import msgspec
import nats
from nats.aio.msg import Msg

from agent.bus import subscribed

UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


def subjects_for(prefix: str, host: str | None, domain: str | None, etype: str | None) -> list[str]:
    """The narrowest subjects that cover the filters (a domain name is filtered client-side)."""
    h = host or "*"
    dom = domain if domain and UUID_RE.match(domain) else "*"
    t = etype or "*"
    out = [f"{prefix}.{h}.event.{dom}.{t}"]
    if domain is None:
        out.append(f"{prefix}.{h}.host.{t}")
    return out


def render(event: dict[str, Any]) -> str:
    """One line: time, host, sequence, type, domain, and the event's own fields."""
    data = event.get("data") or {}
    etype = str(event.get("type", "")).removeprefix("virt.")
    head = f"{event.get('time', '?')} {data.get('host', '?')} #{event.get('sequence', '?')} {etype}"
    dom = data.get("domain")
    if isinstance(dom, dict):
        head += f" {dom.get('name')} ({str(dom.get('uuid', ''))[:8]})"
    skip = {"host", "domain"}
    if etype == "domain.lifecycle":
        return f"{head} {data.get('event')}/{data.get('detail')}"
    if etype == "host.resync":
        names = ", ".join(f"{d['name']}={d['state']}" for d in data.get("domains", []))
        missed = data.get("missed")
        extra = f" missed={missed['count']}" if missed else ""
        return f"{head} reason={data.get('reason')}{extra} [{names}]"
    fields = " ".join(
        f"{k}={v}" for k, v in data.items() if k not in skip and v not in (None, [], {})
    )
    return f"{head} {fields}".rstrip()


def matches_domain(event: dict[str, Any], domain: str | None) -> bool:
    if domain is None:
        return True
    dom = (event.get("data") or {}).get("domain") or {}
    return domain in (dom.get("name"), dom.get("uuid"))


async def tail(
    urls: list[str],
    prefix: str,
    host: str | None,
    domain: str | None,
    etype: str | None,
    as_json: bool,
    out: TextIO = sys.stdout,
    limit: int | None = None,
) -> int:
    nc = await nats.connect(servers=urls, max_reconnect_attempts=-1, name="virt-agent events")
    done = asyncio.Event()
    seen = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal seen
        try:
            event = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            print(f"undecodable message on {msg.subject}: {msg.data[:200]!r}", file=sys.stderr)
            return
        if not isinstance(event, dict) or not matches_domain(event, domain):
            return
        print(msg.data.decode() if as_json else render(event), file=out, flush=True)
        seen += 1
        if limit is not None and seen >= limit:
            done.set()

    subjects = subjects_for(prefix, host, domain, etype)
    for subject in subjects:
        await nc.subscribe(subject, cb=on_msg)
    await subscribed(nc)
    print(f"# listening on {', '.join(subjects)}", file=sys.stderr, flush=True)
    try:
        await done.wait()
    finally:
        await nc.drain()
    return 0
