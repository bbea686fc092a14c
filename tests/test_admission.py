"""Admission on the destination (contract v1.2, `failover.admit`): an inbound slot, the memory and
the primary's reservation under one lease; refusals name their reason; admissions outlive a
restart of the destination's agent. On libvirt's test driver (whose `test` domain is destroyed
first: its 8 GiB exceed the test host's 3 GiB)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from agent.registry import Registration
from tests.conftest import RunningAgent, call

Start = Callable[..., Awaitable[RunningAgent]]
GIB = 1024 * 1024
UUIDS = [f"6695eb01-f6a4-8304-79aa-97f2502e19{i:02x}" for i in range(10)]


def admit(op: int, memory_kib: int = GIB, primary: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"operation_id": f"a{op:03d}", "domain": UUIDS[op], "name": f"vm{op}",
                            "memory_kib": memory_kib, "vcpus": 1, "lease_s": 600}  # fmt: skip
    if primary:
        body["primary"] = {"alias": "ua-primary0"}
    return body


async def test_admission_holds_slots_memory_and_the_primary(
    start_agent: Start, nc: Any, tmp_path: Path
) -> None:
    state = str(tmp_path / "dest-state")
    settings = {"host_id": "dest", "state_dir": state, "failover.max_inbound_migrations": 2}
    dest = await start_agent(**settings)
    assert (await call(nc, "dest", "domain.destroy", {"domain": "test"}))["ok"]
    kv = await nc.jetstream().key_value("virt_hosts")
    assert msgspec.json.decode((await kv.get("dest")).value, type=Registration).admission is True

    one = await call(nc, "dest", "failover.admit.hv-a", admit(1, primary=True))
    assert one["ok"] is True, one
    reservation = one["result"]["reservation_id"]
    pool = dest.agent.fleet.reconciler.pool  # type: ignore[union-attr]
    assert reservation
    assert pool.get(reservation) is not None
    # The same operation again: the same admission.
    assert (await call(nc, "dest", "failover.admit.hv-a", admit(1, primary=True))) == one
    assert (await call(nc, "dest", "failover.admit.hv-b", admit(2)))["ok"] is True
    # A third at once: over the inbound limit, whoever asks.
    third = await call(nc, "dest", "failover.admit.hv-b", admit(3))
    assert third["error"]["code"] == "unavailable", third
    assert third["error"]["details"]["reason"] == "inbound_limit", third
    # Another host cannot release hv-a's admission.
    stolen = await call(nc, "dest", "failover.release.hv-b",
                        {"admission_id": one["result"]["admission_id"]})  # fmt: skip
    assert stolen["error"]["code"] == "forbidden", stolen
    # Released by its caller, with its reservation: room for the third.
    out = await call(nc, "dest", "failover.release.hv-a",
                     {"admission_id": one["result"]["admission_id"]})  # fmt: skip
    assert out == {"ok": True, "result": {"released": True}}
    assert pool.get(reservation) is None
    assert (await call(nc, "dest", "failover.admit.hv-b", admit(3)))["ok"] is True
    # Memory: 3 GiB on the test host, 2 GiB admitted; releasing one (by operation) leaves 2.
    assert (await call(nc, "dest", "failover.release.hv-b", {"operation_id": "a002"}))["ok"]
    big = await call(nc, "dest", "failover.admit.hv-a", admit(4, memory_kib=5 * GIB // 2))
    assert big["error"]["details"]["reason"] == "memory", big
    assert big["error"]["details"]["free_kib"] == 2 * GIB, big

    # The destination's agent restarts: the admission it holds still counts.
    await dest.stop()
    dest = await start_agent(**settings)
    assert (await call(nc, "dest", "domain.destroy", {"domain": "test"}))["ok"]  # a new driver
    assert (await call(nc, "dest", "failover.admit.hv-a", admit(5)))["ok"] is True
    again = await call(nc, "dest", "failover.admit.hv-a", admit(6))
    assert again["error"]["details"]["reason"] == "inbound_limit", again
    refused = dest.agent.metrics.registry.get_sample_value(
        "virt_agent_admissions_refused_total", {"reason": "inbound_limit"})  # fmt: skip
    assert refused == 1


async def test_a_domain_that_arrived_ends_its_admission(start_agent: Start, nc: Any) -> None:
    """Once the admitted domain runs here, its migration is over: the slot is free (the next
    one is refused for memory - the arrived domain's 8 GiB - not for the slot)."""
    await start_agent(**{"host_id": "dest2", "failover.max_inbound_migrations": 1})
    test_uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's running domain
    body = admit(1) | {"domain": test_uuid, "memory_kib": 1}
    assert (await call(nc, "dest2", "domain.destroy", {"domain": "test"}))["ok"]
    assert (await call(nc, "dest2", "failover.admit.hv-a", body))["ok"] is True
    blocked = await call(nc, "dest2", "failover.admit.hv-a", admit(2, memory_kib=1))
    assert blocked["error"]["details"]["reason"] == "inbound_limit", blocked
    assert (await call(nc, "dest2", "domain.start", {"domain": "test"}))["ok"]  # it "arrived"
    after = await call(nc, "dest2", "failover.admit.hv-a", admit(2, memory_kib=1))
    assert after["error"]["details"]["reason"] == "memory", after
