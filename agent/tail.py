"""`virt-agent events`: tail the bus, one readable line per event (or raw JSON) - live, or
replayed from VIRT_EVENTS (`--since`, `--last`) and then followed (`--follow`) through one
JetStream ordered consumer, so there is no seam between history and live: nothing twice,
nothing missing. Output is in `sequence` order within each boot."""

from __future__ import annotations

import asyncio
import collections
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import msgspec
from nats.aio.msg import Msg

from agent.bus import BusTarget, subscribed
from agent.envelope import Subjects, impersonation
from agent.fields import UUID_RE


def subjects_for(prefix: str, host: str | None, domain: str | None, etype: str | None) -> list[str]:
    """The narrowest subjects that cover the filters (a domain name is filtered client-side)."""
    h = host or "*"
    dom = domain if domain and UUID_RE.match(domain) else "*"
    t = etype or "*"
    subjects = Subjects(prefix, h)
    out = [subjects.event(dom, t)]
    if domain is None:
        out.append(subjects.host_event(t))
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


class Reorder:
    """Live events in `sequence` order within each boot, each once.

    A subscriber sees every publish attempt: a message re-sent after a lost acknowledgement
    comes again, and one lost on a broken connection comes after what followed it. An event
    is held up to `window_s` for earlier ones of its boot still on their way; one that comes
    later than that is printed when it comes (out of order, never dropped); an id already
    printed is not printed again."""

    def __init__(self, window_s: float, remember: int = 100_000) -> None:
        self.window_s = window_s
        self._held: list[tuple[str, int, float, dict[str, Any], bytes]] = []
        self._printed: dict[str, None] = {}  # ids, oldest first (bounded)
        self._remember = remember

    @staticmethod
    def _boot(event: dict[str, Any]) -> str:
        return str(event.get("id", "")).rpartition(":")[0]

    def push(self, event: dict[str, Any], raw: bytes, now: float) -> None:
        eid = str(event.get("id", ""))
        if eid in self._printed or any(h[3].get("id") == eid for h in self._held):
            return
        seq = event.get("sequence")
        self._held.append((self._boot(event), seq if isinstance(seq, int) else 0, now, event, raw))

    def due(self, now: float) -> list[tuple[dict[str, Any], bytes]]:
        """What may be printed now: every held event whose window passed, and before it the
        earlier ones of its boot."""
        ripe = {b for b, _, t, _, _ in self._held if now - t >= self.window_s}
        if not ripe:
            return []
        cut = {b: max(s for b2, s, t, _, _ in self._held if b2 == b and now - t >= self.window_s)
               for b in ripe}  # fmt: skip
        out = sorted((h for h in self._held if h[0] in cut and h[1] <= cut[h[0]]),
                     key=lambda h: (h[0], h[1]))  # fmt: skip
        self._held = [h for h in self._held if not (h[0] in cut and h[1] <= cut[h[0]])]
        return self._mark(out)

    def drain(self) -> list[tuple[dict[str, Any], bytes]]:
        out = sorted(self._held, key=lambda h: (h[0], h[1]))
        self._held = []
        return self._mark(out)

    def _mark(
        self, held: list[tuple[str, int, float, dict[str, Any], bytes]]
    ) -> list[tuple[dict[str, Any], bytes]]:
        for h in held:
            self._printed[str(h[3].get("id", ""))] = None
        while len(self._printed) > self._remember:
            del self._printed[next(iter(self._printed))]
        return [(h[3], h[4]) for h in held]


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`90s`, `30m`, `2h`, `7d` ago, or an ISO 8601 time (`2026-11-30T10:00Z`; UTC if no zone)."""
    now = now or datetime.now(UTC)
    m = _DURATION.match(text.strip())
    if m:
        seconds = float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"--since {text!r}: too far back") from None
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (90s, 30m, 2h, 7d) or an ISO 8601 "
                         "time (2026-11-30T10:00Z)") from None  # fmt: skip
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def subject_matches(subject: str, pattern: str) -> bool:
    """NATS wildcard matching (`*` one token, `>` the rest)."""
    s, p = subject.split("."), pattern.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(s) == len(p)


def matches_domain(event: dict[str, Any], domain: str | None) -> bool:
    if domain is None:
        return True
    dom = (event.get("data") or {}).get("domain") or {}
    return domain in (dom.get("name"), dom.get("uuid"))


async def tail(
    bus: BusTarget,
    host: str | None,
    domain: str | None,
    etype: str | None,
    as_json: bool,
    out: TextIO = sys.stdout,
    limit: int | None = None,
    reorder_s: float = 1.0,
    since: datetime | None = None,
    last: int | None = None,
    follow: bool = True,
) -> int:
    """Live (neither `since` nor `last`), or replayed from the stream - from `since`, the last
    `last` of them, or both - then followed if `follow`."""
    nc = await bus.connect("virt-agent events", allow_reconnect=True, max_reconnect_attempts=-1)
    prefix = bus.prefix
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    order = Reorder(reorder_s)
    seen = 0

    def emit(ready: list[tuple[dict[str, Any], bytes]]) -> None:
        nonlocal seen
        for event, raw in ready:
            if limit is not None and seen >= limit:
                break
            print(raw.decode() if as_json else render(event), file=out, flush=True)
            seen += 1
        if limit is not None and seen >= limit:
            done.set()

    async def on_msg(msg: Msg) -> None:
        if not msg.data and msg.subject.endswith(".host.batch_commit"):
            return  # the end of a fast-ingest batch: never stored, no event (agent/batching.py)
        try:
            event = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            print(f"undecodable message on {msg.subject}: {msg.data[:200]!r}", file=sys.stderr)
            return
        if not isinstance(event, dict) or not matches_domain(event, domain):
            return
        forged = impersonation(msg.subject, event, prefix)
        if forged:
            print(f"# not shown: an envelope on {msg.subject} names another host ({forged})",
                  file=sys.stderr, flush=True)  # fmt: skip
            return
        order.push(event, msg.data, loop.time())
        if reorder_s <= 0:
            emit(order.drain())

    async def release() -> None:
        while True:
            await asyncio.sleep(min(0.1, max(reorder_s / 4, 0.01)))
            emit(order.due(loop.time()))

    subjects = subjects_for(prefix, host, domain, etype)
    releaser = asyncio.create_task(release())
    try:
        if since is None and last is None:
            for subject in subjects:
                await nc.subscribe(subject, cb=on_msg)
            await subscribed(nc)
            print(f"# listening on {', '.join(subjects)}", file=sys.stderr, flush=True)
            await done.wait()
        else:
            await _replay(nc, subjects, since, last, follow, on_msg, done)
    finally:
        releaser.cancel()
        emit(order.drain())  # also on Ctrl-C: what was held is printed
        await nc.drain()
    return 0


async def _replay(
    nc: Any,
    subjects: list[str],
    since: datetime | None,
    last: int | None,
    follow: bool,
    on_msg: Any,
    done: asyncio.Event,
) -> None:
    """One ordered consumer on VIRT_EVENTS: what is stored (from `since`; of it, the last
    `last` once caught up), then - with `follow` - what is stored from then on."""
    from nats.js.api import ConsumerConfig, DeliverPolicy  # noqa: PLC0415

    from agent.streams import EVENTS_STREAM  # noqa: PLC0415

    js = nc.jetstream()
    info = await js.stream_info(EVENTS_STREAM)
    # One consumer filter: the subject itself, or the host's (or every host's) whole tree.
    tokens = subjects[0].split(".")
    filt = subjects[0] if len(subjects) == 1 else ".".join([*tokens[:2], ">"])
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=since.astimezone(UTC).isoformat())  # fmt: skip
    print(f"# replaying {filt} from {EVENTS_STREAM}"
          + (f" since {since.isoformat()}" if since else "")
          + (f", the last {last}" if last else "") + (", then following" if follow else ""),
          file=sys.stderr, flush=True)  # fmt: skip
    if info.state.messages == 0 and not follow:
        return
    sub = await js.subscribe(filt, stream=EVENTS_STREAM, ordered_consumer=True, config=config)
    # With --last, what is stored is held until caught up, then its last N go out.
    held: collections.deque[Msg] = collections.deque(maxlen=last or None)
    caught_up = info.state.messages == 0
    try:
        while not done.is_set() and (follow or not caught_up):
            try:
                msg: Msg | None = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                msg = None  # nothing (more) stored under the filter: caught up
            if msg is not None and any(subject_matches(msg.subject, s) for s in subjects):
                if last and not caught_up:
                    held.append(msg)
                else:
                    await on_msg(msg)
            if not caught_up and (msg is None or msg.metadata.num_pending == 0):
                caught_up = True
                while held:
                    await on_msg(held.popleft())
    finally:
        await sub.unsubscribe()
