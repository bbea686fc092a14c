"""One libvirt domain, typed: its state as an enum, its XML live or inactive, its job, its
metadata, devices attached and detached. Every call goes through the hypervisor's bounded
executor with libvirt's errors mapped to the agent's; the codes the callers decide on
(`VIR_ERR_NO_DOMAIN`, `VIR_ERR_NO_DOMAIN_METADATA`, a driver without jobs) are answered here,
as values. The hypervisor hands these out (agent/hypervisor.py: `domain`, `find`, `lookup`,
`running`)."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import libvirt
import libvirt_qemu

T = TypeVar("T")


class DomainState(enum.StrEnum):
    """libvirt's virDomainState, by the names the bus uses."""

    NOSTATE = "nostate"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # being shut down
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"

    @classmethod
    def of(cls, code: int) -> DomainState:
        """The state of libvirt's code (a code newer than this agent: `nostate`)."""
        return _BY_CODE.get(code, cls.NOSTATE)

    @property
    def active(self) -> bool:
        """A running domain, in any of its forms (libvirt: the domain has a process)."""
        return self in ACTIVE


ACTIVE = frozenset({DomainState.RUNNING, DomainState.BLOCKED, DomainState.PAUSED,
                    DomainState.SHUTDOWN, DomainState.PMSUSPENDED})  # fmt: skip
_BY_CODE = {getattr(libvirt, f"VIR_DOMAIN_{s.name}"): s for s in DomainState}


class Job(enum.Enum):
    """Whether a job runs on the domain (a migration, a save, a dump)."""

    NONE = "none"  # also a driver without jobs (libvirt's test driver)
    RUNNING = "running"
    # An incoming migration: libvirt's qemu driver has no statistics for it ("statistics are
    # available only on the source host").
    INCOMING = "incoming"


def job_of(dom: libvirt.virDomain) -> Job:  # runs on the executor
    """The job of a virDomain."""
    try:
        info = dom.jobInfo()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED:
            return Job.INCOMING
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT,
                                    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):  # fmt: skip
            return Job.NONE  # a driver without jobs runs no migration either
        raise
    return Job.NONE if info[0] == libvirt.VIR_DOMAIN_JOB_NONE else Job.RUNNING


@dataclass(frozen=True, slots=True)
class Info:
    state: DomainState
    max_memory_kib: int
    memory_kib: int
    vcpus: int


class Caller(Protocol):
    """The hypervisor's bounded executor (Hypervisor.call)."""

    def __call__(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...


class Domain:
    """A handle on one libvirt domain of the hypervisor's connection."""

    def __init__(self, call: Caller, raw: libvirt.virDomain) -> None:
        self._call = call
        self.raw = raw  # for `run`: libvirt's own migration calls, several calls in one
        # Kept by libvirt-python on the handle (no call to the daemon).
        self.uuid: str = raw.UUIDString()
        self.name: str = raw.name()

    def __repr__(self) -> str:
        return f"Domain({self.name!r}, {self.uuid})"

    async def run(self, fn: Callable[[libvirt.virDomain], T]) -> T:
        """`fn(virDomain)` as one executor call (several libvirt calls a cancel must not
        split, or one this face does not name)."""
        return await self._call(fn, self.raw)

    async def state(self) -> tuple[DomainState, int]:
        """The state and libvirt's reason code for it."""
        state, reason = await self._call(self.raw.state)
        return DomainState.of(state), int(reason)

    async def is_active(self) -> bool:
        return bool(await self._call(self.raw.isActive))

    async def persistent(self) -> bool:
        return bool(await self._call(self.raw.isPersistent))

    async def xml(self, *, inactive: bool = False, secure: bool = False,
                  migratable: bool = False) -> str:  # fmt: skip
        """The live definition, or with `inactive` the persistent one."""
        flags = ((libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0)
                 | (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0)
                 | (libvirt.VIR_DOMAIN_XML_MIGRATABLE if migratable else 0))  # fmt: skip
        return str(await self._call(self.raw.XMLDesc, flags))

    async def info(self) -> Info:
        state, max_mem, mem, vcpus, _ = await self._call(self.raw.info)
        return Info(DomainState.of(state), int(max_mem), int(mem), int(vcpus))

    async def job(self) -> Job:
        return await self.run(job_of)

    async def metadata(self, namespace: str) -> str | None:
        """The running domain's metadata element in `namespace`, or None."""

        def read(dom: Any) -> str | None:
            try:
                return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace,
                                        libvirt.VIR_DOMAIN_AFFECT_LIVE))  # fmt: skip
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise

        return await self.run(read)

    async def set_metadata(self, namespace: str, prefix: str, xml: str | None) -> None:
        """Write (None: remove) the running domain's metadata element in `namespace`."""
        await self._call(self.raw.setMetadata, libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml,
                         prefix if xml is not None else None, namespace,
                         libvirt.VIR_DOMAIN_AFFECT_LIVE)  # fmt: skip

    async def attach(self, xml: str, *, live: bool = True, config: bool = False) -> None:
        await self._call(self.raw.attachDeviceFlags, xml, _affect(live, config))

    async def detach_alias(self, alias: str, *, live: bool = True, config: bool = False) -> None:
        """Ask for the device's removal (a live one ends with libvirt's DEVICE_REMOVED)."""
        await self._call(self.raw.detachDeviceAlias, alias, _affect(live, config))

    async def qemu_monitor(self, command: str) -> str:
        """A QMP command (JSON) through libvirt's QEMU monitor passthrough (qemu driver only;
        the domain is marked tainted `custom-monitor`); QEMU's reply."""
        return str(await self._call(libvirt_qemu.qemuMonitorCommand, self.raw, command, 0))


def _affect(live: bool, config: bool) -> int:
    return ((libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
            | (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0))  # fmt: skip
