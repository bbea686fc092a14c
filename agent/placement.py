"""Where each VM of a drained host goes: a pure function of what the registry and libvirt say,
so that the planner can be tested on synthetic fleets of any size (tests/test_placement.py).

A destination is eligible for a VM when it is registered, admits migrations (contract v1.2
`admission`), is not in maintenance, has the VM's architecture, has the memory the VM needs
(its capacity minus what this plan already put there), and - for a VM with a passthrough
primary - can plug one (the failover capability, and a free VF where its pool counts them).
Among the eligible, the one with the most memory left wins; equal memory goes to the lower
host id, so the same inputs always give the same plan. A VM that fits nowhere is `unplaced`
with the reason of the last filter that removed the last candidate.

The plan says where; how many migrations run at once is the drain's (outbound) and each
destination's (inbound, enforced at admission) business."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Destination:
    host: str
    # Memory this plan may still place there (KiB): what the host has, minus the maximum
    # memory of the domains it runs, minus what it admitted already.
    memory_kib: int
    arch: str = "x86_64"
    admission: bool = True
    maintenance: bool = False
    failover: bool = False  # virtio-net failover capability
    # VFs its pool can still hand out; None: no counted pool (recorded or network primaries).
    free_vfs: int | None = None
    cpu: str = ""  # `vendor/model` of its host CPU; empty: not said (an older agent)


@dataclass(frozen=True, slots=True)
class Vm:
    uuid: str
    name: str
    memory_kib: int
    arch: str = "x86_64"
    needs_primary: bool = False
    # Why the VM cannot move at all (local storage, an unteamed passthrough device, a guest
    # without failover): empty when it can.
    unmovable: str = ""
    # The host CPU it needs, `vendor/model`: a host-passthrough guest the source's whole, a
    # host-model guest its vendor (`vendor/`); empty: a named model libvirt checks itself.
    cpu: str = ""


def cpu_fits(needed: str, host: str) -> bool:
    """Whether a host CPU `vendor/model` is what a VM needs (an unsaid host: assumed to)."""
    if not needed or not host:
        return True
    vendor, _, model = needed.partition("/")
    h_vendor, _, h_model = host.partition("/")
    return vendor == h_vendor and (not model or model == h_model)


@dataclass(frozen=True, slots=True)
class Placement:
    vm: Vm
    destination: str | None
    reason: str = ""  # why not placed (unmovable, or unplaced)


@dataclass
class _Room:
    d: Destination
    memory_kib: int
    free_vfs: int | None = field(default=None)


def plan(vms: list[Vm], destinations: list[Destination], source: str) -> list[Placement]:
    """One placement per VM, in the order given; larger VMs are placed first (they have the
    fewest choices) but the result keeps the input order."""
    rooms = [_Room(d, d.memory_kib, d.free_vfs) for d in sorted(destinations, key=lambda d: d.host)
             if d.host != source]  # fmt: skip
    placed: dict[str, Placement] = {}
    for vm in sorted(vms, key=lambda v: (-v.memory_kib, v.uuid)):
        placed[vm.uuid] = _place(vm, rooms)
    return [placed[vm.uuid] for vm in vms]


def _place(vm: Vm, rooms: list[_Room]) -> Placement:
    if vm.unmovable:
        return Placement(vm, None, vm.unmovable)
    candidates = rooms
    reason = "no destination registered"
    for keep, why in (
        (lambda r: r.d.admission, "no destination admits migrations (contract v1.2)"),
        (lambda r: not r.d.maintenance, "every destination is in maintenance"),
        (lambda r: r.d.arch == vm.arch, f"no destination of architecture {vm.arch}"),
        (lambda r: cpu_fits(vm.cpu, r.d.cpu), f"no destination with the host CPU {vm.cpu}"),
        (lambda r: not vm.needs_primary or r.d.failover,
         "no destination with the virtio-net failover capability"),
        (lambda r: not vm.needs_primary or r.free_vfs is None or r.free_vfs > 0,
         "no destination with a free VF for its primary"),
        (lambda r: r.memory_kib >= vm.memory_kib, f"no destination with {vm.memory_kib} KiB free"),
    ):  # fmt: skip
        if not candidates:
            break
        candidates = [r for r in candidates if keep(r)]
        reason = why
    if not candidates:
        return Placement(vm, None, reason)
    best = min(candidates, key=lambda r: (-r.memory_kib, r.d.host))
    best.memory_kib -= vm.memory_kib
    if vm.needs_primary and best.free_vfs is not None:
        best.free_vfs -= 1
    return Placement(vm, best.d.host)


def unplaced(placements: list[Placement]) -> list[Placement]:
    return [p for p in placements if p.destination is None]
