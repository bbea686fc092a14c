"""Every domain's current state in the key-value bucket `virt_domains` (contract v1.2,
"Current state"): key `<host>.<uuid>`, one value per domain this host's libvirt knows, active
or defined.

What is written is what the resync tracker (agent/inference.py) knows: each lifecycle event
marks its domain, each resync snapshot marks every domain and has the bucket compared with it
(keys of domains that left the host are deleted, after a restart too). A writer task sends the
marked keys in batches, pipelined, off the event path: an event costs a set insertion. Several
changes of one domain within GATHER_S are one write; a value equal to the last written one is
not written again. A failed write keeps its keys marked and is tried again with back-off, so
a NATS outage ends with the bucket right. Delete markers expire after DELETED_KEEP_S where the
server supports per-message TTLs, so the bucket does not grow with domains long gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoStreamResponseError, NotFoundError
from nats.js.kv import KeyValue

from agent.backoff import Backoff
from agent.envelope import rfc3339
from agent.events import DomainSnapshot
from agent.kv import bucket_stream, keys, open_kv, put_prefix
from agent.metrics import Metrics


class Known(Protocol):
    """What is known of the domains (agent/inference.py's StateTracker): their last state,
    and who is told of a change (a uuid; None: a whole snapshot)."""

    known: dict[str, DomainSnapshot]
    watchers: list[Callable[[str | None], None]]


log = structlog.get_logger("agent.current_state")

BUCKET = "virt_domains"
STREAM = f"KV_{BUCKET}"
DELETED_KEEP_S = 86_400  # a delete marker stays this long (watchers see it), then goes
IN_FLIGHT = 256  # writes awaiting their acknowledgement at once
# After a change, the writer waits this long for more: a domain changing many times a second
# costs a few writes a second, not one per event.
GATHER_S = 0.1


class DomainState(msgspec.Struct, frozen=True, kw_only=True):
    """One value of the bucket. `reason` is libvirt's state reason after a resync, the
    lifecycle event's detail between resyncs; `time` when this agent saw the state."""

    host: str
    uuid: str
    name: str
    state: str
    reason: str
    persistent: bool
    time: str


_decoder = msgspec.json.Decoder(DomainState)


def bucket_config(replicas: int) -> StreamConfig:
    """No expiry (a host's keys go with `virt-agent forget`); delete markers may carry a TTL;
    as for virt_hosts, nothing lets one writer erase others' keys (agent/kv.py)."""
    return bucket_stream(BUCKET, "virt-agent current domain states (contract v1.2)", replicas,
                         allow_msg_ttl=True)  # fmt: skip


def decode(key: str, data: bytes) -> DomainState | None:
    """A value read from the bucket, if it is one: well-formed and under its own key."""
    try:
        st = _decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return st if key == f"{st.host}.{st.uuid}" else None


def reader(js: JetStreamContext) -> KeyValue:
    """The bucket for reading (it may not exist: reads then find nothing)."""
    return KeyValue(name=BUCKET, stream=STREAM, pre=f"$KV.{BUCKET}.", js=js, direct=True)


async def read_all(js: JetStreamContext, host: str = "") -> list[DomainState]:
    """Every domain's state (of one host), by host and name; malformed values left out."""
    kv = reader(js)
    names = await keys(js, BUCKET, f"{host}." if host else "")
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one(key: str) -> DomainState | None:
        async with sem:
            try:
                entry = await kv.get(key)
            except (KeyNotFoundError, KeyDeletedError, NotFoundError):
                return None
        return decode(key, entry.value) if entry.value else None

    found = await asyncio.gather(*(one(k) for k in names))
    return sorted((s for s in found if s is not None), key=lambda s: (s.host, s.name, s.uuid))


async def forget(js: JetStreamContext, host: str) -> int:
    """Delete every key of `host` (a host gone for good): how many domains it had."""
    try:
        info = await js.stream_info(STREAM)
    except NotFoundError:
        return 0
    hdrs = delete_headers(bool(info.config.allow_msg_ttl))
    current = await read_all(js, host)
    for st in current:
        await js.publish(f"$KV.{BUCKET}.{host}.{st.uuid}", b"", headers=hdrs)
    return len(current)


def delete_headers(ttl: bool) -> dict[str, str]:
    """A KV delete marker, expiring after DELETED_KEEP_S where the stream allows it."""
    return {"KV-Operation": "DEL", **({"Nats-TTL": str(DELETED_KEEP_S)} if ttl else {})}


class CurrentState:
    def __init__(self, host: str, tracker: Known, metrics: Metrics, replicas: int,
                 domain: str = "") -> None:  # fmt: skip
        self.host = host
        self.tracker = tracker
        self.metrics = metrics
        self.replicas = replicas
        self.domain = domain
        self.kv: KeyValue | None = None  # None: to be opened (made where missing)
        self.js: JetStreamContext | None = None
        self._pre = put_prefix(BUCKET, domain)
        self._ttl = False  # the stream keeps per-message TTLs (delete markers expire)
        # uuid -> when marked (ns); written by the writer task, in batches.
        self._marked: dict[str, int] = {}
        self._compare = True  # the bucket's keys of this host compared with what is known
        self._wake = asyncio.Event()
        # What this process wrote last per uuid (None: deleted), to write changes only.
        self._written: dict[str, tuple[str, str, str, bool] | None] = {}
        tracker.watchers.append(self.mark)
        metrics.current_state_pending.set_function(lambda: len(self._marked))

    def mark(self, uuid: str | None) -> None:
        """`uuid`'s state changed (None: a snapshot - every domain, and compare the bucket)."""
        now = time.time_ns()
        if uuid is None:
            for u in self.tracker.known:
                self._marked.setdefault(u, now)
            self._compare = True
        else:
            self._marked[uuid] = now
        self._wake.set()

    async def open(self, nc: NATS) -> None:
        self.js = nc.jetstream(domain=self.domain or None)
        self.kv = await open_kv(nc, bucket_config(self.replicas), BUCKET, self.domain)
        info = await self.js.stream_info(STREAM)
        self._ttl = bool(info.config.allow_msg_ttl)

    async def run(self, nc: NATS) -> None:
        backoff = Backoff(0.5, 10.0)
        while True:
            await self._wake.wait()
            await asyncio.sleep(GATHER_S)
            self._wake.clear()
            try:
                if self.kv is None:
                    await self.open(nc)
                await self._flush()
            except (NatsError, OSError, TimeoutError) as exc:
                self.metrics.current_state_failures.inc()
                if isinstance(exc, NoStreamResponseError | NotFoundError):
                    self.kv = None  # the bucket is gone: made again at the next try
                    self._compare = True
                log.warning("virt_domains not written, will retry",
                            error=str(exc) or type(exc).__name__, pending=len(self._marked),
                            retry_in_s=round(backoff.delay, 2))  # fmt: skip
                await backoff.wait()
                self._wake.set()
            else:
                backoff.reset()

    async def _flush(self) -> None:
        assert self.kv is not None
        if self._compare:
            self._compare = False
            try:
                await self._compare_bucket()
            except BaseException:
                self._compare = True
                raise
        batch, self._marked = self._marked, {}
        try:
            await self._write(batch)
        except BaseException:
            for uuid, t in batch.items():  # those marked again meanwhile keep the newer time
                self._marked.setdefault(uuid, t)
            raise

    async def _compare_bucket(self) -> None:
        """This host's keys in the bucket against what is known: a key of a domain not known
        here is deleted (unless it is a delete marker already), every known domain written
        again (nothing is known of what an earlier process of this host wrote)."""
        assert self.kv is not None
        assert self.js is not None
        now = time.time_ns()
        self._written.clear()
        for key in await keys(self.js, BUCKET, f"{self.host}."):
            uuid = key.removeprefix(f"{self.host}.")
            if uuid in self.tracker.known:
                continue
            try:
                await self.kv.get(key)
            except (KeyNotFoundError, KeyDeletedError):
                continue
            self._written[uuid] = ("", "", "", False)  # not what is wanted: deleted
            self._marked.setdefault(uuid, now)
        for uuid in self.tracker.known:
            self._marked.setdefault(uuid, now)

    async def _write(self, batch: dict[str, int]) -> None:
        """Write what changed of `batch`; each one written leaves it (what fails stays)."""
        assert self.js is not None
        js = self.js
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one(uuid: str, t: int) -> None:
            d: DomainSnapshot | None = self.tracker.known.get(uuid)
            want = None if d is None else (d.name, d.state, d.reason, d.persistent)
            if self._written.get(uuid) == want:
                del batch[uuid]  # unchanged, or deleted and not known since
                return
            subject = f"{self._pre}{self.host}.{uuid}"
            async with sem:
                if d is None:
                    await js.publish(subject, b"", headers=delete_headers(self._ttl))
                    self.metrics.current_state_writes.labels("delete").inc()
                else:
                    value = DomainState(host=self.host, uuid=uuid, name=d.name, state=d.state,
                                        reason=d.reason, persistent=d.persistent,
                                        time=rfc3339(t))  # fmt: skip
                    await js.publish(subject, msgspec.json.encode(value))
                    self.metrics.current_state_writes.labels("put").inc()
            if want is None:
                self._written.pop(uuid, None)
            else:
                self._written[uuid] = want
            batch.pop(uuid, None)

        results = await asyncio.gather(*(one(u, t) for u, t in list(batch.items())),
                                       return_exceptions=True)  # fmt: skip
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
