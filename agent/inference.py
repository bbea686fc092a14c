"""Events the agent could not have seen: what changed while libvirt was disconnected.

The tracker keeps the last known state of every domain - from each resync snapshot, then
from every lifecycle event. After a reconnect the new snapshot is compared with it, and each
difference becomes a lifecycle event marked `"inferred": true` (published before the
`resync`), so a consumer that follows events alone still ends with the right state:

    appeared              defined (persistent) and/or started (running or paused)
    disappeared           stopped (if it was active), undefined (if it was persistent)
    state changed         started | suspended | resumed | stopped | crashed | pmsuspended
    persistent changed    defined | undefined

The detail of an inferred event is the domain's current state reason (e.g. `booted`,
`user`), or `unknown`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from agent.backoff import Backoff
from agent.domain import ACTIVE
from agent.domain import DomainState as S
from agent.envelope import LibvirtConnected, LibvirtDisconnected, resync_parts
from agent.errors import AgentError
from agent.events import DomainEvent, DomainRef, DomainSnapshot, Lifecycle
from agent.hypervisor import Hypervisor
from agent.metrics import Metrics
from agent.publisher import Publisher
from agent.settings import LibvirtSettings

log = structlog.get_logger("agent.inference")

# The state a domain is in after a lifecycle event (events that change no state are absent).
AFTER_EVENT = {
    "started": S.RUNNING,
    "resumed": S.RUNNING,
    "suspended": S.PAUSED,
    "stopped": S.SHUTOFF,
    "crashed": S.CRASHED,
    "pmsuspended": S.PMSUSPENDED,
}
RUNS = (S.RUNNING, S.BLOCKED)


def _transition(old: str, new: str) -> str | None:
    """The lifecycle event that takes a domain from state `old` to `new` (the states'
    names: a state newer than the agent is named but has no member), or None."""
    if old == new or (old in RUNS and new in RUNS):
        return None
    if new in RUNS:
        return "resumed" if old in (S.PAUSED, S.PMSUSPENDED) else "started"
    if new == S.PAUSED:
        return "suspended" if old in ACTIVE else "started"
    if new == S.SHUTOFF:
        return "stopped"
    if new in (S.CRASHED, S.PMSUSPENDED):
        return str(new)
    return None  # nostate, shutdown (in progress): no event says it


class StateTracker:
    def __init__(self) -> None:
        self.known: dict[str, DomainSnapshot] = {}
        # Per snapshot being taken (resyncs may overlap), the domains with lifecycle events
        # meanwhile: the snapshot may be older than those events, so what they say is kept.
        self._touching: list[set[str]] = []
        # Told of each domain a lifecycle event was about, and (None) of each snapshot known.
        self.watchers: list[Callable[[str | None], None]] = []

    def begin(self) -> set[str]:
        """A snapshot is about to be taken: the domains whose events arrive meanwhile are
        collected in the returned set until `end` is called with it."""
        touched: set[str] = set()
        self._touching.append(touched)
        return touched

    def end(self, touched: set[str]) -> set[str]:
        self._touching = [t for t in self._touching if t is not touched]
        return touched

    def reset(self, snapshot: list[DomainSnapshot], keep: set[str] | None = None) -> None:
        """Know `snapshot`, except for the domains in `keep` (events newer than it)."""
        keep = keep or set()
        known = {d.uuid: d for d in snapshot if d.uuid not in keep}
        for uuid in keep:
            if uuid in self.known:
                known[uuid] = self.known[uuid]
        self.known = known
        for w in self.watchers:
            w(None)

    def observe(self, event: DomainEvent) -> None:
        """Follow one domain event (only lifecycle events change what is known)."""
        data = event.data
        if not isinstance(data, Lifecycle):
            return
        uuid = data.domain.uuid
        for touched in self._touching:
            touched.add(uuid)
        self._follow(uuid, data)
        for w in self.watchers:
            w(uuid)

    def _follow(self, uuid: str, data: Lifecycle) -> None:
        cur = self.known.get(uuid)
        if data.event == "undefined":
            if cur is not None:
                if cur.state in ACTIVE:
                    self.known[uuid] = DomainSnapshot(uuid, cur.name, cur.state, cur.reason,
                                                      cur.id, persistent=False)  # fmt: skip
                else:
                    del self.known[uuid]
            return
        state = AFTER_EVENT.get(data.event)
        if cur is None and state is S.SHUTOFF:
            return  # a transient domain that was not known is gone already
        if cur is None:
            self.known[uuid] = DomainSnapshot(uuid, data.domain.name, state or S.SHUTOFF,
                                              data.detail, data.domain.id,
                                              persistent=data.event == "defined")  # fmt: skip
        elif state is not None:
            gone = state is S.SHUTOFF and not cur.persistent
            if gone:
                del self.known[uuid]
            else:
                self.known[uuid] = DomainSnapshot(uuid, cur.name, state, data.detail,
                                                  data.domain.id, cur.persistent)  # fmt: skip
        elif data.event == "defined" and not cur.persistent:
            self.known[uuid] = DomainSnapshot(uuid, cur.name, cur.state, cur.reason, cur.id,
                                              persistent=True)  # fmt: skip

    def infer(
        self, host: str, snapshot: list[DomainSnapshot], skip: set[str] | None = None
    ) -> list[DomainEvent]:
        """The lifecycle events that turn what is known into `snapshot`; none for the domains
        in `skip` (real events about them arrived while the snapshot was taken)."""
        skip = skip or set()
        now = time.time_ns()
        out: list[DomainEvent] = []

        def emit(d: DomainSnapshot, event: str, detail: str) -> None:
            data = Lifecycle(host=host, domain=DomainRef(d.uuid, d.name, d.id), inferred=True,
                             event=event, detail=detail or "unknown")  # fmt: skip
            out.append(DomainEvent("lifecycle", data, now))

        new = {d.uuid: d for d in snapshot if d.uuid not in skip}
        for uuid, old in self.known.items():
            if uuid not in new and uuid not in skip:
                if old.state in ACTIVE:
                    emit(old, "stopped", "unknown")
                if old.persistent:
                    emit(old, "undefined", "unknown")
        for uuid, d in new.items():
            old_or_none = self.known.get(uuid)
            if old_or_none is None:
                if d.persistent:
                    emit(d, "defined", "unknown")
                what = _transition(S.SHUTOFF, d.state)
                if what is not None and what != "stopped":
                    emit(d, what, d.reason)
                continue
            if d.persistent and not old_or_none.persistent:
                emit(d, "defined", "unknown")
            what = _transition(old_or_none.state, d.state)
            if what is not None:
                emit(d, what, d.reason)
            if old_or_none.persistent and not d.persistent:
                emit(d, "undefined", "unknown")
        return out


class Resyncs:
    """What the bus learns of libvirt's state besides its events: the snapshot at start and
    after each reconnect (with, before it, the inferred events of what changed meanwhile),
    and after dropped events (the `missed` gap); each retried while libvirt stays connected."""

    def __init__(
        self,
        host: str,
        hv: Hypervisor,
        publisher: Publisher,
        metrics: Metrics,
        settings: LibvirtSettings,
        stop: asyncio.Event,
        after_connect: Callable[[], Awaitable[None]],
    ) -> None:
        self.host = host
        self.hv = hv
        self.publisher = publisher
        self.metrics = metrics
        self.settings = settings
        self._stop = stop
        self._after_connect = after_connect
        self.tracker = StateTracker()
        hv.listen("lifecycle", self.tracker.observe)

    async def announce(self, reason: str) -> None:
        """After a (re)connect: libvirt_connected, the snapshot, the capabilities and the
        registration - what fails is tried again with back-off while libvirt stays connected;
        once the connection is lost, the reconnect that follows takes it over."""
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        announced = False
        while True:
            try:
                if not announced:
                    await self._announce_connected()
                    announced = True
                await self.resync(reason)
            except AgentError as exc:
                if not self.hv.connected:
                    log.warning("resync failed; libvirt is gone again", reason=reason,
                                error=exc.message)  # fmt: skip
                    return
                log.warning("resync failed, will retry", reason=reason, error=exc.message,
                            retry_in_s=round(backoff.delay, 2))  # fmt: skip
            else:
                break
            if await backoff.wait(self._stop):
                return
        await self._after_connect()

    async def _announce_connected(self) -> None:
        lib, hv = await self.hv.versions()
        self.publisher.submit_host_event(
            LibvirtConnected(
                host=self.host,
                uri=self.hv.uri,
                libvirt_version=lib,
                hypervisor=hv,
                event_types=[k.event_type for k in self.hv.registered],
                unsupported_event_types=self.hv.unsupported,
            )
        )

    async def resync(self, reason: str) -> None:
        """Publish a snapshot of every domain; it also accounts for any dropped events."""
        missed = self.publisher.gaps.take()
        touching = self.tracker.begin()
        try:
            domains = await self.hv.snapshot()
        except AgentError:
            self.tracker.end(touching)
            self.publisher.gaps.restore(missed)
            raise
        touched = self.tracker.end(touching)
        if reason == "reconnect":
            # What changed while libvirt was away, as events marked inferred, before the resync
            # (not for domains whose real events arrived while the snapshot was taken).
            inferred = self.tracker.infer(self.host, domains, skip=touched)
            for event in inferred:
                self.publisher.submit_event(event)
            self.metrics.events_inferred.inc(len(inferred))
        self.tracker.reset(domains, keep=touched)
        for part in resync_parts(self.host, reason, domains, missed, self.publisher.max_payload):
            self.publisher.submit_host_event(part)
        self.metrics.resyncs.labels(reason).inc()
        if missed is not None:
            log.warning(
                "resync published after dropped events",
                dropped=missed.count,
                first_sequence=missed.first_sequence,
                last_sequence=missed.last_sequence,
            )

    async def watch(self) -> None:
        """Each time libvirt's connection is lost: say so, reconnect, announce again."""
        while True:
            reason = await self.hv.wait_closed()
            log.warning("libvirt connection lost", uri=self.hv.uri, reason=reason)
            self.publisher.submit_host_event(
                LibvirtDisconnected(host=self.host, uri=self.hv.uri, reason=reason)
            )
            if not await self.hv.reconnect(self._stop):
                return
            self.metrics.libvirt_reconnects.inc()
            await self.announce("reconnect")

    async def on_overflow(self) -> None:
        """After dropped events (once the queue is low), or a resync too large to send: a
        resync naming the gap."""
        while True:
            await self.publisher.gaps.resync_needed.wait()
            gaps = self.publisher.gaps
            reason, gaps.resync_reason = gaps.resync_reason, "overflow"
            try:
                await self.resync(reason)
            except AgentError as exc:
                log.warning("overflow resync failed, will retry", error=exc.message)
                await asyncio.sleep(1.0)
