"""Following one long operation from the bus: its events on `virt.<host>.op.<id>` read from
JetStream (VIRT_OPS, so nothing published before the subscription is missed), until its final
state; and a one-line rendering of its progress for a terminal."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from agent.envelope import FINAL
from agent.errors import Timeout

MIB = 1024 * 1024


async def follow(
    nc: NATS,
    subject: str,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Every update of the operation published on `subject`, until its final state (returned)."""
    js = nc.jetstream()
    sub = await js.subscribe(subject, ordered_consumer=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"operation not finished within {timeout}s", subject=subject)
            try:
                msg = await sub.next_msg(timeout=min(left, 5.0))
            except TimeoutError:
                continue
            op: dict[str, Any] = msgspec.json.decode(msg.data)["data"]["operation"]
            if on_update is not None:
                on_update(op)
            if op["state"] in FINAL:
                return op
    finally:
        await sub.unsubscribe()


def render(op: dict[str, Any], width: int = 24) -> str:
    """`migrate  [██████░░░░] 61%  12.0 MiB left  dirty 1.2 MiB/s  downtime ~30 ms  (3.2 s)`"""
    done = "  ".join(
        f"{s['step']} {s['duration_s']:.2f}s" for s in op["steps"] if "duration_s" in s
    )
    p = op.get("progress") or {}
    pct = p.get("percent")
    parts = [f"{op['step'] or op['state']:<9}"]
    t = p.get("totals") or _final_totals(op)
    if t:  # a drain: where its domains are
        parts.append(
            f"planned {t['planned']}  queued {t['queued']}  running {t['running']}  "
            f"moved {t['succeeded']}  failed {t['failed']}  unplaced {t['unplaced']}"
        )
    if pct is not None:
        n = round(width * min(max(pct, 0), 100) / 100)
        parts.append(f"[{'█' * n}{'░' * (width - n)}] {pct:5.1f}%")
    if p.get("data_remaining") is not None:
        parts.append(f"{p['data_remaining'] / MIB:.1f} MiB left")
    if p.get("memory_dirty_rate"):
        parts.append(f"dirty {p['memory_dirty_rate'] / MIB:.1f} MiB/s")
    if p.get("expected_downtime_ms") is not None:
        parts.append(f"downtime ~{p['expected_downtime_ms']} ms")
    if p.get("postcopy"):
        parts.append("post-copy")
    line = "  ".join(parts)
    return f"{line}   | {done}" if done else line


def _final_totals(op: dict[str, Any]) -> dict[str, int] | None:
    """A drain's totals once it ended: in its result, or in its error's details."""
    result = op.get("result")
    if isinstance(result, dict) and result.get("totals"):
        return result["totals"]  # type: ignore[no-any-return]
    details = (op.get("error") or {}).get("details") or {}
    return details.get("totals")


def printer(stream: Any, tty: bool) -> Callable[[dict[str, Any]], None]:
    """An on_update that redraws one line on a terminal, or prints each change otherwise."""
    last = [""]

    def show(op: dict[str, Any]) -> None:
        line = render(op)
        if tty:
            stream.write("\r\x1b[2K" + line)
            if op["state"] in FINAL:
                stream.write("\n")
        elif line != last[0]:
            stream.write(line + "\n")
        last[0] = line
        stream.flush()

    return show
