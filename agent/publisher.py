"""Where a typed event becomes a JetStream message: bounded queue, sequence, pipelined publish.

The libvirt callbacks call `submit_event` on the loop thread; it stamps the next sequence number
and queues the event, or - when the bounded queue is full - counts it as dropped, which leaves a
gap in `sequence` that the next `resync` host event names. The publisher task renders the
CloudEvents envelope and sends it with a reply inbox of its own; acknowledgements are matched by
token, so many publishes are in flight at once (bounded by `max_inflight`) instead of one
awaited round trip per event. An unacknowledged message is sent again with the same
Nats-Msg-Id, so JetStream stores it once.

nats-py's own `publish_async` is not used: its futures never time out, and a send that fails
while the client reconnects keeps its in-flight slot forever. Events coming fast share
JetStream fast-ingest batches (agent/batching.py); agent/outgoing.py renders each message.

With a spool (agent/spool.py), nothing is dropped while NATS is unreachable or slow: where a
message waits - the memory queue, or the spool once NATS is disconnected or the queue reaches
`spool_after` - is agent/delivery.py's decision; the spool's bound (`spool_max_bytes`) is the
only place where old messages are given up, and a `spool_overflow` host event says how many.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError

from agent.batching import Batcher
from agent.deadletter import DeadLetters
from agent.delivery import Delivery, DomainItem, Gaps, OtherItem, Queued
from agent.envelope import (
    HOST_EVENT_TYPES,
    Counters,
    DeadLetter,
    HostData,
    OpEvent,
    SpoolOverflow,
    Subjects,
    host_event_type,
)
from agent.events import DomainEvent
from agent.metrics import Metrics
from agent.outgoing import Outgoing, Renderer, ack_decoder, public_id
from agent.settings import PublisherSettings
from agent.spool import Spool
from agent.streams import Streams

log = structlog.get_logger("agent.publisher")


class Publisher:
    def __init__(
        self, settings: PublisherSettings, subjects: Subjects, boot_id: str, metrics: Metrics,
        spool: Spool | None = None, dead_letters: DeadLetters | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.spool = spool
        self.dead_letters = dead_letters
        self.subjects = subjects
        self.boot_id = boot_id
        self.renderer = Renderer(subjects, boot_id)
        self.metrics = metrics
        self.delivery = Delivery(settings, spool, metrics, self._connected,
                                 lambda item: self.renderer.render(item).record())  # fmt: skip
        self._queue = self.delivery.queue
        self._wakeup = asyncio.Event()
        self._progress = asyncio.Event()  # a message left flight (flush waits on it)
        self._sequence = 0
        self.received = 0
        self.published = 0
        self.dropped = 0
        self.gaps = Gaps()  # sequence numbers never published, for the next resync to name
        self._slots = asyncio.Semaphore(settings.max_inflight)
        self._inflight: dict[str, Outgoing] = {}
        self._tokens = itertools.count(1)
        self._nc: NATS | None = None
        self._streams: Streams | None = None
        self._inbox = ""
        self._received_by_type: dict[str, Any] = {}
        self.batcher = Batcher(self)  # fast-ingest batches (agent/batching.py)
        metrics.queue_capacity.set(settings.queue_size)
        metrics.inflight_capacity.set(settings.max_inflight)
        metrics.track(metrics.inflight, lambda: len(self._inflight))

    # ------------------------------------------------------------ producers (loop thread)

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (1 MiB, NATS's default, until connected)."""
        nc = self._nc
        return nc.max_payload if nc is not None and nc.max_payload else 1024 * 1024

    @property
    def depth(self) -> int:
        return self.delivery.depth

    @property
    def spooled(self) -> int:
        return self.delivery.spooled

    def counters(self) -> Counters:
        return Counters(events_received=self.received, events_published=self.published,
                        events_dropped=self.dropped)  # fmt: skip

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
        item = DomainItem(self._sequence, event, event.time_ns)
        if self.delivery.to_spool_now():
            self._to_spool(item)
            return
        if len(self._queue) >= self.settings.queue_size:
            self._drop(self._sequence, event)
            return
        self._queue.append(item)
        self._wakeup.set()

    def _to_spool(self, item: Queued) -> None:
        kept, dropped = self.delivery.to_spool(item)
        if not kept:
            assert isinstance(item, DomainItem)
            self._drop(item.sequence, item.event)
            return
        if dropped is not None:
            # Rare, and it says what was given up: spooled like everything else, never dropped
            # before it (the bound drops whole old segments, this goes at the end).
            self._sequence += 1
            self._to_spool(OtherItem(
                self._sequence,
                SpoolOverflow(host=self.subjects.host, boot_id=self.boot_id,
                              count=dropped.count, first_sequence=dropped.first_sequence,
                              last_sequence=dropped.last_sequence),
                time.time_ns(), self.subjects.host_event("spool_overflow"),
                host_event_type("spool_overflow"),
            ))  # fmt: skip
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
        item = OtherItem(self._sequence, data, time.time_ns(), subject, ce_type)
        if self.delivery.to_spool_now():
            self._to_spool(item)
        else:
            self._queue.append(item)
            self._wakeup.set()
        return self._sequence

    def _drop(self, sequence: int, event: DomainEvent) -> None:
        self.dropped += 1
        self.metrics.events_dropped.inc()
        if self.gaps.missed is None:
            log.warning(
                "event queue full, dropping events until it drains; a resync will follow",
                capacity=self.settings.queue_size,
                sequence=sequence,
                event_type=event.event_type,
            )
        self.gaps.note(sequence)

    # ------------------------------------------------------------ sending

    async def attach(self, nc: NATS, streams: Streams | None = None) -> None:
        """Start receiving acknowledgements on a reply inbox of this publisher's own."""
        self._nc = nc
        self._streams = streams
        self._inbox = nc.new_inbox() + "."
        limit = 4 * self.settings.max_inflight + 1024
        await nc.subscribe(self._inbox + "*", cb=self._on_ack, pending_msgs_limit=limit)
        await nc.subscribe(self._inbox + "fi.>", cb=self.batcher.on_reply,
                           pending_msgs_limit=limit)  # fmt: skip

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
            while await self._send_next(self._queue):
                if self.gaps.missed is not None and len(self._queue) <= low:
                    self.gaps.resync_needed.set()
            if self.delivery.spooling:
                await self._send_spooled()
            last_write = time.monotonic()
            if self.gaps.missed is not None:
                self.gaps.resync_needed.set()

    async def _send_spooled(self, batch: int = 256) -> None:
        """Send from the spool (after the memory queue, which holds older messages) until it
        has nothing unread; then new messages go to memory again."""
        spool = self.spool
        assert spool is not None
        if not self._connected():
            # Sending into nats-py's reconnect buffer only piles up copies to re-send; the spool
            # keeps them until NATS is back (watch_acks wakes the loop then).
            return
        while True:
            records = spool.read(batch)
            if records:
                for ref, rec in records:
                    out = Outgoing(rec.subject, rec.payload, rec.msg_id, rec.time_ns,
                                    rec.sequence, spool_ref=ref)  # fmt: skip
                    await self._send(out, new=True)
                if self._queue:
                    return  # cannot happen while spooling; kept for safety: memory first
                continue
            if not self.delivery.held:
                break  # nothing unread, nothing held: no await between here and the switch
            if not self._connected():
                return  # held until NATS is back (watch_acks wakes the loop then)
            while await self._send_next(self.delivery.held):
                pass
            # Meanwhile new messages may have gone to the spool again: read it once more.
        self.delivery.back_to_memory()

    def _connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def _send_next(self, source: deque[Queued]) -> bool:
        """Send the first message of `source` once a slot is free; it stays in `source` (where
        a spill finds it) until then. False when `source` is empty."""
        if not source:
            return False
        await self._slots.acquire()
        if not source:  # spilled meanwhile
            self._slots.release()
            return False
        await self._send(self.renderer.render(source.popleft()), new=False)
        return True

    async def _send(self, out: Outgoing, *, new: bool) -> None:
        if new:
            await self._slots.acquire()
        out.attempts += 1
        out.sent_at = time.monotonic()
        out.first_sent_at = out.first_sent_at or out.sent_at
        nc = self._nc
        assert nc is not None
        if self.batcher.wanted(out, nc):
            await self.batcher.send(out, nc)
            return
        token = str(next(self._tokens))
        self._inflight[token] = out
        await self._publish(nc, token, out, self._inbox + token)

    async def _publish(self, nc: NATS, token: str, out: Outgoing, reply: str) -> None:
        try:
            await nc.publish(out.subject, out.payload, reply=reply,
                             headers={"Nats-Msg-Id": out.msg_id})  # fmt: skip
        except MaxPayloadError:
            self.metrics.publish_errors.labels("max_payload").inc()
            if self._retake_resync(token, out, nc.max_payload):
                return
            self._rejected(token, out, f"larger than the server's max_payload ({nc.max_payload})")
        except NatsError as exc:
            # Stays in flight; the ack watchdog sends it again after ack_timeout_s.
            self.metrics.publish_errors.labels(type(exc).__name__).inc()
            log.warning("publish failed, will retry", error=str(exc), msg_id=public_id(out.msg_id))

    def _settle(self, tokens: list[str]) -> None:
        """Stored, as an acknowledgement covering these tokens says."""
        now = time.time_ns()
        n = 0
        for token in tokens:
            out = self._inflight.pop(token, None)
            if out is None:
                continue  # re-sent on its own meanwhile
            self._done(out)
            self.metrics.publish_latency.observe((now - out.time_ns) / 1e9)
            n += 1
        if n:
            self.published += n
            self.metrics.events_published.inc(n)

    async def _on_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) :]
        out = self._inflight.get(token)
        if out is None:
            return  # an ack for a message already re-sent under a new token
        if msg.headers and msg.headers.get("Status") == "503":
            self.metrics.publish_errors.labels("no_responders").inc()
            self._unbound(token, out)
            return
        try:
            ack = ack_decoder.decode(msg.data)
        except msgspec.DecodeError:
            self.metrics.publish_errors.labels("bad_ack").inc()
            return
        if ack.error is not None:
            self.metrics.publish_errors.labels("api_error").inc()
            self._rejected(token, out, f"JetStream: {ack.error.get('description', ack.error)}")
            return
        if ack.duplicate and self._first_send(out):
            # Not stored: another message holds this id. Never counted as published; sent
            # again under a fresh id by the ack watchdog.
            self.metrics.publish_errors.labels("duplicate_first_send").inc()
            log.error("JetStream called a first send a duplicate: another message holds its "
                      "id; sent again under a new one", msg_id=public_id(out.msg_id),
                      subject=out.subject)  # fmt: skip
            out.msg_id = f"{public_id(out.msg_id)}:{secrets.token_hex(8)}"
            out.sent_at = 0.0
            return
        self._settle([token])

    def _first_send(self, out: Outgoing) -> bool:
        """Sent once, by this process, never before (a spooled message may have been sent by
        an earlier process: its duplicate is a message stored)."""
        return (
            out.attempts == 1
            and out.spool_ref is None
            and out.msg_id.endswith(self.renderer.secret)
        )

    def _done(self, out: Outgoing) -> None:
        """Out of flight for good (stored, or set aside): its slot and spool place are free."""
        self._progress.set()
        self._slots.release()
        if out.spool_ref is not None and self.spool is not None:
            self.spool.acked(out.spool_ref)

    def _unbound(self, token: str, out: Outgoing) -> None:
        """No stream took the message (JetStream's no-responders). Its stream is gone - the
        stream check creates it again - or has no leader yet, and the message is sent again
        after the ack timeout; or JetStream said, since the message's first such answer,
        that no stream takes its subject: a refusal like any other."""
        streams = self._streams
        if streams is None:
            return
        said = streams.unbound.get(out.subject)
        if said is not None and out.unbound_since and said > out.unbound_since:
            self._rejected(token, out, "no stream takes this subject")
            return
        out.unbound_since = out.unbound_since or time.monotonic()
        streams.ask(out.subject)

    def _retake_resync(self, token: str, out: Outgoing, max_payload: int) -> bool:
        """A resync of this process too large for the server (taken before NATS said its
        max_payload, e.g. at a start while NATS was away): it is not sent; its sequence number
        becomes a gap that the resync taken again at once - in parts that fit - names."""
        if out.subject != self.subjects.host_event("resync") or not out.msg_id.startswith(
            f"{self.subjects.host}:{self.boot_id}:"
        ):
            return False
        if self._inflight.pop(token, None) is None:
            return True
        self._done(out)
        log.warning("resync larger than the server's max_payload; taken again in parts",
                    bytes=len(out.payload), max_payload=max_payload,
                    sequence=out.sequence)  # fmt: skip
        self.gaps.note(out.sequence)
        self.gaps.resync_reason = "oversized"
        self.gaps.resync_needed.set()
        return True

    def _rejected(self, token: str, out: Outgoing, reason: str) -> None:
        """An explicit refusal. The message stays in flight - sent again after the ack
        timeout - until it has been refused `max_rejections` times; then it is set aside in
        the dead-letter file and named by a host event, and the messages after it go on."""
        out.rejections += 1
        if out.rejections < self.settings.max_rejections:
            log.warning("JetStream refused a message, will retry", reason=reason,
                        msg_id=public_id(out.msg_id), refusals=out.rejections)  # fmt: skip
            return
        if self._inflight.pop(token, None) is None:
            return
        self._done(out)
        self.metrics.dead_letters.inc()
        log.error("message JetStream will not accept set aside in the dead-letter file",
                  msg_id=public_id(out.msg_id), subject=out.subject, reason=reason,
                  bytes=len(out.payload), attempts=out.attempts)  # fmt: skip
        if self.dead_letters is not None:
            self.dead_letters.add(public_id(out.msg_id), out.subject, out.sequence, out.payload,
                                  reason, out.attempts)  # fmt: skip
        if out.subject != self.subjects.host_event("dead_letter"):  # never one about itself
            self.submit_host_event(DeadLetter(
                host=self.subjects.host, boot_id=self.boot_id, msg_id=public_id(out.msg_id),
                subject=out.subject, sequence=out.sequence, bytes=len(out.payload),
                reason=reason, attempts=out.attempts))  # fmt: skip

    async def watch_acks(self) -> None:
        """Re-send messages whose acknowledgement did not arrive within ack_timeout_s."""
        timeout = self.settings.ack_timeout_s
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if self.spool is not None:
                self.spool.save_progress()
            if not self._connected():
                continue  # re-sending into nats-py's reconnect buffer would only pile up copies
            if self.delivery.held or self.delivery.spooling:
                self._wakeup.set()  # connected again: what waited on disk or in memory goes out
            deadline = time.monotonic() - timeout
            expired = []
            for token, out in self._inflight.items():
                if out.sent_at > deadline:
                    break  # dict order is send order
                expired.append(token)
            for token in expired:
                again = self._inflight.pop(token, None)
                if again is None:
                    continue  # acknowledged meanwhile
                self.metrics.publish_retries.inc()
                await self._send(again, new=False)
            if expired:
                log.warning("acks timed out, re-sent", count=len(expired), timeout_s=timeout)
                if self._streams is not None:
                    # A missing stream is silent when a core subscriber listens on the subject
                    # (no no-responders answer): look for it.
                    self._streams.check_requested.set()

    # ------------------------------------------------------------ shutdown

    def ready(self) -> dict[str, bool]:
        """The publisher's part of /readyz: its bounds not reached, and acknowledgements
        arriving - the oldest unacknowledged publish is younger than the ack timeout (a
        silent partition shows here before NATS's pings notice it)."""
        oldest = min((o.first_sent_at for o in self._inflight.values()), default=None)
        return {
            "queue_below_bound": self.depth < self.settings.queue_size,
            "spool_below_bound": self.spool is None
            or self.spool.bytes < self.settings.spool_max_bytes,
            "publishing": oldest is None or time.monotonic() - oldest < self.settings.ack_timeout_s,
        }

    def idle(self) -> bool:
        return not self._inflight and self.delivery.empty()

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued message is acknowledged; False if the timeout ran out.
        Woken by each acknowledgement (and looks again at least every half second)."""
        deadline = time.monotonic() + timeout
        self._wakeup.set()
        await self.batcher.commit_open()
        while not self.idle():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning(
                    "flush timed out", queued=len(self._queue), inflight=len(self._inflight)
                )
                self.spill()
                return False
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), min(remaining, 0.5))
        return True

    def spill(self) -> None:
        """At a shutdown that could not flush: what only memory holds (unacknowledged sends,
        the queue, what the disk refused) goes to the spool so the next process sends it,
        each message where its sequence number puts it among the spooled ones. Kept once: a
        second spill adds nothing, and acknowledgements arriving after it are ignored."""
        if self.spool is None:
            return
        in_flight = [o.record() for o in self._inflight.values() if o.spool_ref is None]
        # What was read from the spool is still there: the next process sends it.
        self._inflight.clear()
        self.delivery.spill(in_flight)
