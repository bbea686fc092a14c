"""Where a typed event becomes a JetStream message: bounded queue, sequence, pipelined publish.

The libvirt callbacks call `submit_event` on the loop thread; it stamps the next sequence number
and queues the event, or - when the bounded queue is full - counts it as dropped, which leaves a
gap in `sequence` that the next `resync` host event names. The publisher task renders the
CloudEvents envelope and sends it with a reply inbox of its own; acknowledgements are matched by
token, so many publishes are in flight at once (bounded by `max_inflight`) instead of one
awaited round trip per event. An unacknowledged message is sent again with the same
Nats-Msg-Id, so JetStream stores it once.

nats-py's own `publish_async` is not used: its futures never time out, and a send that fails
while the client reconnects keeps its in-flight slot forever.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from agent.envelope import (
    HOST_EVENT_TYPES,
    CloudEvent,
    Counters,
    HostData,
    Missed,
    Subjects,
    domain_event_type,
    encode,
    host_event_type,
    rfc3339,
)
from agent.events import DomainEvent
from agent.metrics import Metrics
from agent.operations import OpEvent
from agent.settings import PublisherSettings

log = structlog.get_logger("agent.publisher")


class PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None


@dataclass(slots=True)
class _Queued:
    sequence: int
    event: DomainEvent | None
    # For host and operation events: their data, subject and CloudEvents type.
    data: Any
    time_ns: int
    subject: str = ""
    ce_type: str = ""


@dataclass(slots=True)
class _Outgoing:
    subject: str
    payload: bytes
    msg_id: str
    time_ns: int
    sent_at: float = 0.0
    attempts: int = 0


_ack_decoder = msgspec.json.Decoder(PubAck)


class Publisher:
    def __init__(
        self,
        settings: PublisherSettings,
        subjects: Subjects,
        boot_id: str,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.subjects = subjects
        self.boot_id = boot_id
        self.source = f"/virt/{subjects.host}"
        self.metrics = metrics
        self._queue: deque[_Queued] = deque()
        self._wakeup = asyncio.Event()
        self._sequence = 0
        self.received = 0
        self.published = 0
        self.dropped = 0
        self._missed: Missed | None = None
        # Set once an overflow has happened and the queue has drained below the low watermark.
        self.resync_needed = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_inflight)
        self._inflight: dict[str, _Outgoing] = {}
        self._tokens = itertools.count(1)
        self._nc: NATS | None = None
        self._inbox = ""
        self._received_by_type: dict[str, Any] = {}
        metrics.queue_capacity.set(settings.queue_size)
        metrics.inflight_capacity.set(settings.max_inflight)
        metrics.track(metrics.queue_depth, lambda: len(self._queue))
        metrics.track(metrics.inflight, lambda: len(self._inflight))

    # ------------------------------------------------------------ producers (loop thread)

    @property
    def sequence(self) -> int:
        return self._sequence

    @property
    def depth(self) -> int:
        return len(self._queue)

    def counters(self) -> Counters:
        return Counters(
            events_received=self.received,
            events_published=self.published,
            events_dropped=self.dropped,
        )

    def submit_event(self, event: DomainEvent) -> None:
        """Queue one domain event; never blocks, never raises."""
        self._sequence += 1
        self.received += 1
        counter = self._received_by_type.get(event.event_type)
        if counter is None:
            counter = self._received_by_type[event.event_type] = (
                self.metrics.events_received.labels(event.event_type)
            )
        counter.inc()
        if len(self._queue) >= self.settings.queue_size:
            self._drop(self._sequence, event)
            return
        self._queue.append(_Queued(self._sequence, event, None, event.time_ns))
        self._wakeup.set()

    def submit_host_event(self, data: HostData) -> int:
        """Queue a host event: rare, and carrying recovery state, so never dropped."""
        name = HOST_EVENT_TYPES[type(data)]
        return self._submit_other(data, self.subjects.host_event(name), host_event_type(name))

    def submit_op_event(self, state: str, data: OpEvent) -> int:
        """Queue an operation's progress or outcome; never dropped either."""
        op_id = data.operation.id
        return self._submit_other(data, self.subjects.op(op_id), f"virt.operation.{state}")

    def _submit_other(self, data: Any, subject: str, ce_type: str) -> int:
        self._sequence += 1
        self._queue.append(_Queued(self._sequence, None, data, time.time_ns(), subject, ce_type))
        self._wakeup.set()
        return self._sequence

    def _drop(self, sequence: int, event: DomainEvent) -> None:
        self.dropped += 1
        self.metrics.events_dropped.inc()
        m = self._missed
        if m is None:
            log.warning(
                "event queue full, dropping events until it drains; a resync will follow",
                capacity=self.settings.queue_size,
                sequence=sequence,
                event_type=event.event_type,
            )
            self._missed = Missed(count=1, first_sequence=sequence, last_sequence=sequence)
        else:
            self._missed = Missed(
                count=m.count + 1, first_sequence=m.first_sequence, last_sequence=sequence
            )

    def take_missed(self) -> Missed | None:
        """Hand the record of dropped events to the resync that will cover them."""
        missed, self._missed = self._missed, None
        self.resync_needed.clear()
        return missed

    def restore_missed(self, missed: Missed | None) -> None:
        """Put back a record taken for a resync that could not be published."""
        if missed is None:
            return
        m = self._missed
        if m is not None:
            missed = Missed(
                count=missed.count + m.count,
                first_sequence=missed.first_sequence,
                last_sequence=m.last_sequence,
            )
        self._missed = missed
        self.resync_needed.set()

    # ------------------------------------------------------------ rendering

    def _render(self, item: _Queued) -> _Outgoing:
        msg_id = f"{self.subjects.host}:{self.boot_id}:{item.sequence}"
        if item.event is not None:
            ev = item.event
            uuid = ev.data.domain.uuid
            subject = self.subjects.event(uuid, ev.event_type)
            envelope = CloudEvent(
                id=msg_id,
                source=self.source,
                type=domain_event_type(ev.event_type),
                subject=uuid,
                time=rfc3339(item.time_ns),
                sequence=item.sequence,
                data=ev.data,
            )
        else:
            subject = item.subject
            envelope = CloudEvent(
                id=msg_id,
                source=self.source,
                type=item.ce_type,
                time=rfc3339(item.time_ns),
                sequence=item.sequence,
                data=item.data,
            )
        return _Outgoing(subject, encode(envelope), msg_id, item.time_ns)

    # ------------------------------------------------------------ sending

    async def attach(self, nc: NATS) -> None:
        """Start receiving acknowledgements on a reply inbox of this publisher's own."""
        self._nc = nc
        self._inbox = nc.new_inbox() + "."
        await nc.subscribe(
            self._inbox + "*",
            cb=self._on_ack,
            pending_msgs_limit=4 * self.settings.max_inflight + 1024,
        )

    async def run(self) -> None:
        """Drain the queue into JetStream until cancelled."""
        low = int(self.settings.queue_size * self.settings.resync_low_watermark)
        interval = self.settings.min_write_interval_ms / 1000
        last_write = 0.0
        while True:
            await self._wakeup.wait()
            # At most one socket write per interval: under load, events that arrive meanwhile
            # share one write (each write costs a loopback round of the kernel); when idle, the
            # first event goes out at once.
            wait = last_write + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._wakeup.clear()
            while self._queue:
                item = self._queue.popleft()
                await self._send(self._render(item), new=True)
                if self._missed is not None and len(self._queue) <= low:
                    self.resync_needed.set()
            last_write = time.monotonic()
            if self._missed is not None:
                self.resync_needed.set()

    async def _send(self, out: _Outgoing, *, new: bool) -> None:
        if new:
            await self._slots.acquire()
        out.attempts += 1
        out.sent_at = time.monotonic()
        token = str(next(self._tokens))
        self._inflight[token] = out
        nc = self._nc
        assert nc is not None
        try:
            await nc.publish(
                out.subject,
                out.payload,
                reply=self._inbox + token,
                headers={"Nats-Msg-Id": out.msg_id},
            )
        except NatsError as exc:
            # Stays in flight; the ack watchdog sends it again after ack_timeout_s.
            self.metrics.publish_errors.labels(type(exc).__name__).inc()
            log.warning("publish failed, will retry", error=str(exc), msg_id=out.msg_id)

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) :]
        out = self._inflight.get(token)
        if out is None:
            return  # an ack for a message already re-sent under a new token
        if msg.headers and msg.headers.get("Status") == "503":
            # No JetStream responder (stream missing or JetStream down): retry after the timeout.
            self.metrics.publish_errors.labels("no_responders").inc()
            return
        try:
            ack = _ack_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.metrics.publish_errors.labels("bad_ack").inc()
            return
        if ack.error is not None:
            self.metrics.publish_errors.labels("api_error").inc()
            log.warning(
                "JetStream refused a message, will retry", error=ack.error, msg_id=out.msg_id
            )
            return
        del self._inflight[token]
        self._slots.release()
        self.published += 1
        self.metrics.events_published.inc()
        self.metrics.publish_latency.observe((time.time_ns() - out.time_ns) / 1e9)

    async def watch_acks(self) -> None:
        """Re-send messages whose acknowledgement did not arrive within ack_timeout_s."""
        timeout = self.settings.ack_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            deadline = time.monotonic() - timeout
            expired = []
            for token, out in self._inflight.items():
                if out.sent_at > deadline:
                    break  # dict order is send order
                expired.append(token)
            for token in expired:
                out = self._inflight.pop(token)
                self.metrics.publish_retries.inc()
                await self._send(out, new=False)
            if expired:
                log.warning("acks timed out, re-sent", count=len(expired), timeout_s=timeout)

    # ------------------------------------------------------------ shutdown

    def idle(self) -> bool:
        return not self._queue and not self._inflight

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued message is acknowledged; False if the timeout ran out."""
        deadline = time.monotonic() + timeout
        self._wakeup.set()
        while not self.idle():
            if time.monotonic() > deadline:
                log.warning(
                    "flush timed out", queued=len(self._queue), inflight=len(self._inflight)
                )
                return False
            await asyncio.sleep(0.01)
        return True
