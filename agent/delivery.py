"""Where a message waits for its turn, oldest first: the memory queue or the on-disk spool.

New messages wait in memory while NATS is connected and the queue holds fewer than
`spool_after`. Otherwise - also before NATS is first attached, and at start while a previous
process's spool has unread messages - they are rendered and appended to the spool, and from
then on every new message goes there, until the spool has been read to its end with NATS
connected and nothing older waits in memory: then memory again. What the disk refuses (full,
failing) is held in memory behind the spool, in order; a domain event beyond the queue's bound
is not kept there (the publisher counts it as dropped, and the next resync names it), host and
operation events always are. The publisher renders, sends and acknowledges
(agent/publisher.py); this module decides where each message waits."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.envelope import Missed
from agent.events import DomainEvent
from agent.metrics import Metrics
from agent.settings import PublisherSettings
from agent.spool import Dropped, Record, Spool

log = structlog.get_logger("agent.delivery")


@dataclass(slots=True)
class DomainItem:
    """A libvirt domain event waiting to be rendered (dropped, counted, when the queue is
    full)."""

    sequence: int
    event: DomainEvent
    time_ns: int


@dataclass(slots=True)
class OtherItem:
    """A host or operation event: never dropped; its data, subject and CloudEvents type."""

    sequence: int
    data: Any
    time_ns: int
    subject: str
    ce_type: str


Queued = DomainItem | OtherItem


class Delivery:
    def __init__(
        self,
        settings: PublisherSettings,
        spool: Spool | None,
        metrics: Metrics,
        connected: Callable[[], bool],
        render: Callable[[Queued], Record],
    ) -> None:
        self.spool = spool
        self.queue: deque[Queued] = deque()
        # Messages the spool could not take (disk full): newer than everything spooled, sent
        # once the spool has nothing unread; while any wait here, new ones queue behind them.
        self.held: deque[Queued] = deque()
        # Appending to the spool instead of the memory queue (also at start, if a previous
        # process left messages there: they go first).
        self.spooling = spool is not None and not spool.empty()
        self.spool_after = min(settings.spool_after, settings.queue_size // 2)
        self.queue_size = settings.queue_size
        self.spooled = 0
        self._spool_error = False  # the last spool write failed (logged once per streak)
        self._connected = connected
        self._render = render
        self.metrics = metrics
        metrics.track(metrics.queue_depth, lambda: self.depth)
        if spool is not None:
            metrics.track(metrics.spool_depth, lambda: spool.depth)
            metrics.track(metrics.spool_bytes, lambda: spool.bytes)

    @property
    def depth(self) -> int:
        return len(self.queue) + len(self.held)

    def empty(self) -> bool:
        """Nothing waits: not in memory, not held, nothing unread in the spool."""
        return not self.queue and not self.held and (self.spool is None or self.spool.empty())

    def to_spool_now(self) -> bool:
        """Whether a new message goes to the spool (see the module's docstring)."""
        if self.spool is None:
            return False
        if not self.spooling:
            connected = self._connected()
            if len(self.queue) >= self.spool_after or not connected:
                self.spooling = True
                log.warning("spooling to disk", queued=len(self.queue),
                            nats_connected=connected)  # fmt: skip
        return self.spooling

    def to_spool(self, item: Queued) -> tuple[bool, Dropped | None]:
        """Append `item` to the spool - or hold it, behind what is held already or when the
        disk refuses it. (kept, what the spool's bound gave up to take it): not kept only for
        a domain event with the held messages at the queue's bound."""
        assert self.spool is not None
        if self.held:
            return self.hold(item), None
        try:
            dropped = self.spool.append(self._render(item))
        except OSError as exc:
            self.metrics.spool_write_errors.inc()
            if not self._spool_error:
                self._spool_error = True
                log.error("spool write failed; messages wait in memory behind it",  # noqa: TRY400
                          error=str(exc), directory=str(self.spool.dir))  # fmt: skip
            return self.hold(item), None
        self._spool_error = False
        self.spooled += 1
        self.metrics.spooled.inc()
        if dropped is not None:
            self.metrics.spool_dropped.inc(dropped.count)
        return True, dropped

    def hold(self, item: Queued) -> bool:
        """Keep in memory what the spool could not take; False for a domain event beyond the
        queue's bound (the caller drops it)."""
        if isinstance(item, DomainItem) and len(self.held) >= self.queue_size:
            return False
        self.held.append(item)
        return True

    def back_to_memory(self) -> None:
        """The spool was read to its end, nothing is held and NATS is there: new messages go
        to memory again (once per outage)."""
        if self.spooling and not self.queue and self._connected():
            self.spooling = False
            log.info("spool drained; back to the memory queue", spooled=self.spooled)

    def spill(self, in_flight: list[Record]) -> None:
        """At a shutdown that could not flush: what only memory holds - `in_flight` (sent,
        unacknowledged), the queue, what the disk refused - goes to the spool, each message
        where its sequence number puts it among the spooled ones, for the next process."""
        spool = self.spool
        if spool is None:
            return
        memory = in_flight + [self._render(item) for item in (*self.queue, *self.held)]
        self.queue.clear()
        self.held.clear()
        try:
            spool.merge(memory)
        except OSError as exc:
            log.error("could not keep unsent messages for the next start; they are lost",  # noqa: TRY400
                      messages=len(memory), error=str(exc))  # fmt: skip
            return
        if memory:
            log.warning("kept in the spool for the next start", messages=len(memory))


class Gaps:
    """Sequence numbers never published - dropped at a full queue, or a resync too large to
    send - for the next resync to name (`missed`)."""

    def __init__(self) -> None:
        self.missed: Missed | None = None
        # Set once an overflow has happened and the queue has drained below the low watermark.
        self.resync_needed = asyncio.Event()
        # Why the next of those resyncs: after dropped events, or one too large to send.
        self.resync_reason = "overflow"

    def note(self, sequence: int) -> None:
        """One more sequence number never published, for the next resync to name."""
        m = self.missed
        self.missed = Missed(
            count=(m.count if m else 0) + 1,
            first_sequence=sequence if m is None else min(m.first_sequence, sequence),
            last_sequence=sequence if m is None else max(m.last_sequence, sequence),
        )

    def take(self) -> Missed | None:
        """Hand the record of dropped events to the resync that will cover them."""
        missed, self.missed = self.missed, None
        self.resync_needed.clear()
        return missed

    def restore(self, missed: Missed | None) -> None:
        """Put back a record taken for a resync that could not be published."""
        if missed is None:
            return
        m = self.missed
        if m is not None:
            missed = Missed(
                count=missed.count + m.count,
                first_sequence=missed.first_sequence,
                last_sequence=m.last_sequence,
            )
        self.missed = missed
        self.resync_needed.set()
