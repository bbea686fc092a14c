"""One message on its way to JetStream: the envelope rendered from a queued item, the
Nats-Msg-Id with this process's secret, and what its sends and refusals have been."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import msgspec

from agent.delivery import DomainItem, Queued
from agent.envelope import CloudEvent, Subjects, domain_event_type, encode, rfc3339
from agent.spool import Record, Ref


def public_id(msg_id: str) -> str:
    """A Nats-Msg-Id without its secret: the envelope's id (host:boot:sequence)."""
    return msg_id if msg_id.count(":") < 3 else msg_id.rsplit(":", 1)[0]


class PubAck(msgspec.Struct):
    stream: str | None = None
    seq: int | None = None
    duplicate: bool = False
    error: dict[str, object] | None = None


@dataclass(slots=True)
class Outgoing:
    subject: str
    payload: bytes
    msg_id: str
    time_ns: int
    sequence: int = 0
    # Where in the spool the message was read from (None: it came from memory).
    spool_ref: Ref | None = None
    sent_at: float = 0.0
    first_sent_at: float = 0.0
    attempts: int = 0
    rejections: int = 0  # explicit refusals (JetStream errors, over max_payload)
    # When JetStream first answered no-responders (no stream took it), monotonic; 0: never.
    unbound_since: float = 0.0

    def record(self) -> Record:
        """As the spool keeps it."""
        return Record(self.subject, self.msg_id, self.time_ns, self.sequence, self.payload)


ack_decoder = msgspec.json.Decoder(PubAck)


class Renderer:
    """Queued items as messages: the CloudEvents envelope, and an id whose header form adds
    a secret of this process's (contract v1.2, "Contained hosts"): another host, knowing the
    boot id, cannot claim this host's ids ahead of it."""

    def __init__(self, subjects: Subjects, boot_id: str) -> None:
        self.subjects = subjects
        self.boot_id = boot_id
        self.source = f"/virt/{subjects.host}"
        self.secret = secrets.token_hex(8)  # never published, never logged

    def render(self, item: Queued) -> Outgoing:
        msg_id = f"{self.subjects.host}:{self.boot_id}:{item.sequence}"
        if isinstance(item, DomainItem):
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
        return Outgoing(subject, encode(envelope), f"{msg_id}:{self.secret}", item.time_ns,
                         item.sequence)  # fmt: skip
