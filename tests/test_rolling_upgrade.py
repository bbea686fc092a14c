"""A fleet upgrades host by host: for a while an agent of the previous release calls one of
this release for migrate-with-failover, and the reverse. The previous release is built from
the repository's history into a virtual environment of its own and runs as a real process on
lab host a; this release runs on lab host b. Where both understand each other the guest
migrates; where they do not (contract v1.1's caller-id subjects, commands.accept_v1_peer_calls
turned off), the migration is refused before anything is unplugged: the guest keeps running
where it was, its primary attached and bonded."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS

from agent.embedded import NatsServer, stop_process
from agent.opwatch import follow
from lab.agents import agent_env, answering
from lab.daemon import free_port
from lab.lab import bond_members, wait_for_serial
from tests.support import ROOT
from tests.support.agents import RunningAgent
from tests.support.bus import call
from tests.support.guests import bond_now, serial_text, where

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]

# The last commit of contract v1.0: agent-to-agent calls without the caller's id on the
# subject (virt.<dest>.cmd.failover.reserve), replies on the shared _INBOX prefix.
PREVIOUS_RELEASE = "4cb129bae04c84ae9ce7cec9f54d54ec15ad024b"


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's `python`, in its own virtual environment (installed, not
    editable: nothing of this checkout's code is on its path)."""
    where_ = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_RELEASE],
                             capture_output=True, check=False)  # fmt: skip
    if archive.returncode != 0:
        pytest.fail(f"the previous release {PREVIOUS_RELEASE[:12]} is not in this checkout's "
                    f"history (a shallow clone?): {archive.stderr.decode()[-300:]}")  # fmt: skip
    tree = where_ / "src"
    tree.mkdir()
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    venv = where_ / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(tree)], check=True,
                   capture_output=True)  # fmt: skip
    return venv / "bin" / "python"


def previous_agent(
    python: Path, uri: str, nats_url: str, host: str, work: Path
) -> subprocess.Popen[bytes]:
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "agent.log", "wb") as log:
        return subprocess.Popen(
            [str(python), "-m", "agent", "run", "--libvirt-uri", uri, "--nats-url", nats_url,
             "--host-id", host, "--state-dir", str(work / "state"),
             "--http-addr", f"127.0.0.1:{free_port()}"],
            cwd=work, env=agent_env(VIRT_AGENT_LOG_FORMAT="json"), stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


async def migrate(nc: NATS, source: str, domain: str, destination: str) -> dict[str, Any]:
    """migrate_with_failover, followed on VIRT_OPS to its final state."""
    reply = await call(nc, source, "migrate_with_failover",
                       {"domain": domain, "destination": destination})  # fmt: skip
    assert reply["ok"] is True, reply
    return await follow(nc, f"virt.{source}.op.{reply['result']['operation_id']}", timeout=300)


async def test_a_mixed_fleet_migrates_where_both_understand_and_fails_safe_where_not(
    lab: Any,
    host_a: Any,
    host_b: Any,
    guest: Callable[..., Any],
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nats_server: NatsServer,
    nc: NATS,
    previous_release: Path,
    tmp_path: Path,
) -> None:
    old = previous_agent(previous_release, host_a.uri, nats_server.url, "old-a", tmp_path / "old")
    try:
        await answering(nc, ["old-a"], timeout=60)
        pong = msgspec.json.decode((await nc.request("virt.old-a.cmd.ping", b"{}", 10)).data)
        assert pong["ok"] is True
        dom = await asyncio.to_thread(guest, "a", "failover")
        u, name = dom.UUIDString(), dom.name()
        serial = lab.serial_path(name)
        await asyncio.to_thread(wait_for_serial, serial, " ok", 30)
        await bond_now(serial, 2)
        offset = serial.stat().st_size
        primary_on_a = {"running": True, "primary": True, "record": False}

        # 1. This release no longer takes the v1 form: refused before the unplug.
        strict = await start_agent(**{"libvirt.uri": host_b.uri, "host_id": "new-b",
                                      "commands.accept_v1_peer_calls": False})  # fmt: skip
        op = await migrate(nc, "old-a", name, "new-b")
        assert op["state"] != "succeeded", op
        assert "unplug" not in [s["step"] for s in op["steps"]], op
        assert "accept_v1_peer_calls" in str(op.get("error")), op
        assert await asyncio.to_thread(where, host_a, u) == primary_on_a
        assert (await asyncio.to_thread(where, host_b, u))["running"] is False
        assert ["eth1"] not in bond_members(serial_text(serial, offset)), "primary never left"
        await strict.stop()

        # 2. During the transition (the default) the previous release's source migrates.
        await start_agent(**{"libvirt.uri": host_b.uri, "host_id": "new-b"})
        op = await migrate(nc, "old-a", name, "new-b")
        assert op["state"] == "succeeded", op
        assert await asyncio.to_thread(where, host_b, u) == primary_on_a
        assert (await asyncio.to_thread(where, host_a, u))["running"] is False
        assert len(await bond_now(serial, 2)) == 2
        offset = serial.stat().st_size

        # 3. This release's source, the previous release's destination: refused before the
        # unplug; the guest stays on b with its primary.
        op = await migrate(nc, "new-b", name, "old-a")
        assert op["state"] != "succeeded", op
        # Said so that an operator knows what to do: upgrade the destination first.
        assert "contract v1.1" in op["error"]["message"], op["error"]
        assert "unplug" not in [s["step"] for s in op["steps"]], op
        assert await asyncio.to_thread(where, host_b, u) == primary_on_a
        assert (await asyncio.to_thread(where, host_a, u))["running"] is False
        assert ["eth1"] not in bond_members(serial_text(serial, offset)), "primary never left"
    finally:
        stop_process(old)
