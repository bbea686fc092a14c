"""The drain's planner (agent/placement.py) on synthetic fleets (hypothesis): no destination
over its memory, no VF handed out twice, only eligible destinations, every movable VM placed
when room is left for it, the same plan for the same fleet."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.placement import Destination, Placement, Vm, plan

ARCHES = ["x86_64", "x86_64", "x86_64", "aarch64"]


@st.composite
def fleets(
    draw: st.DrawFn, max_hosts: int, max_vms: int, min_hosts: int = 1, min_vms: int = 0
) -> tuple[list[Vm], list[Destination]]:
    seed = draw(st.integers(0, 2**32 - 1))
    n_hosts = draw(st.integers(min_hosts, max_hosts))
    n_vms = draw(st.integers(min_vms, max_vms))
    rng = random.Random(seed)
    hosts = [
        Destination(
            host=f"hv{i:04d}",
            memory_kib=rng.choice([0, 1, 4, 16, 64, 256]) * 1024 * 1024 // 4,
            arch=rng.choice(ARCHES),
            admission=rng.random() > 0.05,
            maintenance=rng.random() < 0.1,
            failover=rng.random() > 0.3,
            free_vfs=rng.choice([None, 0, 1, 2, 8]),
        )
        for i in range(n_hosts)
    ]
    vms = [
        Vm(
            uuid=f"{i:08x}-0000-0000-0000-000000000000",
            name=f"vm{i}",
            memory_kib=rng.choice([512, 1024, 2048, 8192, 32768]) * 1024 // 4,
            arch=rng.choice(ARCHES),
            needs_primary=rng.random() < 0.4,
            unmovable="local storage" if rng.random() < 0.05 else "",
        )
        for i in range(n_vms)
    ]
    return vms, hosts


def check(vms: list[Vm], hosts: list[Destination], placements: list[Placement]) -> None:
    by_host = {d.host: d for d in hosts}
    assert [p.vm for p in placements] == vms
    memory: Counter[str] = Counter()
    vfs: Counter[str] = Counter()
    for p in placements:
        if p.destination is None:
            assert p.reason
            continue
        d = by_host[p.destination]
        assert p.destination != "hv0000", "never the source"
        assert d.admission
        assert not d.maintenance
        assert d.arch == p.vm.arch
        assert not p.vm.unmovable
        if p.vm.needs_primary:
            assert d.failover
            vfs[d.host] += 1
        memory[d.host] += p.vm.memory_kib
    for host, used in memory.items():
        assert used <= by_host[host].memory_kib, f"{host} over its memory"
    for host, used in vfs.items():
        free = by_host[host].free_vfs
        assert free is None or used <= free, f"{host}: a VF handed out twice"
    # Every movable VM is placed when room is left for it at the end.
    for p in placements:
        if p.destination is not None or p.vm.unmovable:
            continue
        for d in hosts:
            if d.host == "hv0000" or not d.admission or d.maintenance or d.arch != p.vm.arch:
                continue
            if p.vm.needs_primary and (not d.failover or (
                    d.free_vfs is not None and d.free_vfs - vfs[d.host] <= 0)):  # fmt: skip
                continue
            assert d.memory_kib - memory[d.host] < p.vm.memory_kib, (
                f"{p.vm.name} unplaced ({p.reason}) though {d.host} has room"
            )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(max_hosts=12, max_vms=60))
def test_small_fleets(fleet: tuple[list[Vm], list[Destination]]) -> None:
    vms, hosts = fleet
    placements = plan(vms, hosts, source="hv0000")
    check(vms, hosts, placements)
    shuffled = hosts[:]
    random.Random(1).shuffle(shuffled)
    assert plan(vms, shuffled, source="hv0000") == placements, "deterministic"


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.data_too_large])  # fmt: skip
@given(fleets(max_hosts=300, max_vms=3000, min_hosts=100, min_vms=1000))
def test_large_fleets(fleet: tuple[list[Vm], list[Destination]]) -> None:
    vms, hosts = fleet
    check(vms, hosts, plan(vms, hosts, source="hv0000"))


def test_the_most_free_memory_wins_and_ties_go_to_the_lower_host_id() -> None:
    hosts = [Destination("b", 4096), Destination("a", 4096), Destination("c", 2048)]
    vms = [Vm("1", "one", 1024), Vm("2", "two", 1024), Vm("3", "three", 3000)]
    got = [(p.vm.name, p.destination) for p in plan(vms, hosts, source="src")]
    # Largest first: three to a (a tie with b: the lower id), then one and two to b (most left).
    assert got == [("one", "b"), ("two", "b"), ("three", "a")]
    nowhere = plan([Vm("4", "big", 10_000)], hosts, source="src")[0]
    assert nowhere.destination is None
    assert "10000 KiB" in nowhere.reason


def test_a_guest_goes_only_where_its_host_cpu_is() -> None:
    """A host-passthrough guest needs the source's host CPU (vendor and model), a host-model
    guest its vendor; a guest with a named model goes anywhere (libvirt checks it); a host
    that does not say its CPU (an older agent) is not refused for it."""
    gib = 1024 * 1024
    dests = [Destination("amd", 64 * gib, cpu="AMD/EPYC-Milan"),
             Destination("icx", 32 * gib, cpu="Intel/Icelake-Server"),
             Destination("skl", 16 * gib, cpu="Intel/Skylake-Server")]  # fmt: skip
    vms = [Vm("1", "passthrough", gib, cpu="Intel/Skylake-Server"),
           Vm("2", "host-model", gib, cpu="Intel/"),
           Vm("3", "named", gib, cpu=""),
           Vm("4", "nowhere", gib, cpu="Hygon/Dhyana")]  # fmt: skip
    got = {p.vm.name: (p.destination, p.reason) for p in plan(vms, dests, source="src")}
    assert got["passthrough"][0] == "skl"
    assert got["host-model"][0] == "icx"
    assert got["named"][0] == "amd"
    assert got["nowhere"] == (None, "no destination with the host CPU Hygon/Dhyana")
    unsaid = plan([vms[0]], [Destination("old", gib * 4)], source="src")
    assert unsaid[0].destination == "old"


def test_what_a_domain_needs_of_a_host_cpu_comes_from_its_cpu_mode() -> None:
    from handlers.drain import cpu_needed  # noqa: PLC0415

    src = "Intel/Skylake-Server"
    assert cpu_needed("<domain><cpu mode='host-passthrough'/></domain>", src) == src
    assert cpu_needed("<domain><cpu mode='host-model'/></domain>", src) == "Intel/"
    assert cpu_needed("<domain><cpu mode='custom'><model>EPYC</model></cpu></domain>", src) == ""
    assert cpu_needed("<domain/>", src) == ""
