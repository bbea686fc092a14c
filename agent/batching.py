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

import secrets
from collections import deque
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

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
