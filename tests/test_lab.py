"""The two-host QEMU lab with one agent per host: device and migration events, for real."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from lab import network
from lab.agents import answering
from lab.lab import bond_members, guest_mac, primary_interface_xml, probes, wait_for_serial
from lab.scenarios import raw_migration
from tests.support.agents import AgentProcess, RunningAgent
from tests.support.bus import Collector, call, eventually
from tests.support.guests import where

pytestmark = pytest.mark.lab


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", uri, *args], check=True, capture_output=True, text=True
    ).stdout


async def test_guest_serial_shows_the_failover_bond_and_its_pings(
    lab: Any, guest: Callable[..., Any]
) -> None:
    """The guest's net_failover bonds standby and primary on the lab bridge, and its pings reach the gateway in its namespace."""
    dom = await asyncio.to_thread(guest, "a", "failover")
    nics = ET.fromstring(await asyncio.to_thread(dom.XMLDesc, 0)).findall("./devices/interface")
    assert [(n.get("type"), n.find("source").get("bridge")) for n in nics] == [
        ("bridge", network.BRIDGE), ("bridge", network.BRIDGE),
    ], "both NICs on the lab's bridge, not QEMU user networking"  # fmt: skip
    serial = lab.serial_path(dom.name())
    text = await asyncio.to_thread(wait_for_serial, serial, "LAB-PING", 20)
    assert bond_members(text)[0] == ["eth1", "eth2"]
    await asyncio.to_thread(wait_for_serial, serial, " ok", 30)
    first_ok = next(p.seq for p in probes(serial.read_text()) if p.ok)

    def since_first_ok() -> list[Any]:
        return [p for p in probes(serial.read_text()) if p.seq > first_ok]

    await eventually(lambda: len(since_first_ok()) > 20, 60, "20 more probes from the guest")
    recent = since_first_ok()
    assert sum(p.ok for p in recent) >= len(recent) - 2, (
        "once answered, the gateway keeps answering"
    )


async def test_primary_detach_and_attach_with_virsh_become_device_events(
    lab: Any,
    host_a: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    tmp_path: Path,
) -> None:
    """virsh detach/attach of the primary NIC: device_removed then device_added on the bus, and the guest's bond follows."""
    a = host_a
    agent = await start_agent(**{"libvirt.uri": a.uri})
    dom = await asyncio.to_thread(guest, "a", "failover")
    u = dom.UUIDString()
    serial = lab.serial_path(dom.name())
    c = await collect(f"virt.{agent.host}.event.{u}.>")

    offset = serial.stat().st_size
    await asyncio.to_thread(
        virsh, a.uri, "detach-device-alias", dom.name(), "ua-primary0", "--live"
    )
    removed = await c.wait_for(lambda e: e["type"] == "virt.domain.device_removed", 30)
    assert removed["data"]["alias"] == "ua-primary0"
    assert "ua-primary0" not in dom.XMLDesc(0)
    text = await asyncio.to_thread(wait_for_serial, serial, "LAB-BOND", 20, offset)
    assert bond_members(text)[0] == ["eth1"], "the bond keeps only its standby"

    offset = serial.stat().st_size
    xml = tmp_path / "primary.xml"
    xml.write_text(primary_interface_xml(guest_mac(0)))
    await asyncio.to_thread(virsh, a.uri, "attach-device", dom.name(), str(xml), "--live")
    added = await c.wait_for(lambda e: e["type"] == "virt.domain.device_added", 30)
    assert added["data"]["alias"] == "ua-primary0"
    assert "ua-primary0" in dom.XMLDesc(0)
    text = await asyncio.to_thread(wait_for_serial, serial, "LAB-BOND", 20, offset)
    assert len(bond_members(text)[0]) == 2, "the re-plugged primary joins the bond again"


async def test_live_migration_gives_the_lifecycle_pair_on_both_hosts(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
) -> None:
    """A live migration A→B: source agent publishes stopped/migrated, destination agent resumed/migrated."""
    a, b = host_a, host_b
    agent_a = await start_agent(**{"libvirt.uri": a.uri})
    agent_b = await start_agent(**{"libvirt.uri": b.uri})
    dom = await asyncio.to_thread(guest, "a", "virtio")
    u = dom.UUIDString()
    ca = await collect(f"virt.{agent_a.host}.event.{u}.lifecycle")
    cb = await collect(f"virt.{agent_b.host}.event.{u}.lifecycle")

    await raw_migration(a.uri, b.uri, dom.name())

    await ca.wait_for(
        lambda e: (e["data"]["event"], e["data"]["detail"]) == ("stopped", "migrated"), 30
    )
    await cb.wait_for(
        lambda e: (e["data"]["event"], e["data"]["detail"]) == ("resumed", "migrated"), 30
    )
    assert ("started", "migrated") in [
        (e["data"]["event"], e["data"]["detail"]) for e in cb.events()
    ]
    conn = b.connect()
    try:
        assert conn.lookupByUUIDString(u).isActive()
    finally:
        conn.close()
    # The serial log is reopened by the destination's QEMU: the guest keeps printing.
    serial = lab.serial_path(dom.name())
    size = serial.stat().st_size
    await eventually(lambda: serial.stat().st_size > size, 30, "the guest printing on B")


async def test_capabilities_report_virtio_net_failover_on_a_qemu_host(
    host_a: Any, start_agent: Callable[..., Awaitable[RunningAgent]], nc: Any
) -> None:
    """On a real QEMU host the capabilities verb finds the failover property and libvirt teaming."""
    agent = await start_agent(**{"libvirt.uri": host_a.uri})
    msg = await nc.request(f"virt.{agent.host}.cmd.capabilities", b"{}", timeout=30)
    reply = msgspec.json.decode(msg.data)
    assert reply["ok"] is True, reply
    caps = reply["result"]
    assert caps["qemu_failover"] is True
    assert caps["libvirt_teaming"] is True
    assert caps["virtio_net_failover"] is True
    assert caps["domain_caps"]["emulator"].endswith("qemu-system-x86_64")
    assert caps["domain_caps"]["machine"].startswith("pc-")


async def test_migrate_verb_moves_the_domain_and_reports_the_operation(
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """migrate over the bus: the domain ends running on B only; steps, progress and success are on VIRT_OPS; the journal survives a restart."""
    state_dir = str(tmp_path / "agent-a-state")
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri, "state_dir": state_dir})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "virtio")
    u = dom.UUIDString()
    ops = await collect(f"virt.{agent_a.host}.op.>")

    reply = await call(
        nc, agent_a.host, "migrate", {"domain": dom.name(), "destination": agent_b.host}
    )
    assert reply["ok"] is True, reply
    op_id = reply["result"]["operation_id"]
    final = await ops.wait_for(
        lambda e: e["type"] in ("virt.operation.succeeded", "virt.operation.failed"), 120
    )
    assert final["type"] == "virt.operation.succeeded", final
    assert [s["step"] for s in final["data"]["operation"]["steps"]] == [
        "admit",
        "migrate",
        "verify",
    ]
    assert all("duration_s" in s for s in final["data"]["operation"]["steps"])
    assert (await asyncio.to_thread(where, host_b, u))["running"]
    assert not (await asyncio.to_thread(where, host_a, u))["running"]
    assert {m[0] for m in ops.messages} == {f"virt.{agent_a.host}.op.{op_id}"}

    got = await call(nc, agent_a.host, "operation.get", {"operation_id": op_id})
    assert got["result"]["state"] == "succeeded"
    await agent_a.stop()
    again = await start_agent(
        **{"libvirt.uri": host_a.uri, "state_dir": state_dir, "host_id": agent_a.host}
    )
    got = await call(nc, again.host, "operation.get", {"operation_id": op_id})
    assert got["result"]["state"] == "succeeded", "the journal outlives the process"


async def test_second_migration_conflicts_and_cancel_aborts_the_job(
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """While a slow migration runs a second one gets conflict naming it; operation.cancel aborts it and the domain stays on A."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "virtio")
    u = dom.UUIDString()
    ops = await collect(f"virt.{agent_a.host}.op.>")
    slow = {"domain": dom.name(), "destination": agent_b.host, "bandwidth_mib_s": 1}
    first = await call(nc, agent_a.host, "migrate", slow)
    op_id = first["result"]["operation_id"]
    await ops.wait_for(lambda e: e["data"]["operation"]["progress"].get("percent") is not None, 60)

    second = await call(nc, agent_a.host, "migrate", slow)
    assert second["error"]["code"] == "conflict"
    assert second["error"]["details"]["operation_id"] == op_id

    cancel = await call(nc, agent_a.host, "operation.cancel", {"operation_id": op_id})
    assert cancel["ok"] is True, cancel
    final = await ops.wait_for(lambda e: e["type"] == "virt.operation.cancelled", 60)
    assert final["data"]["operation"]["id"] == op_id
    assert (await asyncio.to_thread(where, host_a, u))["running"]
    assert not (await asyncio.to_thread(where, host_b, u))["running"]


async def test_an_agent_stopping_mid_migration_ends_it_and_says_so_before_agent_stopping(
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    agent_process: Callable[..., AgentProcess],
    nats_server: Any,
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """SIGTERM to the source agent's process with a slow migration running: the migration is
    aborted, the domain stays on A, the operation's final state is published before
    agent_stopping - the last word of the boot - and the process exits 0."""
    source = f"sa{uuid.uuid4().hex[:6]}"
    proc = agent_process(
        "--libvirt-uri", host_a.uri, "--nats-url", nats_server.url, "--host-id", source,
        "--state-dir", str(tmp_path / "st-a"), "--http-addr", "",
    )  # fmt: skip
    await answering(nc, [source])
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "virtio")
    u = dom.UUIDString()
    seen = await collect(f"virt.{source}.>")
    slow = {"domain": dom.name(), "destination": agent_b.host, "bandwidth_mib_s": 1}
    op_id = (await call(nc, source, "migrate", slow))["result"]["operation_id"]
    await seen.wait_for(
        lambda e: (
            e.get("data", {}).get("operation", {}).get("progress", {}).get("percent") is not None
        ),
        60,
    )
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 60) == 0, proc.output()[-3000:]
    await seen.wait_for(lambda e: e.get("type") == "virt.host.agent_stopping", 30)
    types = [ev.get("type") for _, ev, _ in seen.messages]
    final = types.index("virt.operation.cancelled")
    assert seen.messages[final][1]["data"]["operation"]["id"] == op_id
    assert final < types.index("virt.host.agent_stopping")
    assert types[-1] == "virt.host.agent_stopping", types[-5:]
    assert (await asyncio.to_thread(where, host_a, u))["running"]
    assert not (await asyncio.to_thread(where, host_b, u))["running"]


async def test_device_detach_and_attach_verbs_on_the_primary(
    lab: Any,
    host_a: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """device.detach waits for the guest to release the primary; device.attach plugs the recorded one or a template back."""
    tpl = tmp_path / "primary.xml"
    tpl.write_text(primary_interface_xml(guest_mac(0)))
    agent = await start_agent(
        **{"libvirt.uri": host_a.uri, "devices.templates": {"primary": str(tpl)}}
    )
    dom = await asyncio.to_thread(guest, "a", "failover")
    serial = lab.serial_path(dom.name())
    for attach in ({"alias": "ua-primary0"}, {"template": "primary"}):
        offset = serial.stat().st_size
        out = await call(
            nc, agent.host, "device.detach", {"domain": dom.name(), "alias": "ua-primary0"}
        )
        assert out["ok"] is True, out
        assert "ua-primary0" not in dom.XMLDesc(0), (
            "DEVICE_REMOVED came, so libvirt no longer lists it"
        )
        text = await asyncio.to_thread(wait_for_serial, serial, "LAB-BOND", 20, offset)
        assert bond_members(text)[0] == ["eth1"]
        again = await call(
            nc, agent.host, "device.detach", {"domain": dom.name(), "alias": "ua-primary0"}
        )
        assert again["error"]["code"] == "not_found"

        offset = serial.stat().st_size
        out = await call(nc, agent.host, "device.attach", {"domain": dom.name(), **attach})
        assert out["ok"] is True, out
        assert "ua-primary0" in dom.XMLDesc(0)
        text = await asyncio.to_thread(wait_for_serial, serial, "LAB-BOND", 20, offset)
        assert len(bond_members(text)[0]) == 2
        dup = await call(nc, agent.host, "device.attach", {"domain": dom.name(), **attach})
        assert dup["error"]["code"] == "conflict"


@pytest.mark.timeout(300)
async def test_a_migration_that_does_not_converge_steps_its_downtime_then_goes_post_copy(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
) -> None:
    """A guest that keeps rewriting 48 MiB, migrated at 8 MiB/s, never converges: the agent
    doubles the allowed downtime up to max_downtime_ms, then switches to post-copy; the
    domain ends running on B and the guest keeps running there."""
    agent_a = await start_agent(**{"libvirt.uri": host_a.uri})
    agent_b = await start_agent(**{"libvirt.uri": host_b.uri})
    dom = await asyncio.to_thread(guest, "a", "virtio", "stock", 48)
    u = dom.UUIDString()
    ops = await collect(f"virt.{agent_a.host}.op.>")
    reply = await call(nc, agent_a.host, "migrate", {
        "domain": dom.name(), "destination": agent_b.host, "bandwidth_mib_s": 8,
        "max_downtime_ms": 1200, "postcopy": True, "timeout_s": 240,
    })  # fmt: skip
    assert reply["ok"] is True, reply
    final = await ops.wait_for(lambda e: e["data"]["operation"]["state"] != "running", 280)
    op = final["data"]["operation"]
    assert op["state"] == "succeeded", op
    assert op["result"]["postcopy"] is True
    assert op["result"]["downtime_steps"] == 2  # 300 → 600 → 1200 ms
    assert op["result"]["max_downtime_ms"] == 1200
    assert op["result"]["passes"] >= 2, "migration_iteration events were followed"
    seen = [e["data"]["operation"]["progress"] for e in ops.events()]
    assert any(p.get("max_downtime_ms") == 600 for p in seen), "each step is reported"
    assert (await asyncio.to_thread(where, host_b, u))["running"]
    assert not (await asyncio.to_thread(where, host_a, u))["running"]
    serial = lab.serial_path(dom.name())
    size = serial.stat().st_size
    await eventually(lambda: serial.stat().st_size > size, 30, "the guest runs on B")


async def test_a_device_libvirt_cannot_hotplug_is_unsupported(
    host_a: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: Any,
    tmp_path: Path,
) -> None:
    """libvirt's VIR_ERR_OPERATION_UNSUPPORTED (a PS/2 mouse cannot be hot plugged) answers `unsupported`, not `libvirt_error`; the domain is unchanged."""
    mouse = tmp_path / "mouse.xml"
    mouse.write_text("<input type='mouse' bus='ps2'><alias name='ua-mouse1'/></input>")
    agent = await start_agent(**{"libvirt.uri": host_a.uri,
                                 "devices.templates": {"mouse": str(mouse)}})  # fmt: skip
    dom = await asyncio.to_thread(guest, "a", "virtio")
    reply = await call(nc, agent.host, "device.attach", {"domain": dom.name(), "template": "mouse"})
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == "unsupported", reply
    assert "ua-mouse1" not in await asyncio.to_thread(dom.XMLDesc, 0)
