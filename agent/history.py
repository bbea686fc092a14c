"""`virt-agent history DOMAIN`: one VM's timeline across hosts from both streams - its
lifecycle and device events (VIRT_EVENTS, every host), and the operations on it (VIRT_OPS) -
in time order; a migration shows as `stopped/migrated` on one host, `resumed/migrated` on
the other, and the operation that moved it."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any, TextIO

import msgspec

from agent.bus import BusTarget
from agent.envelope import impersonation
from agent.fields import UUID_RE
from agent.streams import EVENTS_STREAM, OPS_STREAM, read_stream
from agent.tail import render


async def stored(
    nc: Any, stream: str, subject: str, since: datetime | None, prefix: str = "virt"
) -> list[Any]:
    """What `stream` holds on `subject`, decoded; an envelope that names another host than
    its subject is left out, and said on stderr."""
    out = []
    for m in await read_stream(nc, stream, subject, since):
        try:
            event = msgspec.json.decode(m.data)
        except msgspec.DecodeError:
            print(f"# not shown: undecodable message on {m.subject}", file=sys.stderr)
            continue
        forged = impersonation(m.subject, event, prefix) if isinstance(event, dict) else "?"
        if forged:
            print(f"# not shown: an envelope on {m.subject} names another host ({forged})",
                  file=sys.stderr)  # fmt: skip
            continue
        out.append(event)
    return out


def _field(event: dict[str, Any], outer: str, inner: str) -> Any:
    return ((event.get("data") or {}).get(outer) or {}).get(inner)


def render_op(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    op = data.get("operation") or {}
    dest = (op.get("progress") or {}).get("destination") or (op.get("result") or {}).get(
        "destination", ""
    )
    err = op.get("error") or {}
    tail = f" -> {dest}" if dest else ""
    tail += f" ({err.get('code')}: {err.get('message')})" if err else ""
    return (f"{event.get('time', '?')} {data.get('host', '?')} #{event.get('sequence', '?')} "
            f"operation {op.get('verb')} {op.get('id', '')[:8]} {op.get('state')} "
            f"step={op.get('step')}{tail}")  # fmt: skip


async def history(
    bus: BusTarget,
    domain: str,
    as_json: bool,
    since: datetime | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Print the timeline; 1 if nothing is stored for the domain."""
    nc = await bus.connect("virt-agent history")
    try:
        by_uuid = bool(UUID_RE.match(domain))
        every_host = bus.subjects("*")
        subject = every_host.event(domain if by_uuid else "*", ">")
        events = [e for e in await stored(nc, EVENTS_STREAM, subject, since, bus.prefix)
                  if by_uuid or _field(e, "domain", "name") == domain]  # fmt: skip
        uuids = {domain} if by_uuid else {e["subject"] for e in events if e.get("subject")}
        ops = [e for e in await stored(nc, OPS_STREAM, every_host.op(">"), since, bus.prefix)
               if _field(e, "operation", "domain") in uuids]  # fmt: skip
    finally:
        await nc.close()
    timeline = sorted(events + ops, key=lambda e: (e.get("time", ""), e.get("sequence", 0)))
    if not timeline:
        print(f"virt-agent history: nothing stored for domain {domain!r}", file=sys.stderr)
        return 1
    for e in timeline:
        if as_json:
            print(msgspec.json.encode(e).decode(), file=out)
        else:
            print(render_op(e) if str(e.get("type", "")).startswith("virt.operation.")
                  else render(e), file=out)  # fmt: skip
    return 0
