"""The async face of libvirt: the connection and its recovery, event callbacks,
and a bounded executor for every libvirt call that can block.

Callbacks run on the asyncio loop (agent.libvirt_loop dispatches them there) and hand a decoded
DomainEvent to `on_event` without awaiting anything. libvirt errors are mapped to the agent's
error tree once, here, by `libvirt_errors()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import structlog

from agent import libvirt_loop
from agent.backoff import Backoff
from agent.domain import Domain, Job, job_of
from agent.errors import (
    AgentError,
    Conflict,
    InvalidRequest,
    LibvirtFailure,
    NotFound,
    Timeout,
    Unavailable,
    Unsupported,
)
from agent.events import (
    DomainEvent,
    DomainSnapshot,
    EventKind,
    catalog,
    decode,
    domain_ref,
    domain_state_names,
)
from agent.fields import UUID_RE
from agent.metrics import Metrics
from agent.settings import LibvirtSettings

log = structlog.get_logger("agent.hypervisor")
T = TypeVar("T")

_ERROR_FAMILIES: dict[int, type[AgentError]] = {
    libvirt.VIR_ERR_NO_DOMAIN: NotFound,
    libvirt.VIR_ERR_NO_NETWORK: NotFound,
    libvirt.VIR_ERR_OPERATION_INVALID: Conflict,
    libvirt.VIR_ERR_NO_SUPPORT: Unsupported,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: Unsupported,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: Unsupported,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: Timeout,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: Timeout,
    libvirt.VIR_ERR_OPERATION_ABORTED: Conflict,
    libvirt.VIR_ERR_NO_CONNECT: Unavailable,
    libvirt.VIR_ERR_SYSTEM_ERROR: LibvirtFailure,
}


@contextlib.contextmanager
def libvirt_errors() -> Iterator[None]:
    """Translate libvirtError into the agent's error families, keeping libvirt's code."""
    try:
        yield
    except libvirt.libvirtError as exc:
        code = exc.get_error_code()
        family = _ERROR_FAMILIES.get(code, LibvirtFailure)
        raise family(str(exc).strip(), libvirt_code=code) from exc


class LinkState(enum.Enum):
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    CLOSED = "closed"


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "client",
}


class Hypervisor:
    """One libvirt connection, kept open, with every domain event id registered."""

    def __init__(
        self,
        settings: LibvirtSettings,
        uri: str,
        host: str,
        on_event: Callable[[DomainEvent], None],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.uri = uri
        self.host = host
        self._on_event = on_event
        self.metrics = metrics
        self.conn: libvirt.virConnect | None = None
        self.state = LinkState.DISCONNECTED
        self.registered: list[EventKind] = []
        self.unsupported: list[str] = []
        self._callback_ids: list[int] = []
        self._closed = asyncio.Event()
        self.close_reason = ""
        self._executor = ThreadPoolExecutor(
            max_workers=settings.executor_workers, thread_name_prefix="libvirt"
        )
        self._busy = 0
        self._bound = settings.executor_workers + settings.executor_queue
        self.decode_errors = 0
        self._cpu: str | None = None  # the host CPU, from the capabilities of this connection
        self._waiters: dict[tuple[str, str, str | None], list[asyncio.Future[DomainEvent]]] = {}
        # Told of every event of a type: the state tracker and the failover reconciler follow
        # lifecycle events, a running migration its migration_iteration events.
        self._listeners: dict[str, list[Callable[[DomainEvent], None]]] = {}
        metrics.executor_capacity.set(self._bound)
        metrics.track(metrics.executor_busy, lambda: self._busy)

    # ------------------------------------------------------------ executor

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking libvirt call on the bounded executor, errors mapped."""
        if self.state is LinkState.CLOSED:
            raise Unavailable("the libvirt connection is closed", uri=self.uri)
        if self._busy >= self._bound:
            self.metrics.executor_rejected.inc()
            raise Unavailable(
                "libvirt executor is full", running_or_queued=self._busy, bound=self._bound
            )
        self._busy += 1
        try:
            with libvirt_errors():
                return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._busy -= 1

    # ------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self.state is LinkState.CONNECTED

    async def connect(self) -> None:
        """Open the connection and register every event id the running libvirt accepts."""
        libvirt_loop.ensure_registered(asyncio.get_running_loop())
        conn = await self.call(libvirt.open, self.uri)
        if self.settings.keepalive_interval_s > 0:
            # Local drivers (test:///) have no keepalive; that is not an error.
            with contextlib.suppress(libvirt.libvirtError):
                conn.setKeepAlive(self.settings.keepalive_interval_s, self.settings.keepalive_count)
        self._closed.clear()
        self._cpu = None
        with contextlib.suppress(libvirt.libvirtError):
            conn.registerCloseCallback(self._on_close, None)
        self.conn = conn
        await self.call(self._register_all, conn)
        self.state = LinkState.CONNECTED
        self.metrics.libvirt_connected.set(1)
        log.info(
            "libvirt connected",
            uri=self.uri,
            event_types=[k.event_type for k in self.registered],
            unsupported=self.unsupported,
        )

    def _register_all(self, conn: libvirt.virConnect) -> None:
        self.registered, self.unsupported, self._callback_ids = [], [], []
        for kind in catalog():
            try:
                cid = conn.domainEventRegisterAny(None, kind.event_id, self._callback, kind)
            except libvirt.libvirtError as exc:
                self.unsupported.append(kind.event_type)
                log.info(
                    "event id not offered by this libvirt",
                    event_type=kind.event_type,
                    error=str(exc).strip(),
                )
                continue
            self.registered.append(kind)
            self._callback_ids.append(cid)

    def _callback(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, *args: Any) -> None:
        kind: EventKind = args[-1]
        try:
            event = decode(kind, self.host, dom, args[:-1])
        except Exception:
            # A decoder bug must not kill libvirt's dispatch; it is counted and logged loudly.
            self.decode_errors += 1
            log.exception(
                "could not decode a libvirt event", event_type=kind.event_type, args=repr(args[:-1])
            )
            return
        self._on_event(event)
        if self._waiters:
            self._wake(event)
        listeners = self._listeners.get(kind.event_type)
        if listeners:
            for listener in listeners:
                listener(event)

    # ------------------------------------------------------------ waiting for events

    def listen(self, event_type: str, fn: Callable[[DomainEvent], None]) -> Callable[[], None]:
        """Call `fn` with every event of this type (on the loop); returns what stops it."""
        self._listeners.setdefault(event_type, []).append(fn)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._listeners[event_type].remove(fn)

        return stop

    def expect(
        self, domain_uuid: str, event_types: tuple[str, ...], alias: str
    ) -> asyncio.Future[DomainEvent]:
        """A future for the next event of one of these types naming this device alias.
        Register it before the call that causes the event."""
        fut: asyncio.Future[DomainEvent] = asyncio.get_running_loop().create_future()
        for t in event_types:
            self._waiters.setdefault((domain_uuid, t, alias), []).append(fut)
        return fut

    def _wake(self, event: DomainEvent) -> None:
        alias = getattr(event.data, "alias", None)
        key = (event.data.domain.uuid, event.event_type, alias)
        for fut in self._waiters.pop(key, []):
            if not fut.done():
                fut.set_result(event)
        # Drop futures that were resolved through another of their event types.
        for k in [k for k, futs in self._waiters.items() if all(f.done() for f in futs)]:
            del self._waiters[k]

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        self.close_reason = _CLOSE_REASONS.get(reason, f"unknown_{reason}")
        self.state = LinkState.DISCONNECTED
        self.metrics.libvirt_connected.set(0)
        self._closed.set()

    async def wait_closed(self) -> str:
        await self._closed.wait()
        return self.close_reason

    async def reconnect(self, stop: asyncio.Event) -> bool:
        """Re-open the connection with exponential back-off; False if asked to stop first."""
        self._drop_connection()
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        while not stop.is_set():
            try:
                await self.connect()
            except AgentError as exc:
                log.warning("libvirt reconnect failed", uri=self.uri, error=exc.message,
                            retry_in_s=round(backoff.delay, 2))  # fmt: skip
                await backoff.wait(stop)
                continue
            return True
        return False

    def _drop_connection(self) -> None:
        self.stop_events()
        conn, self.conn = self.conn, None
        if conn is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def stop_events(self) -> None:
        """Deregister every callback: after this no event reaches the agent."""
        conn = self.conn
        if conn is None:
            return
        for cid in self._callback_ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cid)
        self._callback_ids = []

    async def close(self) -> None:
        self._drop_connection()
        self.state = LinkState.CLOSED
        self.metrics.libvirt_connected.set(0)
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Let libvirt's free-callbacks for the closed connection run on the loop.
        await asyncio.sleep(0)

    # ------------------------------------------------------------ domains

    def connection(self) -> libvirt.virConnect:
        """The connection, or `unavailable` while libvirt is disconnected."""
        conn = self.conn
        if conn is None or not self.connected:
            raise Unavailable("libvirt is not connected", uri=self.uri)
        return conn

    async def find(self, uuid: str) -> Domain | None:
        """The domain with this UUID, or None."""
        raw = await self.call(_or_none, self.connection().lookupByUUIDString, uuid)
        return None if raw is None else Domain(self.call, raw)

    async def domain(self, uuid: str) -> Domain:
        """The domain with this UUID; `not_found` otherwise."""
        dom = await self.find(uuid)
        if dom is None:
            raise NotFound(f"domain {uuid!r} not found", domain=uuid)
        return dom

    async def lookup(self, name_or_uuid: str) -> Domain:
        """The domain a request names (a UUID or a name); `not_found` names what was asked
        for. A name may look like a UUID: what is asked for is the domain with that UUID or
        that name, and when one domain has it as UUID and another as name, the request is
        ambiguous."""
        raw = await self.call(_lookup, self.connection(), name_or_uuid)
        return Domain(self.call, raw)

    async def running(self) -> list[Domain]:
        """Every active domain."""
        raws = await self.call(self.connection().listAllDomains,
                               libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)  # fmt: skip
        return [Domain(self.call, r) for r in raws]

    # ------------------------------------------------------------ queries

    async def versions(self) -> tuple[str, str]:
        """(libvirt version, hypervisor type and version) of the connected daemon."""
        conn = self.connection()

        def _q() -> tuple[str, str]:
            lib = _version_str(conn.getLibVersion())
            typ = conn.getType()
            try:
                hv = _version_str(conn.getVersion())
            except libvirt.libvirtError:
                hv = "unknown"
            return lib, f"{typ} {hv}"

        return await self.call(_q)

    async def remote_domain(self, uri: str, uuid: str) -> tuple[bool, str | None]:
        """Whether the domain runs on another host's libvirt, and its live XML there."""

        def look() -> tuple[bool, str | None]:
            conn = libvirt.open(uri)
            try:
                dom = conn.lookupByUUIDString(uuid)
                if not dom.isActive():
                    return False, None
                return True, str(dom.XMLDesc(0))
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False, None  # not there, or gone while it was asked
                raise
            finally:
                conn.close()

        return await self.call(look)

    async def where_is(self, uuid: str, dest_uri: str | None) -> str:
        """Where a domain runs after a migration (whatever the call or the events said):
        "source" (this host), "destination" (the libvirt at `dest_uri`) or "nowhere"."""
        try:
            dom = await self.find(uuid)
            here = dom is not None and await dom.is_active()
        except Unavailable:
            raise
        except AgentError:
            here = False  # gone between the lookup and the question
        if here:
            return "source"
        if dest_uri is not None:
            active, _ = await self.remote_domain(dest_uri, uuid)
            if active:
                return "destination"
        return "nowhere"

    async def host_load(self) -> HostLoad:
        conn = self.conn
        if conn is None:
            raise Unavailable("libvirt is not connected", uri=self.uri)
        load = await self.call(_host_load, conn)
        if self._cpu is None:  # read once per connection
            self._cpu = host_cpu(await self.call(conn.getCapabilities))
        return dataclasses.replace(load, cpu=self._cpu)

    async def snapshot(self) -> list[DomainSnapshot]:
        """uuid, name, state and reason of every domain, defined or running."""
        conn = self.conn
        if conn is None:
            raise Unavailable("libvirt is not connected", uri=self.uri)

        def _take() -> list[DomainSnapshot]:
            out = []
            for dom in conn.listAllDomains(0):
                try:
                    state, reason = dom.state()
                    persistent = bool(dom.isPersistent())
                except libvirt.libvirtError:
                    continue  # vanished between the listing and the query
                st, rs = domain_state_names(state, reason)
                ref = domain_ref(dom)
                out.append(
                    DomainSnapshot(
                        uuid=ref.uuid,
                        name=ref.name,
                        state=st,
                        reason=rs,
                        id=ref.id,
                        persistent=persistent,
                    )
                )
            return out

        return await self.call(_take)


@dataclass(frozen=True, slots=True)
class DomainLoad:
    uuid: str
    max_memory_kib: int
    incoming: bool  # an incoming migration: libvirt runs it, it has not arrived


@dataclass(frozen=True, slots=True)
class HostLoad:
    """What admission reads from libvirt: the host's memory and its active domains."""

    memory_kib: int
    domains: list[DomainLoad]
    arch: str = ""
    # The host CPU as libvirt's capabilities name it, `vendor/model` (empty when they do not
    # say): a host-passthrough guest moves only to the same.
    cpu: str = ""


def _host_load(conn: libvirt.virConnect) -> HostLoad:
    info = conn.getInfo()  # model (the architecture), memory (MiB), ...
    memory_kib = int(info[1]) * 1024
    domains = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            uuid, max_memory = dom.UUIDString(), int(dom.maxMemory())
        except libvirt.libvirtError:
            continue  # gone between the listing and the query
        try:
            incoming = job_of(dom) is Job.INCOMING
        except libvirt.libvirtError:
            incoming = False  # its memory counts all the same
        domains.append(DomainLoad(uuid, max_memory, incoming))
    return HostLoad(memory_kib, domains, str(info[0]))


def _or_none(lookup: Callable[[str], Any], key: str) -> Any:  # runs on the executor
    """The virDomain `lookup(key)` finds, or None where libvirt has no such domain."""
    try:
        return lookup(key)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _lookup(
    conn: libvirt.virConnect, name_or_uuid: str
) -> libvirt.virDomain:  # runs on the executor
    by_uuid = (
        _or_none(conn.lookupByUUIDString, name_or_uuid) if UUID_RE.match(name_or_uuid) else None
    )
    by_name = _or_none(conn.lookupByName, name_or_uuid)
    if by_uuid is not None and by_name is not None and by_uuid.UUID() != by_name.UUID():
        raise InvalidRequest(
            f"{name_or_uuid!r} is the UUID of domain {by_uuid.name()!r} and the name of domain "
            f"{by_name.UUIDString()}; ask for one of them by the other's UUID or name",
            domain=name_or_uuid,
        )
    dom = by_uuid or by_name
    if dom is None:
        raise NotFound(f"domain {name_or_uuid!r} not found", domain=name_or_uuid)
    return dom


def host_cpu(capabilities: str) -> str:
    """`vendor/model` of the host CPU in libvirt's capabilities XML."""
    cpu = ET.fromstring(capabilities).find("host/cpu")  # noqa: S314 - libvirt's own XML
    vendor = (cpu.findtext("vendor") or "") if cpu is not None else ""
    model = (cpu.findtext("model") or "") if cpu is not None else ""
    return f"{vendor}/{model}" if vendor or model else ""


def _version_str(v: int) -> str:
    return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"
