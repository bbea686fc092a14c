"""Typed events: libvirt callback arguments decoded once, enum values turned into names.

No I/O here. `catalog()` lists the domain event ids the installed libvirt bindings know, each
with its contract name (`lifecycle`, `io_error`, `block_job`, ...) and a decoder; ids newer
than this module still get a generic decoder so nothing the running libvirt offers is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import libvirt
from msgspec import Struct

# ---------------------------------------------------------------- libvirt enums -> names


def _enum(
    prefix: str, *, only: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> dict[int, str]:
    """Map the values of libvirt constants PREFIX* to their lower-case suffixes."""
    out: dict[int, str] = {}
    for name in dir(libvirt):
        if not name.startswith(prefix) or name.endswith("_LAST"):
            continue
        suffix = name[len(prefix) :]
        if only is not None and suffix not in only:
            continue
        if any(suffix.startswith(x) for x in exclude):
            continue
        value = getattr(libvirt, name)
        if isinstance(value, int):
            out.setdefault(value, suffix.lower())
    return out


def name_of(table: dict[int, str], value: int) -> str:
    return table.get(value, f"unknown_{value}")


LIFECYCLE_EVENTS = (
    "DEFINED",
    "UNDEFINED",
    "STARTED",
    "SUSPENDED",
    "RESUMED",
    "STOPPED",
    "SHUTDOWN",
    "PMSUSPENDED",
    "CRASHED",
)
LIFECYCLE = _enum("VIR_DOMAIN_EVENT_", only=LIFECYCLE_EVENTS)
LIFECYCLE_DETAIL = {
    getattr(libvirt, f"VIR_DOMAIN_EVENT_{ev}"): _enum(f"VIR_DOMAIN_EVENT_{ev}_")
    for ev in LIFECYCLE_EVENTS
    if hasattr(libvirt, f"VIR_DOMAIN_EVENT_{ev}")
}

DOMAIN_STATES = (
    "NOSTATE",
    "RUNNING",
    "BLOCKED",
    "PAUSED",
    "SHUTDOWN",
    "SHUTOFF",
    "CRASHED",
    "PMSUSPENDED",
)
DOMAIN_STATE = _enum("VIR_DOMAIN_", only=DOMAIN_STATES)
# virDomainShutdownFlags share the VIR_DOMAIN_SHUTDOWN_ prefix with the shutdown reasons.
_STATE_REASON_LIMITS: dict[str, dict[str, Any]] = {
    "SHUTDOWN": {"only": ("UNKNOWN", "USER")},
    "PMSUSPENDED": {"exclude": ("DISK_",)},
}
DOMAIN_STATE_REASON = {
    getattr(libvirt, f"VIR_DOMAIN_{st}"): _enum(
        f"VIR_DOMAIN_{st}_", **_STATE_REASON_LIMITS.get(st, {})
    )
    for st in DOMAIN_STATES
    if hasattr(libvirt, f"VIR_DOMAIN_{st}")
}

WATCHDOG_ACTION = _enum("VIR_DOMAIN_EVENT_WATCHDOG_")
IO_ERROR_ACTION = _enum("VIR_DOMAIN_EVENT_IO_ERROR_")
GRAPHICS_PHASE = _enum("VIR_DOMAIN_EVENT_GRAPHICS_", only=("CONNECT", "INITIALIZE", "DISCONNECT"))
GRAPHICS_FAMILY = _enum("VIR_DOMAIN_EVENT_GRAPHICS_ADDRESS_")
BLOCK_JOB_TYPE = _enum("VIR_DOMAIN_BLOCK_JOB_TYPE_")
BLOCK_JOB_STATUS = _enum("VIR_DOMAIN_BLOCK_JOB_", only=("COMPLETED", "FAILED", "CANCELED", "READY"))
DISK_CHANGE_REASON = _enum("VIR_DOMAIN_EVENT_DISK_")
TRAY_CHANGE_REASON = _enum("VIR_DOMAIN_EVENT_TRAY_CHANGE_")
AGENT_STATE = _enum("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_")
AGENT_REASON = _enum("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_")
METADATA_TYPE = _enum("VIR_DOMAIN_METADATA_")
MEMORY_FAILURE_RECIPIENT = _enum("VIR_DOMAIN_EVENT_MEMORY_FAILURE_RECIPIENT_")
MEMORY_FAILURE_ACTION = _enum("VIR_DOMAIN_EVENT_MEMORY_FAILURE_ACTION_")
MEMORY_FAILURE_FLAGS = _enum("VIR_DOMAIN_MEMORY_FAILURE_")
JOB_OPERATION = _enum("VIR_DOMAIN_JOB_OPERATION_")
JOB_TYPE = _enum(
    "VIR_DOMAIN_JOB_", only=("NONE", "BOUNDED", "UNBOUNDED", "COMPLETED", "FAILED", "CANCELLED")
)


def flag_names(table: dict[int, str], value: int) -> list[str]:
    names = [n for bit, n in sorted(table.items()) if bit and value & bit == bit]
    rest = value & ~sum(b for b in table if value & b == b)
    if rest:
        names.append(f"unknown_{rest:#x}")
    return names


def domain_state_names(state: int, reason: int) -> tuple[str, str]:
    return name_of(DOMAIN_STATE, state), name_of(DOMAIN_STATE_REASON.get(state, {}), reason)


# ---------------------------------------------------------------- typed events


class DomainRef(Struct, frozen=True):
    uuid: str
    name: str
    # None while the domain is not running (libvirt reports -1).
    id: int | None = None


class EventData(Struct, frozen=True, kw_only=True):
    """The `data` of every domain event: host and domain first, then the event's own fields."""

    host: str
    domain: DomainRef
    # True when the agent computed the event from a snapshot difference, not from a callback.
    inferred: bool = False


class Lifecycle(EventData, frozen=True, kw_only=True):
    event: str
    detail: str


class Reboot(EventData, frozen=True, kw_only=True):
    pass


class RtcChange(EventData, frozen=True, kw_only=True):
    utcoffset_s: int


class Watchdog(EventData, frozen=True, kw_only=True):
    action: str


class IoError(EventData, frozen=True, kw_only=True):
    src_path: str | None
    alias: str | None
    action: str
    reason: str


class GraphicsAddress(Struct, frozen=True):
    family: str
    node: str
    service: str


class GraphicsIdentity(Struct, frozen=True):
    type: str
    name: str


class Graphics(EventData, frozen=True, kw_only=True):
    phase: str
    local: GraphicsAddress | None
    remote: GraphicsAddress | None
    auth_scheme: str | None
    subject: list[GraphicsIdentity]


class ControlError(EventData, frozen=True, kw_only=True):
    pass


class BlockJob(EventData, frozen=True, kw_only=True):
    disk: str
    job_type: str
    status: str


class DiskChange(EventData, frozen=True, kw_only=True):
    old_src_path: str | None
    new_src_path: str | None
    alias: str | None
    reason: str


class TrayChange(EventData, frozen=True, kw_only=True):
    alias: str | None
    reason: str


class PmEvent(EventData, frozen=True, kw_only=True):
    # libvirt documents this reason as unused; kept as its number.
    reason_code: int


class BalloonChange(EventData, frozen=True, kw_only=True):
    actual_kib: int


class Device(EventData, frozen=True, kw_only=True):
    alias: str


class Tunable(EventData, frozen=True, kw_only=True):
    params: dict[str, Any]


class AgentLifecycle(EventData, frozen=True, kw_only=True):
    state: str
    reason: str


class MigrationIteration(EventData, frozen=True, kw_only=True):
    iteration: int


class JobCompleted(EventData, frozen=True, kw_only=True):
    operation: str | None
    job_type: str | None
    params: dict[str, Any]


class MetadataChange(EventData, frozen=True, kw_only=True):
    metadata_type: str
    nsuri: str | None


class BlockThreshold(EventData, frozen=True, kw_only=True):
    dev: str
    path: str | None
    threshold: int
    excess: int


class MemoryFailure(EventData, frozen=True, kw_only=True):
    recipient: str
    action: str
    flags: list[str]


class MemoryDeviceSizeChange(EventData, frozen=True, kw_only=True):
    alias: str
    size_kib: int


class Generic(EventData, frozen=True, kw_only=True):
    """An event id newer than this agent: its arguments, as libvirt-python passed them."""

    args: list[Any]


class DomainEvent(Struct, frozen=True):
    """One libvirt domain event on its way to the bus."""

    event_type: str
    data: EventData
    # Wall-clock time of the callback, nanoseconds since the epoch.
    time_ns: int


# ---------------------------------------------------------------- decoders

Decoder = Callable[[str, DomainRef, tuple[Any, ...]], EventData]


def _graphics_addr(raw: Any) -> GraphicsAddress | None:
    if not raw:
        return None
    return GraphicsAddress(
        family=name_of(GRAPHICS_FAMILY, int(raw.get("family", -1))),
        node=str(raw.get("node", "")),
        service=str(raw.get("service", "")),
    )


def _params(raw: Any) -> dict[str, Any]:
    return {str(k): v for k, v in dict(raw or {}).items()}


def _job_completed(h: str, d: DomainRef, a: tuple[Any, ...]) -> EventData:
    params = _params(a[0])
    op = params.get("operation")
    jt = params.get("type")
    return JobCompleted(
        host=h,
        domain=d,
        operation=name_of(JOB_OPERATION, op) if isinstance(op, int) else None,
        job_type=name_of(JOB_TYPE, jt) if isinstance(jt, int) else None,
        params=params,
    )


def _lifecycle(h: str, d: DomainRef, a: tuple[Any, ...]) -> EventData:
    ev, detail = a
    return Lifecycle(
        host=h,
        domain=d,
        event=name_of(LIFECYCLE, ev),
        detail=name_of(LIFECYCLE_DETAIL.get(ev, {}), detail),
    )


DECODERS: dict[str, Decoder] = {
    "LIFECYCLE": _lifecycle,
    "REBOOT": lambda h, d, a: Reboot(host=h, domain=d),
    "RTC_CHANGE": lambda h, d, a: RtcChange(host=h, domain=d, utcoffset_s=int(a[0])),
    "WATCHDOG": lambda h, d, a: Watchdog(host=h, domain=d, action=name_of(WATCHDOG_ACTION, a[0])),
    "IO_ERROR": lambda h, d, a: IoError(
        host=h,
        domain=d,
        src_path=a[0],
        alias=a[1],
        action=name_of(IO_ERROR_ACTION, a[2]),
        reason="",
    ),
    "IO_ERROR_REASON": lambda h, d, a: IoError(
        host=h,
        domain=d,
        src_path=a[0],
        alias=a[1],
        action=name_of(IO_ERROR_ACTION, a[2]),
        reason=str(a[3]).lower(),
    ),
    "GRAPHICS": lambda h, d, a: Graphics(
        host=h,
        domain=d,
        phase=name_of(GRAPHICS_PHASE, a[0]),
        local=_graphics_addr(a[1]),
        remote=_graphics_addr(a[2]),
        auth_scheme=a[3],
        subject=[GraphicsIdentity(str(t), str(n)) for t, n in (a[4] or [])],
    ),
    "CONTROL_ERROR": lambda h, d, a: ControlError(host=h, domain=d),
    "BLOCK_JOB": lambda h, d, a: BlockJob(
        host=h,
        domain=d,
        disk=a[0],
        job_type=name_of(BLOCK_JOB_TYPE, a[1]),
        status=name_of(BLOCK_JOB_STATUS, a[2]),
    ),
    "DISK_CHANGE": lambda h, d, a: DiskChange(
        host=h,
        domain=d,
        old_src_path=a[0],
        new_src_path=a[1],
        alias=a[2],
        reason=name_of(DISK_CHANGE_REASON, a[3]),
    ),
    "TRAY_CHANGE": lambda h, d, a: TrayChange(
        host=h, domain=d, alias=a[0], reason=name_of(TRAY_CHANGE_REASON, a[1])
    ),
    "PMWAKEUP": lambda h, d, a: PmEvent(host=h, domain=d, reason_code=int(a[0])),
    "PMSUSPEND": lambda h, d, a: PmEvent(host=h, domain=d, reason_code=int(a[0])),
    "PMSUSPEND_DISK": lambda h, d, a: PmEvent(host=h, domain=d, reason_code=int(a[0])),
    "BALLOON_CHANGE": lambda h, d, a: BalloonChange(host=h, domain=d, actual_kib=int(a[0])),
    "DEVICE_REMOVED": lambda h, d, a: Device(host=h, domain=d, alias=a[0]),
    "DEVICE_ADDED": lambda h, d, a: Device(host=h, domain=d, alias=a[0]),
    "DEVICE_REMOVAL_FAILED": lambda h, d, a: Device(host=h, domain=d, alias=a[0]),
    "TUNABLE": lambda h, d, a: Tunable(host=h, domain=d, params=_params(a[0])),
    "AGENT_LIFECYCLE": lambda h, d, a: AgentLifecycle(
        host=h, domain=d, state=name_of(AGENT_STATE, a[0]), reason=name_of(AGENT_REASON, a[1])
    ),
    "MIGRATION_ITERATION": lambda h, d, a: MigrationIteration(
        host=h, domain=d, iteration=int(a[0])
    ),
    "JOB_COMPLETED": _job_completed,
    "METADATA_CHANGE": lambda h, d, a: MetadataChange(
        host=h, domain=d, metadata_type=name_of(METADATA_TYPE, a[0]), nsuri=a[1]
    ),
    "BLOCK_THRESHOLD": lambda h, d, a: BlockThreshold(
        host=h, domain=d, dev=a[0], path=a[1], threshold=int(a[2]), excess=int(a[3])
    ),
    "MEMORY_FAILURE": lambda h, d, a: MemoryFailure(
        host=h,
        domain=d,
        recipient=name_of(MEMORY_FAILURE_RECIPIENT, a[0]),
        action=name_of(MEMORY_FAILURE_ACTION, a[1]),
        flags=flag_names(MEMORY_FAILURE_FLAGS, int(a[2])),
    ),
    "MEMORY_DEVICE_SIZE_CHANGE": lambda h, d, a: MemoryDeviceSizeChange(
        host=h, domain=d, alias=a[0], size_kib=int(a[1])
    ),
}


def _generic(h: str, d: DomainRef, a: tuple[Any, ...]) -> EventData:
    return Generic(host=h, domain=d, args=[_plain(x) for x in a])


def _plain(x: Any) -> Any:
    if x is None or isinstance(x, str | int | float | bool):
        return x
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return str(x)


# Ids that a richer variant supersedes: only the variant is registered.
SUPERSEDED_BY = {"IO_ERROR": "IO_ERROR_REASON", "BLOCK_JOB": "BLOCK_JOB_2"}


class EventKind(Struct, frozen=True):
    event_id: int
    id_name: str  # the libvirt constant's suffix, e.g. BLOCK_JOB_2
    event_type: str  # the contract's name, e.g. block_job
    decode: Decoder


def contract_name(id_name: str) -> str:
    """`IO_ERROR_REASON` -> `io_error`, `BLOCK_JOB_2` -> `block_job`, `LIFECYCLE` -> `lifecycle`."""
    name = id_name
    for base, variant in SUPERSEDED_BY.items():
        if name == variant:
            name = base
    if name.rsplit("_", 1)[-1].isdigit():
        name = name.rsplit("_", 1)[0]
    return name.lower()


def catalog() -> list[EventKind]:
    """Every domain event id the installed bindings define, richest variant only."""
    prefix = "VIR_DOMAIN_EVENT_ID_"
    ids = {
        n[len(prefix) :]: getattr(libvirt, n)
        for n in dir(libvirt)
        if n.startswith(prefix) and n != prefix + "LAST"
    }
    kinds = []
    for id_name, event_id in sorted(ids.items(), key=lambda kv: kv[1]):
        if SUPERSEDED_BY.get(id_name) in ids:
            continue
        base = "BLOCK_JOB" if id_name == "BLOCK_JOB_2" else id_name
        decode = DECODERS.get(id_name) or DECODERS.get(base) or _generic
        kinds.append(EventKind(event_id, id_name, contract_name(id_name), decode))
    return kinds


def domain_ref(dom: libvirt.virDomain) -> DomainRef:
    """Identity of a libvirt domain object; local attributes only, no RPC."""
    dom_id = dom.ID()
    return DomainRef(uuid=dom.UUIDString(), name=dom.name(), id=dom_id if dom_id >= 0 else None)


def decode(
    kind: EventKind, host: str, dom: libvirt.virDomain, args: tuple[Any, ...]
) -> DomainEvent:
    """Turn one callback's arguments (without conn, dom and opaque) into a DomainEvent."""
    now = time.time_ns()
    return DomainEvent(kind.event_type, kind.decode(host, domain_ref(dom), args), now)


# ---------------------------------------------------------------- snapshots


class DomainSnapshot(Struct, frozen=True):
    uuid: str
    name: str
    state: str
    reason: str
    id: int | None = None
    persistent: bool = True
