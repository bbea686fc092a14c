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

import time

from agent.events import DomainEvent, DomainRef, DomainSnapshot, Lifecycle

ACTIVE = frozenset({"running", "blocked", "paused", "shutdown", "pmsuspended"})
# The state a domain is in after a lifecycle event (events that change no state are absent).
AFTER_EVENT = {
    "started": "running",
    "resumed": "running",
    "suspended": "paused",
    "stopped": "shutoff",
    "crashed": "crashed",
    "pmsuspended": "pmsuspended",
}


def _transition(old: str, new: str) -> str | None:
    if old == new or (old in ("running", "blocked") and new in ("running", "blocked")):
        return None
    if new in ("running", "blocked"):
        return "resumed" if old in ("paused", "pmsuspended") else "started"
    if new == "paused":
        return "suspended" if old in ACTIVE else "started"
    if new in ("shutoff", "crashed", "pmsuspended"):
        return {"shutoff": "stopped"}.get(new, new)
    return None  # nostate, shutdown (in progress): no event says it


class StateTracker:
    def __init__(self) -> None:
        self.known: dict[str, DomainSnapshot] = {}
        # Per snapshot being taken (resyncs may overlap), the domains with lifecycle events
        # meanwhile: the snapshot may be older than those events, so what they say is kept.
        self._touching: list[set[str]] = []

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

    def observe(self, event: DomainEvent) -> None:
        """Follow one domain event (only lifecycle events change what is known)."""
        data = event.data
        if not isinstance(data, Lifecycle):
            return
        uuid = data.domain.uuid
        for touched in self._touching:
            touched.add(uuid)
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
        if cur is None:
            self.known[uuid] = DomainSnapshot(uuid, data.domain.name, state or "shutoff",
                                              data.detail, data.domain.id,
                                              persistent=data.event == "defined")  # fmt: skip
        elif state is not None:
            gone = state == "shutoff" and not cur.persistent
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
                what = _transition("shutoff", d.state)
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
