"""The bus format: CloudEvents 1.0 structured-JSON envelopes, subjects and host-event payloads."""

from __future__ import annotations

import enum
import time
from typing import Any

import msgspec
from msgspec import Struct

from agent.errors import AgentError
from agent.events import DomainSnapshot

SPECVERSION = "1.0"
CONTENT_TYPE = "application/json"


class CloudEvent(Struct, frozen=True, kw_only=True):
    specversion: str = SPECVERSION
    id: str
    source: str
    type: str
    # The domain UUID for domain events; absent (not null) for host and operation events.
    subject: str | msgspec.UnsetType = msgspec.UNSET
    time: str
    datacontenttype: str = CONTENT_TYPE
    sequence: int
    data: Any


# ---------------------------------------------------------------- host events


class HostData(Struct, frozen=True, kw_only=True):
    host: str


class Counters(Struct, frozen=True, kw_only=True):
    # Callbacks libvirt delivered to this process.
    events_received: int
    # Events JetStream acknowledged.
    events_published: int
    # Events lost to queue overflow (each one also leaves a gap in `sequence`).
    events_dropped: int


class AgentStarted(HostData, frozen=True, kw_only=True):
    boot_id: str
    version: str
    pid: int
    libvirt_uri: str


class AgentStopping(HostData, frozen=True, kw_only=True):
    boot_id: str
    reason: str
    counters: Counters


class LibvirtConnected(HostData, frozen=True, kw_only=True):
    uri: str
    libvirt_version: str
    hypervisor: str
    event_types: list[str]
    # Event ids the bindings know but the running libvirt refused to register.
    unsupported_event_types: list[str]


class LibvirtDisconnected(HostData, frozen=True, kw_only=True):
    uri: str
    reason: str


class Missed(Struct, frozen=True, kw_only=True):
    count: int
    first_sequence: int
    last_sequence: int


class Resync(HostData, frozen=True, kw_only=True):
    # startup | overflow | reconnect | requested | oversized (taken again: the first was too large)
    reason: str
    domains: list[DomainSnapshot]
    # Set after a queue overflow: which sequence numbers were never published.
    missed: Missed | None = None
    # A snapshot larger than one message (the server's max_payload) is sent in parts,
    # numbered 1..parts in consecutive sequence numbers; `missed` is on the first.
    part: int = 1
    parts: int = 1


# Room in a message for the envelope and a resync's other fields, besides its domains.
ENVELOPE_ROOM = 2048


def resync_parts(
    host: str, reason: str, domains: list[DomainSnapshot], missed: Missed | None, max_bytes: int
) -> list[Resync]:
    """One snapshot as resync host events that each fit in `max_bytes` (the server's
    max_payload), in domain order; always at least one."""
    budget = max(1024, max_bytes - ENVELOPE_ROOM)
    chunks: list[list[DomainSnapshot]] = [[]]
    used = 0
    for d in domains:
        size = len(msgspec.json.encode(d)) + 1
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(d)
        used += size
    return [
        Resync(
            host=host,
            reason=reason,
            domains=chunk,
            missed=missed if i == 0 else None,
            part=i + 1,
            parts=len(chunks),
        )
        for i, chunk in enumerate(chunks)
    ]


class Heartbeat(HostData, frozen=True, kw_only=True):
    boot_id: str
    uptime_s: float
    counters: Counters
    queue_depth: int


class SpoolOverflow(HostData, frozen=True, kw_only=True):
    """The spool exceeded its bound: its oldest messages (of boot `boot_id`) were dropped."""

    boot_id: str
    count: int
    first_sequence: int
    last_sequence: int


class DeadLetter(HostData, frozen=True, kw_only=True):
    """A message JetStream would never accept was set aside in the agent's dead-letter file
    (state_dir/dead-letters.jsonl) after `attempts` refusals; the messages after it went on."""

    boot_id: str
    msg_id: str
    subject: str
    sequence: int
    bytes: int
    reason: str
    attempts: int


# ---------------------------------------------------------------- command replies


class Reply(msgspec.Struct, omit_defaults=True):
    """Every command's reply (errors.from_reply reads one back into the error families)."""

    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None


def error_record(exc: AgentError) -> dict[str, Any]:
    """An error as a reply and an operation carry it."""
    return {"code": exc.code, "message": exc.message, "details": exc.details}


def error_reply(exc: AgentError) -> bytes:
    return msgspec.json.encode(Reply(ok=False, error=error_record(exc)))


# ---------------------------------------------------------------- operation events (VIRT_OPS)


class OpState(enum.StrEnum):
    """An operation's state (contract: "Operations"); every state but `running` is final."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # It changed the domain or its devices, met an error, and put them back as they were.
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"


FINAL = frozenset(OpState) - {OpState.RUNNING}


class StepName(enum.StrEnum):
    """The steps an operation reports (`step`, and each of `steps`), in the order the verbs
    that have them take them (a verb takes the ones it needs)."""

    PLAN = "plan"
    ADMIT = "admit"  # the destination's admission of a migration (contract v1.2)
    RESERVE = "reserve"
    UNPLUG = "unplug"
    MIGRATE = "migrate"
    REPLUG = "replug"
    VERIFY = "verify"
    ROLLBACK = "rollback"
    # Finishing an operation a previous process of the agent left running.
    RECOVER = "recover"


class Operation(msgspec.Struct, kw_only=True):
    """A long operation as VIRT_OPS carries it and the journal keeps it."""

    id: str
    verb: str
    domain: str
    state: OpState
    # A StepName, or "" before the first step.
    step: str
    created: float
    updated: float
    progress: dict[str, Any] = msgspec.field(default_factory=dict)
    steps: list[dict[str, Any]] = msgspec.field(default_factory=list)
    result: Any = None
    error: dict[str, Any] | None = None


class OpEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The `data` of an operation event."""

    host: str
    operation: Operation


HOST_EVENT_TYPES: dict[type[HostData], str] = {
    AgentStarted: "agent_started",
    AgentStopping: "agent_stopping",
    LibvirtConnected: "libvirt_connected",
    LibvirtDisconnected: "libvirt_disconnected",
    Resync: "resync",
    Heartbeat: "heartbeat",
    SpoolOverflow: "spool_overflow",
    DeadLetter: "dead_letter",
}


# ---------------------------------------------------------------- subjects and rendering


class Subjects:
    """Every subject of the contract for one host (`*`: every host), from one prefix: built
    here and nowhere else."""

    def __init__(self, prefix: str, host: str) -> None:
        self.prefix = prefix
        self.host = host
        self.base = f"{prefix}.{host}"

    def event(self, domain_uuid: str, event_type: str) -> str:
        return f"{self.base}.event.{domain_uuid}.{event_type}"

    def host_event(self, event_type: str) -> str:
        return f"{self.base}.host.{event_type}"

    def op(self, operation_id: str) -> str:
        return f"{self.base}.op.{operation_id}"

    def cmd(self, verb: str) -> str:
        return f"{self.base}.cmd.{verb}"

    def events_stream_subjects(self, own: bool = False) -> list[str]:
        """What VIRT_EVENTS takes: every host's events, or (`own`) only this host's - a leaf
        node's stream, which must not take what other leaves publish through the hub."""
        who = self.host if own else "*"
        return [f"{self.prefix}.{who}.event.>", f"{self.prefix}.{who}.host.>"]

    def in_events_stream(self, subject: str) -> bool:
        """Whether this host's message on `subject` goes to VIRT_EVENTS."""
        return subject.startswith((f"{self.base}.event.", f"{self.base}.host."))

    def ops_stream_subjects(self, own: bool = False) -> list[str]:
        return [f"{self.prefix}.{self.host if own else '*'}.op.>"]


_second_cache: list[Any] = [None, ""]


def rfc3339(time_ns: int) -> str:
    """UTC, microseconds, `Z`: 2026-11-25T21:00:00.123456Z (the date part cached per second)."""
    sec, ns = divmod(time_ns, 1_000_000_000)
    if _second_cache[0] != sec:
        _second_cache[0] = sec
        _second_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second_cache[1]}.{ns // 1000:06d}Z"


_encoder = msgspec.json.Encoder()


def encode(event: CloudEvent) -> bytes:
    return _encoder.encode(event)


def domain_event_type(event_type: str) -> str:
    return f"virt.domain.{event_type}"


def host_event_type(event_type: str) -> str:
    return f"virt.host.{event_type}"


def impersonation(subject: str, event: dict[str, Any], prefix: str = "virt") -> str:
    """Why `event`, received on `subject`, is not the event of the host its subject names
    (contract v1.2, "Contained hosts"): the host is the subject's token - the server lets a
    host publish only under its own - and an envelope whose `source`, `data.host` or `id`
    names another host is forged. Empty when it agrees."""
    tokens = subject.split(".")
    n = len(prefix.split("."))
    if len(tokens) <= n:
        return f"subject {subject!r} names no host"
    host = tokens[n]
    data = event.get("data")
    if event.get("source") != f"/virt/{host}":
        return f"source {str(event.get('source'))[:80]!r} is not /virt/{host}"
    if isinstance(data, dict) and "host" in data and data["host"] != host:
        return f"data.host {str(data['host'])[:80]!r} is not {host!r}"
    if not str(event.get("id", "")).startswith(f"{host}:"):
        return f"id {str(event.get('id'))[:80]!r} is not one of {host!r}'s"
    return ""
