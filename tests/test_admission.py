"""Admission on the destination (contract v1.2, `failover.admit`): an inbound slot, the memory and
the primary's reservation under one lease; refusals name their reason; admissions outlive a
restart of the destination's agent. On libvirt's test driver: a destination of its own (a node
file: 4 GiB, no domains), or test:///default (3 GiB, whose `test` domain of 8 GiB is destroyed
first)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from agent.registry import Registration
from tests.support.agents import RunningAgent
from tests.support.bus import call

Start = Callable[..., Awaitable[RunningAgent]]
GIB = 1024 * 1024
UUIDS = [f"6695eb01-f6a4-8304-79aa-97f2502e19{i:02x}" for i in range(10)]


NODE = """<node><cpu><mhz>1000</mhz><model>x86_64</model><active>4</active><nodes>1</nodes>
<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu><memory>4194304</memory></node>"""


def node_uri(tmp_path: Path) -> str:
    """A test-driver host of its own: 4 GiB, no domains (test:///default is shared by every
    connection of a process)."""
    (tmp_path / "node.xml").write_text(NODE)
    return f"test://{tmp_path / 'node.xml'}"


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
    settings = {"host_id": "dest", "state_dir": state, "failover.max_inbound_migrations": 2,
                "libvirt.uri": node_uri(tmp_path), "failover.memory_overcommit": 1.0}  # fmt: skip
    dest = await start_agent(**settings)
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
    # Memory: 4 GiB on this host, 2 GiB admitted; releasing one (by operation) leaves 3 free.
    assert (await call(nc, "dest", "failover.release.hv-b", {"operation_id": "a002"}))["ok"]
    big = await call(nc, "dest", "failover.admit.hv-a", admit(4, memory_kib=7 * GIB // 2))
    assert big["error"]["details"]["reason"] == "memory", big
    assert big["error"]["details"]["free_kib"] == 3 * GIB, big

    # The destination's agent restarts: the admission it holds still counts.
    await dest.stop()
    dest = await start_agent(**settings)
    assert (await call(nc, "dest", "failover.admit.hv-a", admit(5)))["ok"] is True
    again = await call(nc, "dest", "failover.admit.hv-a", admit(6))
    assert again["error"]["details"]["reason"] == "inbound_limit", again
    refused = dest.agent.metrics.registry.get_sample_value(
        "virt_agent_admissions_refused_total", {"reason": "inbound_limit"})  # fmt: skip
    assert refused == 1


async def test_a_domain_that_arrived_ends_its_admission(start_agent: Start, nc: Any) -> None:
    """Once the admitted domain runs here, its migration is over: the slot is free (the next
    one is refused for memory - the arrived domain's 8 GiB - not for the slot)."""
    await start_agent(**{"host_id": "dest2", "failover.max_inbound_migrations": 1,
                         "failover.memory_overcommit": 1.0})  # fmt: skip
    test_uuid = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's running domain
    body = admit(1) | {"domain": test_uuid, "memory_kib": 1}
    assert (await call(nc, "dest2", "domain.destroy", {"domain": "test"}))["ok"]
    assert (await call(nc, "dest2", "failover.admit.hv-a", body))["ok"] is True
    blocked = await call(nc, "dest2", "failover.admit.hv-a", admit(2, memory_kib=1))
    assert blocked["error"]["details"]["reason"] == "inbound_limit", blocked
    assert (await call(nc, "dest2", "domain.start", {"domain": "test"}))["ok"]  # it "arrived"
    after = await call(nc, "dest2", "failover.admit.hv-a", admit(2, memory_kib=1))
    assert after["error"]["details"]["reason"] == "memory", after


async def test_migrate_asks_the_destination_first(
    start_agent: Start, nc: Any, tmp_path: Path
) -> None:
    """`migrate` to a destination that admits: at its inbound limit (another host holds its
    one slot) the migration ends `failed` with `unavailable` / `inbound_limit` at the `admit`
    step - nothing was migrated - and the domain still runs here."""
    source = await start_agent(host_id="src")
    await start_agent(**{"host_id": "full", "failover.max_inbound_migrations": 1,
                         "libvirt.uri": node_uri(tmp_path)})  # fmt: skip
    assert (await call(nc, "full", "failover.admit.hv-x", admit(1)))["ok"] is True
    started = await call(nc, "src", "migrate", {"domain": "test", "destination": "full"})
    assert started["ok"] is True, started
    op_id = started["result"]["operation_id"]
    for _ in range(100):
        op = (await call(nc, "src", "operation.get", {"operation_id": op_id}))["result"]
        if op["state"] not in ("pending", "running"):
            break
        await asyncio.sleep(0.1)
    assert op["state"] == "failed", op
    assert op["error"]["code"] == "unavailable", op
    assert op["error"]["details"]["reason"] == "inbound_limit", op
    assert [s["step"] for s in op["steps"]] == ["admit"], op
    got = await call(nc, "src", "domain.get", {"domain": "test"})
    assert got["result"]["state"] == "running", got
    assert source.agent.metrics.registry.get_sample_value(
        "virt_agent_commands_total", {"verb": "migrate", "outcome": "ok"}) == 1  # fmt: skip
