"""What a command handler is given and how a verb is declared: the host's context (identity,
libvirt, metrics, the per-domain locks), the full context once NATS is up (operations,
registry, peers, reconciler, admissions), and `Verb`. Built once by the agent
(agent/supervisor.py, agent/fleet.py); the handlers (handlers/) are the layer that plugs
verbs in."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

from agent.admission import Admissions
from agent.capabilities import Capabilities, probe
from agent.envelope import Operation, Subjects
from agent.errors import Conflict
from agent.failover import Reconciler
from agent.hypervisor import Hypervisor
from agent.metrics import Metrics
from agent.operations import DomainLocks, OperationManager, Runner
from agent.peers import Peers
from agent.registry import Registry
from agent.settings import DeviceSettings, FailoverSettings


@dataclass
class Probed:
    capabilities: Capabilities | None = None


@dataclass(kw_only=True)
class HostContext:
    """What a handler that acts on this host alone uses: identity, libvirt through the
    hypervisor, metrics, the per-domain locks. Exists from the start (libvirt connects
    before NATS)."""

    host: str
    boot_id: str
    version: str
    subjects: Subjects
    hypervisor: Hypervisor
    metrics: Metrics
    started_at: float
    # Mutating commands on one domain run one at a time; shared with the reconciler.
    domain_locks: DomainLocks = field(default_factory=DomainLocks)
    devices: DeviceSettings = field(default_factory=DeviceSettings)
    failover: FailoverSettings = field(default_factory=FailoverSettings)
    # What this libvirt offers, probed once per connection: one holder, which every Context
    # built from this one shares.
    probed: Probed = field(default_factory=Probed)

    @property
    def capabilities(self) -> Capabilities | None:
        """Probed once per libvirt connection (agent/capabilities.py)."""
        return self.probed.capabilities

    def lock(self, domain_uuid: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.domain_locks.hold(domain_uuid)

    async def probe_capabilities(self) -> Capabilities:
        caps = self.probed.capabilities = await probe(self.hypervisor)
        return caps


@dataclass(kw_only=True)
class Context(HostContext):
    """What every handler gets: the host's context and, built once NATS is up (commands are
    served only from then on), the journal of long operations, the virt_hosts registry, the
    other hosts' agents and the owed-primary reconciler."""

    operations: OperationManager
    registry: Registry
    peers: Peers
    reconciler: Reconciler
    admissions: Admissions
    # Write this host's registration again now (a maintenance change; agent/fleet.py).
    announce: Callable[[], Awaitable[None]]

    @classmethod
    def of(cls, host: HostContext, **fleet: Any) -> Context:
        return cls(**{f.name: getattr(host, f.name) for f in fields(HostContext)}, **fleet)

    def _no_operation(self, domain_uuid: str) -> None:
        holder = self.operations.holder(domain_uuid)
        if holder is not None:
            raise Conflict(
                f"operation {holder} is running on domain {domain_uuid}; wait for it or "
                "cancel it (operation.cancel)",
                operation_id=holder, domain=domain_uuid,
            )  # fmt: skip

    @contextlib.asynccontextmanager
    async def exclusive(self, domain_uuid: str) -> AsyncIterator[None]:
        """One change to a domain at a time: a mutating command waits for another command
        on the domain, and is refused (`conflict`, naming it) while an operation runs on it."""
        self._no_operation(domain_uuid)
        async with self.lock(domain_uuid):
            self._no_operation(domain_uuid)
            yield

    async def start_operation(self, verb: str, domain_uuid: str, runner: Runner) -> Operation:
        """Start a long operation on a domain once nothing else changes it: it waits for the
        domain's lock (a command in flight, the reconciler reading the domain's record), as
        mutating commands wait for each other; refused while another operation runs on it."""
        async with self.exclusive(domain_uuid):
            return self.operations.start(verb, domain_uuid, runner)


Handler = Callable[[Context, Any], Awaitable[Any]]


# The calling host of an agent-to-agent verb, from its subject's last token (contract v1.1;
# the server's permissions let each host use only its own id there). None: a v1 call.
CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("caller", default=None)


@dataclass(frozen=True)
class Verb:
    name: str
    request: type[Any]
    handler: Handler
    # An agent-to-agent verb: called as `<verb>.<caller host id>` (contract v1.1).
    peer: bool = False
    # For a verb whose operations outlive a restart of the agent: the runner that finishes
    # one the previous process left running (it decides from what libvirt shows).
    recover: Callable[[Context, Operation], Runner] | None = None
