"""Owed primaries: the failover record a domain carries in its own metadata, and the reconcile
loop that plugs a primary back wherever the domain runs.

Before migrate-with-failover unplugs a primary NIC it writes a record into the live domain's
metadata (namespace below): which alias, its definition, the operation, source and
destination. The record travels with the VM in the migration. Whichever agent runs the
domain settles it - the source after a failed or interrupted migration (rollback), the
destination after a successful one (replug):

- record, device attached, no unplug in flight: the record is cleared;
- record, device missing: the primary is plugged (this host's reservation, else the recorded
  definition), DEVICE_ADDED awaited, then the record is cleared.

A domain is left alone while it is not running, has a job (a migration) active, or an
operation of this agent holds it. The loop runs every `failover.reconcile_interval_s`, at
start, and on demand (`failover.replug`), with back-off per domain after failures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import libvirt
import msgspec
import structlog

from agent.backoff import Backoff
from agent.devices import device_element, plug, qemu_has_device
from agent.domain import Domain, DomainState, Job
from agent.errors import AgentError, NotFound
from agent.hypervisor import Hypervisor
from agent.journal import Reservation
from agent.metrics import Metrics
from agent.pool import Pool
from agent.settings import FailoverSettings

log = structlog.get_logger("agent.failover")

NS = "https://virt-agent.dev/xmlns/failover/1"
PREFIX = "virtagent"
NOT_RUNNING = "not running"
MIN_GAP_S = 0.2  # between two reconcile passes, however many domains start or resume
PLUGGED_KEPT = 1024  # plug times kept for the sources that ask for them (failover.replug)
UNPLUGGING = "unplugging"  # detach sent; DEVICE_REMOVED not (yet) seen
OWED = "owed"  # the primary is out of the guest: plug it wherever the domain runs


class Record(msgspec.Struct, frozen=True, kw_only=True):
    operation: str
    source: str
    destination: str
    alias: str
    mac: str
    mode: str
    state: str
    since: float
    device: str  # the primary's definition, as recorded at unplug
    # What the source's live definition had from its hostdev network (<carry managed=...>
    # with <vlan>/<virtualport>), for a destination that plugs another kind of port.
    carry: str = ""


def record_to_xml(r: Record) -> str:
    el = ET.Element("failover")
    for k in ("operation", "source", "destination", "alias", "mac", "mode", "state"):
        el.set(k, getattr(r, k))
    el.set("since", repr(r.since))
    ET.SubElement(el, "device").text = r.device
    if r.carry:
        ET.SubElement(el, "carry").text = r.carry
    return ET.tostring(el, encoding="unicode")


def record_from_xml(xml: str) -> Record:
    el = ET.fromstring(xml)  # noqa: S314 - written by an agent into libvirt's metadata
    return Record(
        **{k: el.get(k, "") for k in ("operation", "source", "destination", "alias", "mac",
                                      "mode", "state")},
        since=float(el.get("since", "0")),
        device=el.findtext("device", ""),
        carry=el.findtext("carry", ""),
    )  # fmt: skip


async def read_record(dom: Domain) -> Record | None:
    xml = await dom.metadata(NS)
    return record_from_xml(xml) if xml else None


async def write_record(dom: Domain, r: Record) -> None:
    await dom.set_metadata(NS, PREFIX, record_to_xml(r))


async def clear_record(dom: Domain) -> None:
    await dom.set_metadata(NS, PREFIX, None)


class Settled(enum.Enum):
    NO_RECORD = "no_record"
    ATTACHED = "attached"  # the primary was there; the record is cleared
    PLUGGED = "plugged"  # the primary was plugged; the record is cleared
    WAITING = "waiting"  # not now: not running, a job or an operation holds it, unplug in flight


class Outcome(msgspec.Struct, frozen=True):
    settled: Settled
    alias: str = ""
    why: str = ""


def _same_nic(a: str, b: str) -> bool:
    """Same kind of NIC on the same host resource (element, type, source, model), however
    the two documents are indented."""

    def key(xml: str) -> tuple[str, ...]:
        el = ET.fromstring(xml)  # noqa: S314 - libvirt's or the agent's own XML
        parts = [el.tag, el.get("type", "")]
        for tag in ("source", "model"):
            sub = el.find(tag)
            parts.append(
                ET.canonicalize(ET.tostring(sub, encoding="unicode"), strip_text=True)
                if sub is not None else ""
            )  # fmt: skip
        return tuple(parts)

    return key(a) == key(b)


class Reconciler:
    def __init__(
        self,
        hv: Hypervisor,
        host: str,
        settings: FailoverSettings,
        pool: Pool,
        metrics: Metrics,
        locks: Callable[[str], contextlib.AbstractAsyncContextManager[None]],
        busy: Callable[[str], str | None],
        plug_timeout_s: float,
    ) -> None:
        self.hv = hv
        self.host = host
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.lock = locks
        self.busy = busy  # the operation holding a domain, if any
        self.plug_timeout_s = plug_timeout_s
        self._retry_at: dict[str, tuple[float, Backoff]] = {}  # uuid -> (when, its back-off)
        # When this host plugged the primary of an operation (DEVICE_ADDED, ns): the source
        # asks for it (failover.replug) to report the outage; the latest few are kept.
        self.plugged_at: collections.OrderedDict[str, int] = collections.OrderedDict()
        # A domain that starts or resumes here (a migration in) is checked at once.
        self.kick = asyncio.Event()
        self._due: set[str] = set()
        # Domains owed a primary that were paused when looked at: their resume is due.
        self._paused_owed: set[str] = set()
        hv.listen("lifecycle", self._on_lifecycle)

    def entries(self) -> int:
        """Domains this reconciler holds something for (due, waiting to retry, or owed a
        primary while paused)."""
        return len(self._due | self._retry_at.keys() | self._paused_owed)

    def _forget(self, uuid: str) -> None:
        self._retry_at.pop(uuid, None)
        self._paused_owed.discard(uuid)

    def _on_lifecycle(self, event: Any) -> None:
        """Look at once at what can bring a domain an owed primary: a start, a resume after
        a migration (or a snapshot), a resume of a domain found owed while paused. A plain
        suspend/resume cannot - it costs no libvirt call here (the full pass still runs)."""
        d = event.data
        uuid = d.domain.uuid
        if d.event == "started" or (
            d.event == "resumed" and (d.detail != "unpaused" or uuid in self._paused_owed)
        ):
            self._due.add(uuid)
            self.kick.set()

    async def settle(
        self, dom: Domain, owner: str | None = None, unplug_done: bool = False
    ) -> Outcome:
        """Bring one domain's primary back in line with its record (see the module doc).
        `owner`: the id of this agent's operation that holds the domain and asks itself.
        `unplug_done`: the caller saw the unplug end (DEVICE_REMOVAL_FAILED, or the detach
        refused), so an attached device is not going away; otherwise an `unplugging` record
        with the device attached waits for unplug_grace_s."""
        hv = self.hv
        uuid = dom.uuid
        async with self.lock(uuid):
            rec = await read_record(dom)
            if rec is None:
                return Outcome(Settled.NO_RECORD)
            why = await self._not_now(dom, uuid, owner)
            if why:
                return Outcome(Settled.WAITING, rec.alias, why)
            live = await dom.xml()
            attached = device_element(live, rec.alias)
            moved_in = rec.source != self.host
            if attached is not None:
                young = time.time() - rec.since < self.settings.unplug_grace_s
                if rec.state == UNPLUGGING and not unplug_done and young:
                    return Outcome(Settled.WAITING, rec.alias, "an unplug may still be in flight")
                if moved_in and rec.mode == "qemu":
                    # libvirt lists the primary whatever QEMU did with it: QEMU is asked.
                    present, how = await qemu_has_device(dom, rec.alias)
                    if not present:
                        return Outcome(Settled.WAITING, rec.alias,
                                       f"QEMU has not plugged the primary back: {how}")  # fmt: skip
                res = self.pool.for_operation(rec.operation)
                if moved_in and res is not None:
                    # Plugged here by an earlier attempt whose DEVICE_ADDED came late.
                    await self._sync_config(dom, self._definition(res, rec), rec.alias)
                await clear_record(dom)
                if res is not None:
                    await self.pool.release(res.id)
                return Outcome(Settled.ATTACHED, rec.alias)
            log.info("plugging owed primary", domain=uuid, alias=rec.alias,
                     operation=rec.operation, source=rec.source)  # fmt: skip
            if not moved_in:
                added = await plug(hv, dom, rec.device, rec.alias, self.plug_timeout_s)
                xml = rec.device
            else:
                res = await self.pool.take(rec.operation, uuid, rec.device)
                xml = self._definition(res, rec)
                async with self.pool.plugging(res):
                    added = await plug(hv, dom, xml, rec.alias, self.plug_timeout_s)
            self.plugged_at[rec.operation] = added.time_ns
            while len(self.plugged_at) > PLUGGED_KEPT:
                self.plugged_at.popitem(last=False)
            await self._sync_config(dom, xml, rec.alias)
            await clear_record(dom)
            self.metrics.replugs.labels("plugged").inc()
            return Outcome(Settled.PLUGGED, rec.alias)

    def _definition(self, res: Reservation, rec: Record) -> str:
        return self.pool.definition(res.resource, rec.device, rec.mac, rec.carry)

    async def _not_now(self, dom: Domain, uuid: str, owner: str | None) -> str:
        holder = self.busy(uuid)
        if holder is not None and holder != owner:
            return f"operation {holder} holds it"
        state, _ = await dom.state()
        if state is not DomainState.RUNNING:
            return NOT_RUNNING
        job = await dom.job()
        if job is Job.INCOMING:
            return "an incoming migration is running"
        if job is Job.RUNNING:
            return "a job is active"
        return ""

    async def _sync_config(self, dom: Domain, xml: str, alias: str) -> None:
        """The persistent definition keeps the primary all along (the live unplug leaves it);
        it changes only when this host plugged a different resource than it lists."""
        if not await dom.persistent():
            return
        cur = device_element(await dom.xml(inactive=True), alias)
        if cur is None:
            # Migrated here with the primary left out of its definition (the source did not
            # know what this host would plug): the plugged one is defined now.
            await dom.attach(xml, live=False, config=True)
            return
        cur_xml = ET.tostring(cur, encoding="unicode")
        if _same_nic(cur_xml, xml):
            return

        def replace(d: libvirt.virDomain) -> None:
            # One executor call: a cancel of the caller cannot split detach from attach.
            config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            d.detachDeviceFlags(cur_xml, config)
            try:
                d.attachDeviceFlags(xml, config)
            except libvirt.libvirtError:
                d.attachDeviceFlags(cur_xml, config)  # keep the old primary rather than none
                raise

        await dom.run(replace)

    async def _settle_counted(self, dom: Domain, now: float) -> bool:
        """Settle one domain with per-domain back-off; whether it is still owed a primary."""
        uuid = dom.uuid
        when, backoff = self._retry_at.get(uuid, (0.0, None))
        if now < when:
            return True
        self.metrics.reconcile_checks.inc()
        try:
            out = await self.settle(dom)
        except NotFound as exc:
            if exc.details.get("libvirt_code") == libvirt.VIR_ERR_NO_DOMAIN:
                self._forget(uuid)  # gone meanwhile: nothing is owed here any more
                return False
            return self._failed(uuid, backoff, now, exc)  # a network, a template...: owed
        except Exception as exc:  # noqa: BLE001 - one domain's failure must not stop the pass
            return self._failed(uuid, backoff, now, exc)
        self._retry_at.pop(uuid, None)
        if out.settled is Settled.WAITING and out.why == NOT_RUNNING:
            self._paused_owed.add(uuid)
        else:
            self._paused_owed.discard(uuid)
        return out.settled is Settled.WAITING

    def _failed(self, uuid: str, backoff: Backoff | None, now: float, exc: Exception) -> bool:
        """A settle that failed: counted, logged, tried again after a back-off; still owed."""
        backoff = backoff or Backoff(1.0, 60.0)
        delay = backoff.next()
        self._retry_at[uuid] = (now + delay, backoff)
        self.metrics.replugs.labels("failed").inc()
        log.warning("could not settle owed primary", domain=uuid,
                    error=getattr(exc, "message", None) or repr(exc),
                    retry_in_s=round(delay, 1))  # fmt: skip
        return True

    async def pass_once(self) -> int:
        """Settle every running domain; the number still owed a primary."""
        hv = self.hv
        if hv.conn is None or not hv.connected:
            return 0
        doms = await hv.running()
        now = time.monotonic()
        owed = 0
        running = {d.uuid for d in doms}
        for gone in self._retry_at.keys() - running:
            del self._retry_at[gone]  # stopped or gone: its back-off is over
        self._paused_owed &= running
        for dom in doms:
            owed += await self._settle_counted(dom, now)
        self.metrics.owed_primaries.set(owed)
        self.metrics.reservations.set(len(self.pool.active()))
        return owed

    async def settle_due(self) -> None:
        """Settle the domains that just started or resumed here."""
        due, self._due = self._due, set()
        hv = self.hv
        if hv.conn is None or not hv.connected:
            return
        now = time.monotonic()
        for uuid in due:
            try:
                dom = await hv.domain(uuid)
            except AgentError:
                self._forget(uuid)
                continue  # gone again
            await self._settle_counted(dom, now)

    async def run(self) -> None:
        """A full pass every interval; in between, domains that start or resume are settled
        at once (at most every MIN_GAP_S, so a burst of lifecycle events costs nothing)."""
        loop = asyncio.get_running_loop()
        next_full = 0.0
        while True:
            self.kick.clear()
            try:
                if loop.time() >= next_full:
                    self._due.clear()
                    await self.pass_once()
                    next_full = loop.time() + self.settings.reconcile_interval_s
                else:
                    await self.settle_due()
            except AgentError as exc:
                log.warning("reconcile pass failed", error=exc.message)
            except Exception:
                # A bug here must not take the agent down; the next pass tries again.
                log.exception("reconcile pass failed unexpectedly")
            await asyncio.sleep(MIN_GAP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.kick.wait(), max(0.0, next_full - loop.time()))
