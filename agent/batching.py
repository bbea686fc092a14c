"""JetStream fast-ingest batch publishing (ADR-50; nats-server 2.14+, a stream with
`allow_batched`), over the core client: nats-py has no batch publisher.

A batch is named by its reply subjects alone - `<prefix>.<batch id>.<flow>.<gap mode>.<batch
sequence>.<op>.$FI` - and the server stores each message as it arrives (not atomic). What it
sends back to those subjects:

    {"type": "ack", "seq": S, "msgs": N}        every message up to S is stored (but those a gap
                                                or error notice named); the next ack N later
    {"type": "gap", "last_seq": E, "seq": C}    messages E..C-1 never arrived (gap mode `ok`:
                                                the batch goes on)
    {"type": "err", "seq": S, "error": {...}}   message S was refused (the batch goes on)
    a PubAck {"batch", "count", ...}            the batch committed: everything up to `count`
    a PubAck {"error": {...}}                   the batch is over (disabled on the stream,
                                                unknown - idle for 10 s -, too many in flight)

The publisher (agent/publisher.py) keeps a batch open while events come faster than one per
`publisher.batch_commit_idle_ms` and commits it (an end-of-batch message, not stored) once they
stop. A message a gap or error notice names, or left unacknowledged in a batch that ended, is
sent again on its own with the same Nats-Msg-Id: JetStream's de-duplication stores it once
(inside a batch too: a duplicate is skipped). Nothing waits for a batch: messages are in
flight as before, bounded by `publisher.max_inflight`, and the acknowledgement watchdog re-sends
whatever no acknowledgement covered in time.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from agent.outgoing import Outgoing

if TYPE_CHECKING:
    from collections.abc import Sized

    from agent.envelope import Subjects
    from agent.metrics import Metrics
    from agent.settings import PublisherSettings


class HasBatched(Protocol):
    batched: bool  # the events stream takes batches (agent/streams.py)


class Sender(Protocol):
    """What the batches need of the publisher (agent/publisher.py): its messages in flight,
    its queue's length, its publish, and how it settles, refuses and re-sends a message."""

    settings: PublisherSettings
    subjects: Subjects
    metrics: Metrics
    _inflight: dict[str, Outgoing]
    _nc: NATS | None
    _inbox: str

    @property
    def _queue(self) -> Sized: ...
    @property
    def _streams(self) -> HasBatched | None: ...

    async def _publish(self, nc: NATS, token: str, out: Outgoing, reply: str) -> None: ...
    def _settle(self, tokens: list[str]) -> None: ...
    def _rejected(self, token: str, out: Outgoing, reason: str) -> None: ...
    def _unbound(self, token: str, out: Outgoing) -> None: ...


log = structlog.get_logger("agent.batching")

API_LEVEL = 4  # the server's `api_lvl` (INFO) from which fast-ingest batches are served
ERR_DISABLED = 10205  # the stream does not allow batched publishing
ERR_INFLIGHT = 10211  # too many batches in flight on the stream or server


def server_supports(nc: NATS) -> bool:
    """Whether the connected server serves fast-ingest batches (its INFO's `api_lvl`)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    try:
        return int(info.get("api_lvl", 0)) >= API_LEVEL
    except (TypeError, ValueError):
        return False


class Reply(msgspec.Struct):
    """Anything the server sends to a batch's reply subjects."""

    type: str | None = None  # ack, gap, err; None: a PubAck
    seq: int | None = None
    msgs: int | None = None
    last_seq: int | None = None
    error: dict[str, Any] | None = None
    stream: str | None = None
    batch: str | None = None
    count: int | None = None


decode = msgspec.json.Decoder(Reply).decode


def parse_subject(subject: str) -> tuple[str, int] | None:
    """The batch id and the batch sequence a reply subject names."""
    tokens = subject.split(".")
    if len(tokens) < 7 or tokens[-1] != "$FI":
        return None
    try:
        return tokens[-6], int(tokens[-3])
    except ValueError:
        return None


class Batch:
    """One batch: its next sequence, and its messages (sequence, in-flight token) that no
    acknowledgement has covered yet, in sequence order."""

    def __init__(self, prefix: str, flow: int, reconnects: int) -> None:
        self.id = secrets.token_hex(12)  # batch ids are per stream, shared by every host
        self.prefix = prefix
        self.flow = flow
        self.reconnects = reconnects  # the connection's reconnect count when it began
        self.seq = 0
        self.pending: deque[tuple[int, str]] = deque()
        self.lost: set[int] = set()  # sequences a gap or error notice named
        self.last_send = 0.0
        self.committed = False

    def _reply(self, seq: int, op: int) -> str:
        return f"{self.prefix}.{self.id}.{self.flow}.ok.{seq}.{op}.$FI"

    def add(self, token: str) -> str:
        """The next message's reply subject (op 0 begins the batch, 1 appends)."""
        self.seq += 1
        self.pending.append((self.seq, token))
        return self._reply(self.seq, 0 if self.seq == 1 else 1)

    def commit(self) -> str:
        """The end-of-batch message's reply subject (op 3: commit, store nothing)."""
        self.committed = True
        return self._reply(self.seq + 1, 3)

    def covered(self, upto: int) -> list[str]:
        """The tokens an acknowledgement up to `upto` settles (not those named lost)."""
        out = []
        while self.pending and self.pending[0][0] <= upto:
            seq, token = self.pending.popleft()
            if seq not in self.lost:
                out.append(token)
        return out

    def token(self, seq: int) -> str | None:
        for s, token in self.pending:
            if s == seq:
                return token
        return None

    def rest(self) -> list[str]:
        """Every token still waiting (the batch is over without covering them)."""
        out = [token for _, token in self.pending]
        self.pending.clear()
        return out


class Batcher:
    """The publisher's fast-ingest batches (agent/publisher.py owns the messages in flight,
    their acknowledgement and refusal; this decides which go in a batch, and reads what the
    server says of a batch)."""

    def __init__(self, pub: Sender) -> None:
        self.pub = pub
        self.open: Batch | None = None
        self.batches: dict[str, Batch] = {}  # not yet settled, by id
        self.off_until = 0.0  # the server had too many batches: none until then
        self.refused = False  # the stream refused batches (no allow_batched)
        self.last_wanted = 0.0  # when the last message that could go in a batch was sent
        self.commit_subject = pub.subjects.host_event("batch_commit")  # never stored
        self.committing: set[asyncio.Future[None]] = set()
        # Fault injection for the tests only (like agent/crashpoints.py): batch sequences
        # whose write is skipped, as if lost on the way.
        self.lose: set[int] = set()

    async def commit_open(self) -> None:
        """Commit the open batch now (a flush at shutdown)."""
        if self.open is not None:
            b, self.open = self.open, None
            await self._commit(b)

    def wanted(self, out: Outgoing, nc: NATS) -> bool:
        """A first send to the events stream, batches on (the server and the stream serve
        them), and events coming fast: a batch is open, more wait, or the last went out
        within the commit interval. A lone event now and then is published on its own."""
        s = self.pub.settings
        if not s.batch or out.attempts != 1 or self.refused:
            return False
        streams = self.pub._streams
        if streams is None or not streams.batched or not server_supports(nc):
            return False
        if not self.pub.subjects.in_events_stream(out.subject):
            return False
        now = out.sent_at
        if now < self.off_until:
            return False
        recent = now - self.last_wanted < s.batch_commit_idle_ms / 1000
        self.last_wanted = now
        return self.open is not None or recent or bool(self.pub._queue)

    async def send(self, out: Outgoing, nc: NATS) -> None:
        b = self.open
        reconnects = int(nc.stats.get("reconnects", 0))
        if b is not None and b.reconnects != reconnects:
            self._over(b, "the connection was made again")
            b = None
        if b is None:
            b = self.open = Batch(self.pub._inbox + "fi", self.pub.settings.batch_flow, reconnects)
            self.batches[b.id] = b
            asyncio.get_running_loop().call_later(self.pub.settings.batch_commit_idle_ms / 1000,
                                                  self._idle_check, b)  # fmt: skip
        token = f"{b.id}.{b.seq + 1}"
        self.pub._inflight[token] = out
        reply = b.add(token)
        b.last_send = out.sent_at
        if b.seq in self.lose:
            self.lose.discard(b.seq)
            return  # lost on the way (test fault injection)
        await self.pub._publish(nc, token, out, reply)

    def _idle_check(self, b: Batch) -> None:
        """Commit `b` once nothing was added to it for the commit interval."""
        if self.open is not b:
            return
        idle = self.pub.settings.batch_commit_idle_ms / 1000
        left = b.last_send + idle - time.monotonic()
        if left > 0:
            asyncio.get_running_loop().call_later(left, self._idle_check, b)
            return
        self.open = None
        task = asyncio.ensure_future(self._commit(b))
        self.committing.add(task)
        task.add_done_callback(self.committing.discard)

    async def _commit(self, b: Batch) -> None:
        nc = self.pub._nc
        if nc is None or b.committed or b.seq == 0:
            return
        reply = b.commit()
        try:
            await nc.publish(self.commit_subject, b"", reply=reply)
        except NatsError as exc:
            # Unacknowledged: its messages are sent again on their own by the watchdog.
            log.warning("batch commit not sent", error=str(exc))
        else:
            self.pub.metrics.publish_batches.inc()

    async def on_reply(self, msg: Msg) -> None:
        named = parse_subject(msg.subject)
        b = self.batches.get(named[0]) if named else None
        if b is None or named is None:
            return  # a batch already settled
        seq = named[1]
        if msg.headers and msg.headers.get("Status") == "503":
            self.pub.metrics.publish_errors.labels("no_responders").inc()
            token = b.token(seq)
            out = self.pub._inflight.get(token) if token else None
            if token is not None and out is not None:
                self.pub._unbound(token, out)
            self._over(b, "no stream took a message")
            return
        try:
            r = decode(msg.data)
        except msgspec.DecodeError:
            self.pub.metrics.publish_errors.labels("bad_ack").inc()
            return
        if r.type == "ack" and r.seq is not None:
            self.pub._settle(b.covered(r.seq))
        elif r.type == "gap" and r.seq is not None and r.last_seq is not None:
            self.pub.metrics.publish_errors.labels("batch_gap").inc()
            for lost in range(r.last_seq, r.seq):
                self._resend_soon(b, lost)
        elif r.type == "err" and r.seq is not None:
            self.pub.metrics.publish_errors.labels("api_error").inc()
            token = b.token(r.seq)
            b.lost.add(r.seq)
            if token is not None and token in self.pub._inflight:
                reason = (r.error or {}).get("description", r.error)
                self.pub._rejected(token, self.pub._inflight[token], f"JetStream: {reason}")
        elif r.error is not None:
            self._refused(b, r.error, seq)
        elif r.count is not None:
            self.pub._settle(b.covered(r.count))
            self._over(b, "")

    def _resend_soon(self, b: Batch, seq: int) -> None:
        """The server never got batch message `seq`: sent again on its own, same id."""
        b.lost.add(seq)
        token = b.token(seq)
        out = self.pub._inflight.get(token) if token else None
        if out is not None:
            out.sent_at = 0.0

    def _refused(self, b: Batch, error: dict[str, Any], seq: int) -> None:
        code = error.get("err_code")
        self.pub.metrics.publish_errors.labels("batch_refused").inc()
        if code == ERR_DISABLED:
            if not self.refused:
                log.warning("the events stream does not allow batched publishing; each "
                            "message is acknowledged on its own (docs/operations.md)")  # fmt: skip
            self.refused = True
        elif code == ERR_INFLIGHT:
            self.off_until = time.monotonic() + 10.0
        else:
            log.warning("JetStream refused a batch; its messages are sent on their own",
                        error=error, batch_sequence=seq)  # fmt: skip
        self._over(b, str(error.get("description", code)))

    def _over(self, b: Batch, why: str) -> None:
        """`b` ends: what no acknowledgement covered is sent again on its own, same ids."""
        if self.open is b:
            self.open = None
        self.batches.pop(b.id, None)
        rest = [t for t in b.rest() if t in self.pub._inflight]
        for token in rest:
            self.pub._inflight[token].sent_at = 0.0
        if rest and why:
            log.info("batch ended before its acknowledgement; its messages are sent again",
                     reason=why, messages=len(rest))  # fmt: skip
