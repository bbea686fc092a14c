"""Leaf-node mode (docs/operations.md): each agent's bundled nats-server is a leaf node of the
fleet's hub with a JetStream domain of its own; the agent stores its events locally, and the
hub's VIRT_EVENTS sources every host's stream (`virt-agent hub-sync`). A host cut off from the
hub keeps storing; once it is back, everything reaches the hub once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from agent.embedded import NatsServer
from agent.streams import read_stream
from lab.agents import agent_env, answering
from lab.daemon import LibvirtDaemon, free_port
from tests.support import ROOT
from tests.support.agents import AgentProcess
from tests.support.bus import eventually
from tests.support.domains import Flipper

pytestmark = [pytest.mark.daemon, pytest.mark.timeout(600)]


class Relay:
    """A TCP relay that can be cut (every connection closed, nothing accepted) and restored
    on the same port: a leaf node's link to the hub, as a network partition sees it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        for t in (pipe(reader, up_w), pipe(up_r, writer)):
            task = asyncio.create_task(t)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers:
            w.close()
        self._writers.clear()


def hub_config(path: Path, leaf_port: int) -> Path:
    """config/nats-hub.conf.example, its leaf-node port made free for this test."""
    text = (ROOT / "config" / "nats-hub.conf.example").read_text()
    assert "0.0.0.0:7422" in text
    path.write_text(text.replace("0.0.0.0:7422", f"127.0.0.1:{leaf_port}"))
    return path


async def flips_at_hub(nc: nats.NATS, host: str, uuid: str) -> list[dict[str, Any]]:
    """The hub's VIRT_EVENTS: one host's suspend/resume events of a domain, in stream order."""
    msgs = await read_stream(nc, "VIRT_EVENTS", f"virt.{host}.event.{uuid}.lifecycle")
    events = [json.loads(m.data) for m in msgs]
    return [e for e in events if e["data"]["event"] in ("suspended", "resumed")]


def cli(*args: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, env=agent_env(),
                       capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    return p.returncode, p.stdout + p.stderr


async def test_leaf_mode_every_hosts_events_reach_the_hub_once_in_order_across_a_cut(
    test_daemon: LibvirtDaemon, agent_process: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    leaf_port = free_port()
    hub = NatsServer(tmp_path / "hub", config_file=hub_config(tmp_path / "hub.conf", leaf_port))
    hub.start()
    relay = await Relay(leaf_port).start()  # leaf01's link; leaf02 goes straight to the hub
    hosts = {"leaf01": relay.port, "leaf02": leaf_port}
    hub_nc = await nats.connect(hub.url)
    flipper: Flipper | None = None
    try:
        for host, port in hosts.items():
            agent_process(
                "--embedded", "--libvirt-uri", test_daemon.test_uri, "--host-id", host,
                "--state-dir", str(tmp_path / host), "--http-addr", f"127.0.0.1:{free_port()}",
                env={"VIRT_AGENT_NATS_EMBEDDED_PORT": str(free_port()),
                     "VIRT_AGENT_NATS_LEAF_REMOTES": f"nats-leaf://127.0.0.1:{port}",
                     "VIRT_AGENT_NATS_HUB_DOMAIN": "hub"},
            )  # fmt: skip
        # Commands reach each host through the hub, and each registered in the hub's bucket.
        await answering(hub_nc, list(hosts), timeout=60)
        code, out = await asyncio.to_thread(cli, "hub-sync", "--nats-url", hub.url, "--json")
        assert code == 0, out
        assert sorted(json.loads(out)["VIRT_EVENTS"]) == sorted(hosts), out

        flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
        await eventually(lambda: flipper.count >= 200, 60, "200 flips")
        await relay.cut()  # leaf01 alone for a while, still flipping
        at_cut = flipper.count
        await asyncio.sleep(5)  # past the leaf's reconnect attempts
        await eventually(lambda: flipper.count >= at_cut + 400, 60, "400 flips while cut")
        uuid = flipper.dom.UUIDString()
        cut_off = len(await flips_at_hub(hub_nc, "leaf01", uuid))
        assert cut_off < flipper.count - 100, "leaf01's latest events reached the hub: no cut"
        await relay.start()
        at_heal = flipper.count
        await eventually(lambda: flipper.count >= at_heal + 200, 60, "200 flips after")
        await asyncio.to_thread(flipper.stop)
        want = ["suspended", "resumed"] * (flipper.count // 2)
        for host in hosts:
            deadline = asyncio.get_running_loop().time() + 90
            while True:
                events = await flips_at_hub(hub_nc, host, uuid)
                flips = [e["data"]["event"] for e in events]
                if len(flips) >= len(want) or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(1)
            assert flips == want, (host, len(flips), len(want))
            ids = [e["id"] for e in events]
            assert len(ids) == len(set(ids)), f"{host}: an event stored twice at the hub"
            seqs = [e["sequence"] for e in events]
            assert seqs == sorted(seqs), f"{host}: out of order at the hub"
            # Each leaf stores only its own host's messages: another leaf's, which the hub
            # forwards to every leaf with interest, would reach the hub twice (hidden by its
            # duplicate window only for a while).
            local = await hub_nc.jetstream(domain=host).stream_info(
                "VIRT_EVENTS", subjects_filter="virt.>"
            )
            assert {subj.split(".")[1] for subj in local.state.subjects or {}} == {host}
    finally:
        if flipper is not None and flipper._thread.is_alive():
            await asyncio.to_thread(flipper.stop)
        await hub_nc.close()
        await relay.cut()
        hub.stop()
