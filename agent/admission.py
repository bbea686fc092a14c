"""Admission on the destination (contract v1.2, `failover.admit`): before a migration into this
host starts, its source asks; this host admits it or refuses with `unavailable` and the reason
(`inbound_limit`, `memory`, `no_free_primary`).

An admission holds, under one lease: an inbound slot (at most
`failover.max_inbound_migrations` incoming migrations at once, counting those libvirt runs
that nobody admitted - `virsh migrate`, an older source), the domain's memory (what libvirt
says the host has, capped by `failover.admit_memory_kib`, minus the maximum memory of every
domain it runs, minus what is admitted and not yet here), and for a domain with a primary the
VF reservation (agent/pool.py). Admissions are kept in the journal: a destination agent that
restarts loses none. An admission ends when its source releases it (`failover.release`), when
its domain runs here (the migration ended), or when its lease runs out; its VF reservation then
lives on for the replug as a `failover.reserve` one does."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog

from agent.errors import Conflict, Forbidden, Unavailable
from agent.events import DomainEvent, Lifecycle
from agent.hypervisor import HostLoad, Hypervisor
from agent.journal import Admission, Journal, Reservation
from agent.metrics import Metrics
from agent.pool import check_lease
from agent.registry import Capacity
from agent.settings import FailoverSettings

log = structlog.get_logger("agent.admission")

Reserve = Callable[[], Awaitable[Reservation]]


class Admissions:
    def __init__(
        self, settings: FailoverSettings, journal: Journal, hypervisor: Hypervisor,
        metrics: Metrics | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.journal = journal
        self.hv = hypervisor
        self.metrics = metrics
        self._lock = asyncio.Lock()
        # The incoming migration's own end, as libvirt tells it: the domain resumed here
        # (arrived), or stopped (the migration failed) - the admission ends then.
        hypervisor.listen("lifecycle", self._on_lifecycle)
        if metrics is not None:
            metrics.admissions.set_function(lambda: len(self.journal.admissions(time.time())))

    def live(self) -> list[Admission]:
        return self.journal.admissions(time.time())

    async def admit(
        self, *, operation: str, domain: str, name: str, memory_kib: int, caller: str,
        lease_s: float, reserve: Reserve | None,
    ) -> tuple[Admission, Reservation | None]:  # fmt: skip
        """Admit one incoming migration, or refuse it (`Unavailable` with `reason`). The same
        operation asking again gets its admission again."""
        s = self.settings
        check_lease(s, lease_s)
        async with self._lock:
            if self.journal.maintenance() is not None:
                self._refused("maintenance")
                raise Unavailable("this host is in maintenance (host.drain); it admits no "
                                  "migration until host.undrain", reason="maintenance")  # fmt: skip
            live = self.live()
            for a in live:
                if a.operation == operation:
                    if a.caller != caller:
                        raise Forbidden(f"operation {operation} was admitted for another host",
                                        operation_id=operation)  # fmt: skip
                    return a, (await reserve() if reserve is not None else None)
            load = await self.hv.host_load()
            live = self._ended(live, load)
            self._check_inbound(live, load)
            self._check_memory(live, load, memory_kib)
            reservation = None
            if reserve is not None:
                try:
                    reservation = await reserve()
                except (Unavailable, Conflict) as exc:
                    self._refused("no_free_primary")
                    details = {**exc.details, "reason": "no_free_primary"}
                    raise Unavailable(f"no primary for {name}: {exc.message}",
                                      **details) from None  # fmt: skip
            a = Admission(
                id=uuid.uuid4().hex, operation=operation, domain=domain, name=name, caller=caller,
                memory_kib=memory_kib,
                expires=time.time() + max(lease_s, s.lease_s),
                reservation=reservation.id if reservation else "",
            )  # fmt: skip
            self.journal.add_admission(a)
            log.info("migration admitted", operation_id=operation, domain=domain, caller=caller,
                     memory_kib=memory_kib, reservation=a.reservation)  # fmt: skip
            return a, reservation

    def _on_lifecycle(self, ev: DomainEvent) -> None:
        data = ev.data
        if not isinstance(data, Lifecycle):
            return
        if (data.event, data.detail) not in (("resumed", "migrated"), ("stopped", "failed")):
            return
        for a in self.live():
            if a.domain == data.domain.uuid:
                self.journal.delete_admission(a.id)
                log.info("admission ended: the incoming migration is over", admission=a.id,
                         domain=a.domain, event=f"{data.event}/{data.detail}")  # fmt: skip

    def _ended(self, live: list[Admission], load: HostLoad) -> list[Admission]:
        """Admissions whose domain now runs here, its migration over: they end."""
        arrived = {d.uuid for d in load.domains if not d.incoming}
        out = []
        for a in live:
            if a.domain in arrived:
                self.journal.delete_admission(a.id)
            else:
                out.append(a)
        return out

    def _check_inbound(self, live: list[Admission], load: HostLoad) -> None:
        admitted = {a.domain for a in live}
        unadmitted = [d.uuid for d in load.domains if d.incoming and d.uuid not in admitted]
        inbound = len(live) + len(unadmitted)
        limit = self.settings.max_inbound_migrations
        if inbound >= limit:
            self._refused("inbound_limit")
            raise Unavailable(
                f"{inbound} incoming migrations admitted or running here; the limit is {limit} "
                "(failover.max_inbound_migrations)",
                reason="inbound_limit", inbound=inbound, limit=limit,
                not_admitted=len(unadmitted),
            )  # fmt: skip

    def _free(self, live: list[Admission], load: HostLoad) -> tuple[int, int, int, int]:
        """(free, capacity, domains', admitted) memory in KiB."""
        cap = self.settings.admit_memory_kib
        capacity = int((min(load.memory_kib, cap) if cap else load.memory_kib)
                       * self.settings.memory_overcommit)  # fmt: skip
        here = {d.uuid for d in load.domains}
        running = sum(d.max_memory_kib for d in load.domains)
        admitted = sum(a.memory_kib for a in live if a.domain not in here)
        return capacity - running - admitted, capacity, running, admitted

    async def capacity(self) -> Capacity:
        """What this host would admit now, for the registration (a drain's planner reads it)."""
        load = await self.hv.host_load()
        free, *_ = self._free(self.live(), load)
        return Capacity(memory_kib=max(free, 0), arch=load.arch, cpu=load.cpu,
                        inbound_limit=self.settings.max_inbound_migrations)  # fmt: skip

    def _check_memory(self, live: list[Admission], load: HostLoad, memory_kib: int) -> None:
        free, capacity, running, admitted = self._free(live, load)
        if memory_kib > free:
            self._refused("memory")
            raise Unavailable(
                f"{memory_kib} KiB asked, {max(free, 0)} KiB free here (of {capacity}: domains "
                f"{running}, admitted {admitted})",
                reason="memory", asked_kib=memory_kib, free_kib=max(free, 0),
                capacity_kib=capacity,
            )  # fmt: skip

    def _refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.admissions_refused.labels(reason).inc()

    def get(self, admission_id: str) -> Admission | None:
        return next((a for a in self.live() if a.id == admission_id), None)

    def for_operation(self, operation: str) -> Admission | None:
        return next((a for a in self.live() if a.operation == operation), None)

    def release(self, a: Admission, caller: str) -> bool:
        if caller and a.caller != caller:
            raise Forbidden(f"admission {a.id} belongs to another host", admission_id=a.id)
        return self.journal.delete_admission(a.id)
