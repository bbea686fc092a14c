"""host.drain and host.undrain on libvirt's test driver (contract v1.2): the plan, maintenance
(in the registration, refusing admission and domain.start), destinations' inbound limits making
a migration wait, cancel, undrain. The test driver cannot migrate, so each migration a drain
starts fails and the drain ends `failed` with the host still in maintenance; moving VMs for real
is the lab's part."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.support.agents import RunningAgent
from tests.support.bus import call, registration, stream_messages

Start = Callable[..., Awaitable[RunningAgent]]
GIB = 1024 * 1024
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's running domain (8 GiB)


def node(tmp_path: Path, name: str, gib: int) -> str:
    """A test-driver host of its own, of test:///default's architecture, no domains."""
    f = tmp_path / f"{name}.xml"
    f.write_text(f"<node><cpu><mhz>1000</mhz><model>i686</model><active>4</active><nodes>1</nodes>"
                 f"<sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>"
                 f"<memory>{gib * GIB}</memory></node>")  # fmt: skip
    return f"test://{f}"


async def destination(start: Start, tmp_path: Path, name: str, gib: int, **more: Any) -> Any:
    return await start(**{"host_id": name, "libvirt.uri": node(tmp_path, name, gib),
                          "failover.memory_overcommit": 1.0, **more})  # fmt: skip


async def ended(nc: Any, host: str, op_id: str, timeout: float = 60) -> dict[str, Any]:
    for _ in range(int(timeout / 0.1)):
        op = (await call(nc, host, "operation.get", {"operation_id": op_id}))["result"]
        if op["state"] not in ("pending", "running"):
            return op
        await asyncio.sleep(0.1)
    raise AssertionError(f"operation {op_id} still running: {op}")


async def test_the_plan_goes_where_the_memory_is(
    start_agent: Start, nc: Any, tmp_path: Path
) -> None:
    await start_agent(host_id="src")
    await destination(start_agent, tmp_path, "small", 10)
    await destination(start_agent, tmp_path, "large", 32)
    await destination(start_agent, tmp_path, "tiny", 4)
    cap = (await registration(nc, "large")).capacity
    assert cap is not None
    assert cap.memory_kib == 32 * GIB
    out = await call(nc, "src", "host.drain", {"dry_run": True})
    assert out["ok"] is True, out
    [entry] = out["result"]["plan"]
    assert entry == {"domain": {"uuid": TEST_UUID, "name": "test"}, "destination": "large",
                     "failover": False}  # fmt: skip
    only = await call(nc, "src", "host.drain", {"dry_run": True, "destinations": ["tiny"]})
    [nowhere] = only["result"]["plan"]
    assert nowhere["destination"] is None
    assert "KiB free" in nowhere["reason"], nowhere
    # A dry run changes nothing.
    assert (await registration(nc, "src")).maintenance is None


async def test_a_drain_waits_for_a_full_destination_and_keeps_the_host_in_maintenance(
    start_agent: Start, nc: Any, tmp_path: Path
) -> None:
    src = await start_agent(host_id="src")
    await destination(start_agent, tmp_path, "dst", 32, **{"failover.max_inbound_migrations": 1})
    held = await call(nc, "dst", "failover.admit.hv-x", {
        "operation_id": "0001", "domain": "6695eb01-f6a4-8304-79aa-97f2502e1900", "name": "x",
        "memory_kib": GIB, "vcpus": 1, "lease_s": 600})  # fmt: skip
    assert held["ok"] is True, held
    started = await call(nc, "src", "host.drain", {})
    assert started["ok"] is True, started
    op_id = started["result"]["operation_id"]
    # Maintenance is in the registration before the reply.
    m = (await registration(nc, "src")).maintenance
    assert m is not None
    assert (m.state, m.operation_id) == ("draining", op_id)
    # The host admits nothing and starts nothing (unless forced) while in maintenance.
    refused = await call(nc, "src", "failover.admit.hv-y", {
        "operation_id": "0002", "domain": TEST_UUID, "name": "y", "memory_kib": 1, "vcpus": 1})  # fmt: skip
    assert refused["error"]["details"]["reason"] == "maintenance", refused
    start = await call(nc, "src", "domain.start", {"domain": "test"})
    assert start["error"]["code"] == "unavailable", start
    # The destination is at its inbound limit: the migration waits, and is asked again.
    await asyncio.sleep(3 * 2.0)
    running = (await call(nc, "src", "operation.get", {"operation_id": op_id}))["result"]
    [entry] = running["progress"]["domains"]
    assert entry["state"] in ("queued", "running"), entry
    assert entry["attempts"] >= 2, entry
    # Each attempt a migration of its own, refused at admission (nothing moved).
    refusals = src.agent.metrics.registry.get_sample_value(
        "virt_agent_operations_total", {"verb": "migrate", "state": "failed"})  # fmt: skip
    assert refusals is not None
    assert refusals >= 2
    # Room again: it starts - and fails, the test driver cannot migrate.
    assert (await call(nc, "dst", "failover.release.hv-x", {"operation_id": "0001"}))["ok"]
    op = await ended(nc, "src", op_id)
    assert op["state"] == "failed", op
    assert op["error"]["details"]["totals"]["failed"] == 1, op
    assert (await registration(nc, "src")).maintenance is not None, "still in maintenance"
    # Every step of the drain is in VIRT_OPS; one event showed the wait.
    events = [e["data"]["operation"] for _, e, _ in
              await stream_messages(nc, "VIRT_OPS", f"virt.src.op.{op_id}")]  # fmt: skip
    waits = [d for o in events for d in (o.get("progress") or {}).get("domains", [])
             if d["state"] == "queued" and "inbound limit" in (d.get("reason") or "")]  # fmt: skip
    assert waits, events
    # undrain ends it.
    out = await call(nc, "src", "host.undrain", {})
    assert out["ok"] is True, out
    assert (await registration(nc, "src")).maintenance is None


async def test_cancel_starts_nothing_new(start_agent: Start, nc: Any, tmp_path: Path) -> None:
    await start_agent(host_id="src")
    await destination(start_agent, tmp_path, "dst", 32, **{"failover.max_inbound_migrations": 1})
    assert (await call(nc, "dst", "failover.admit.hv-x", {
        "operation_id": "0001", "domain": "6695eb01-f6a4-8304-79aa-97f2502e1900", "name": "x",
        "memory_kib": GIB, "vcpus": 1, "lease_s": 600}))["ok"]  # fmt: skip
    op_id = (await call(nc, "src", "host.drain", {}))["result"]["operation_id"]
    await asyncio.sleep(1.0)
    busy = await call(nc, "src", "host.undrain", {})
    assert busy["error"]["code"] == "conflict", busy
    assert (await call(nc, "src", "operation.cancel", {"operation_id": op_id}))["ok"]
    # The destination has room now; nothing starts any more.
    assert (await call(nc, "dst", "failover.release.hv-x", {"operation_id": "0001"}))["ok"]
    op = await ended(nc, "src", op_id)
    assert op["state"] == "cancelled", op
    [entry] = op["error"]["details"]["domains"]
    assert entry["state"] == "failed", entry
    assert "cancelled" in entry["reason"], entry
    await asyncio.sleep(3.0)
    listed = (await call(nc, "src", "operation.list", {}))["result"]
    assert [o["verb"] for o in listed if o["verb"] != "host.drain"] == [
        "migrate" for o in listed if o["verb"] == "migrate"
    ]
    migrations = [o for o in listed if o["verb"] == "migrate"]
    assert all(o["created"] < op["updated"] for o in migrations), "nothing after the cancel"
    assert (await call(nc, "src", "host.undrain", {}))["ok"] is True


async def test_the_cli_drains_and_undrains(
    start_agent: Start, nats_server: Any, tmp_path: Path
) -> None:
    """`virt-agent drain HOST --dry-run` prints the plan; `drain --follow` the progress to the
    end (failed: the test driver cannot migrate, exit 1); `undrain` ends the maintenance."""
    from tests.support.cli import cli  # noqa: PLC0415

    await start_agent(host_id="src")
    await destination(start_agent, tmp_path, "dst", 32)
    bus = ["--nats-url", nats_server.url]
    code, out = await asyncio.to_thread(cli, "drain", "src", "--dry-run", *bus)
    assert code == 0, out
    assert [line.split() for line in out.splitlines() if line.startswith("test")] == [
        ["test", "dst"]], out  # fmt: skip
    code, out = await asyncio.to_thread(cli, "drain", "src", "--follow", *bus, timeout=60)
    assert code == 1, out
    assert "planned 1" in out, out
    assert "failed" in out, out
    code, out = await asyncio.to_thread(cli, "undrain", "src", *bus)
    assert code == 0, out


async def test_a_restarted_agent_goes_on_with_its_drain(
    start_agent: Start, nc: Any, tmp_path: Path
) -> None:
    """The source's agent stops while its drain waits for a destination: the drain stays
    `running` in the journal, the next start goes on with the same operation (a `recover`
    step), and it ends once the destination has room."""
    settings = {"host_id": "src", "state_dir": str(tmp_path / "src-state")}
    src = await start_agent(**settings)
    await destination(start_agent, tmp_path, "dst", 32, **{"failover.max_inbound_migrations": 1})
    assert (await call(nc, "dst", "failover.admit.hv-x", {
        "operation_id": "0001", "domain": "6695eb01-f6a4-8304-79aa-97f2502e1900", "name": "x",
        "memory_kib": GIB, "vcpus": 1, "lease_s": 600}))["ok"]  # fmt: skip
    op_id = (await call(nc, "src", "host.drain", {}))["result"]["operation_id"]
    await asyncio.sleep(1.0)
    await src.stop()
    await start_agent(**settings)
    running = (await call(nc, "src", "operation.get", {"operation_id": op_id}))["result"]
    assert running["state"] == "running", running
    assert (await registration(nc, "src")).maintenance is not None
    assert (await call(nc, "dst", "failover.release.hv-x", {"operation_id": "0001"}))["ok"]
    op = await ended(nc, "src", op_id)
    assert op["state"] == "failed", op  # the test driver cannot migrate
    assert "recover" in [s["step"] for s in op["steps"]], op
    [entry] = op["error"]["details"]["domains"]
    assert entry["operation_id"] is not None, entry


async def test_a_migration_waits_for_a_slot_under_the_agents_operations_bound(
    start_agent: Start, nc: Any, tmp_path: Path
) -> None:
    """The drain holds one of the agent's operation slots (`commands.max_operations`) itself:
    with no slot left for a migration, the migration waits for one (the reason in the
    progress) instead of failing the drain."""
    await start_agent(**{"host_id": "src", "commands.max_operations": 1})
    await destination(start_agent, tmp_path, "dst", 32)
    op_id = (await call(nc, "src", "host.drain", {"max_parallel": 4}))["result"]["operation_id"]
    await asyncio.sleep(3 * 2.0)
    running = (await call(nc, "src", "operation.get", {"operation_id": op_id}))["result"]
    assert running["state"] == "running", running
    [entry] = running["progress"]["domains"]
    assert entry["state"] == "queued", entry
    assert "commands.max_operations" in entry["reason"], entry
    assert entry["attempts"] >= 2, entry
    assert (await call(nc, "src", "operation.cancel", {"operation_id": op_id}))["ok"]
    assert (await ended(nc, "src", op_id))["state"] == "cancelled"
