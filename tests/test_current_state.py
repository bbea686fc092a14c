"""The current-state view (contract v1.2, "Current state"): the `virt_domains` bucket holds,
per host, every domain its libvirt has, in the state libvirt reports - after random lifecycle
changes, and after libvirtd restarts with changes while it was away, an agent killed with
SIGKILL with changes while it was down, and a NATS restart with changes while NATS was away.
Checked against libvirt's own listing; `virt-agent ps` prints it, `virt-agent forget` empties
a host's part."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent import current_state
from agent.embedded import NatsServer
from agent.kv import open_kv
from lab.agents import answering
from lab.daemon import LibvirtDaemon, free_port
from lab.prereqs import LabUnavailable
from tests.current_view import bucket_view, differences, libvirt_view
from tests.support.agents import RunningAgent
from tests.support.bus import connect_as
from tests.support.cli import cli
from tests.support.examples import example as load

ROOT = Path(__file__).resolve().parent.parent
XML = """<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>
<os><type>hvm</type></os></domain>"""


def shuffle(uri: str, seed: int, steps: int, prefix: str) -> None:
    """Random lifecycle changes on domains named `prefix`-N: define, create (transient),
    start, suspend, resume, destroy, undefine - whichever the domain's state allows."""
    rng = random.Random(seed)
    conn = libvirt.open(uri)
    try:
        for _ in range(steps):
            name = f"{prefix}-{rng.randrange(6)}"
            try:
                d = conn.lookupByName(name)
            except libvirt.libvirtError:
                if rng.random() < 0.7:
                    conn.defineXML(XML.format(name=name))
                else:
                    conn.createXML(XML.format(name=name), 0)
                continue
            state = d.state()[0]
            choices: list[Callable[[], Any]]
            if state == libvirt.VIR_DOMAIN_RUNNING:
                choices = [d.suspend, d.destroy]
            elif state == libvirt.VIR_DOMAIN_PAUSED:
                choices = [d.resume, d.destroy]
            else:
                choices = [d.create, d.undefine] if d.isPersistent() else []
            if d.isPersistent() and d.isActive():
                choices.append(d.undefine)  # running on, transient now
            if choices:
                rng.choice(choices)()
    finally:
        conn.close()


async def equal(nc: Any, host: str, uri: str, timeout: float = 30) -> None:
    """Until virt_domains holds for `host` exactly what libvirt at `uri` reports."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        want = await asyncio.to_thread(libvirt_view, uri)
        diff = differences(want, await bucket_view(nc, host))
        if not diff:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"virt_domains differs from libvirt after {timeout}s: {diff}")
        await asyncio.sleep(0.3)


async def test_the_view_follows_random_lifecycle_changes(
    start_agent: Callable[..., Awaitable[RunningAgent]], testdrv: Any, nc: Any, nats_server: Any
) -> None:
    await start_agent(host_id="cs1")
    await equal(nc, "cs1", "test:///default")
    for seed in (1, 2, 3):
        await asyncio.to_thread(shuffle, "test:///default", seed, 40, "t-cs")
        await equal(nc, "cs1", "test:///default")
    # `virt-agent ps --json`: the same values; --host keeps one host's.
    code, out = await asyncio.to_thread(cli, "ps", "--host", "cs1", "--json",
                                        "--nats-url", nats_server.url)  # fmt: skip
    assert code == 0, out
    listed = {v["uuid"]: (v["name"], v["state"], v["persistent"]) for v in json.loads(out)}
    assert listed == await bucket_view(nc, "cs1")
    code, out = await asyncio.to_thread(cli, "ps", "--nats-url", nats_server.url)
    assert code == 0, out
    assert out.splitlines()[0].split()[:3] == ["HOST", "NAME", "STATE"], out
    assert any(line.split()[:3] == ["cs1", "test", "running"] for line in out.splitlines()), out


@pytest.mark.timeout(300)
async def test_the_view_is_right_after_libvirtd_agent_and_nats_restarts(
    agent_process: Callable[..., Any], tmp_path: Path
) -> None:
    daemon = LibvirtDaemon(tmp_path, "cs")
    try:
        await asyncio.to_thread(daemon.start)
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    server = NatsServer(tmp_path / "nats", port=free_port()).start()
    uri = daemon.test_uri
    args = ("--libvirt-uri", uri, "--nats-url", server.url, "--host-id", "cs2",
            "--http-addr", "", "--state-dir", str(tmp_path / "state"))  # fmt: skip
    import nats  # noqa: PLC0415

    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    # libvirtd's test driver keeps its domains while a connection is open: this one holds
    # them while the agent is down.
    keeper = await asyncio.to_thread(libvirt.open, uri)
    try:
        first = agent_process(*args)
        await answering(nc, ["cs2"])
        await asyncio.to_thread(shuffle, uri, 10, 30, "cs")
        await equal(nc, "cs2", uri)

        # The agent killed; changes while it is down; started again.
        first.signal(signal.SIGKILL)
        assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
        await asyncio.to_thread(shuffle, uri, 11, 30, "cs")
        agent_process(*args)
        await equal(nc, "cs2", uri, 60)

        # libvirtd restarted: the test driver forgets what was made; changes after it.
        await asyncio.to_thread(daemon.stop)
        await asyncio.to_thread(daemon.start)
        keeper = await asyncio.to_thread(libvirt.open, uri)
        await asyncio.to_thread(shuffle, uri, 12, 20, "cs")
        await equal(nc, "cs2", uri, 60)

        # NATS away while domains change; the agent writes what it missed once it is back.
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(shuffle, uri, 13, 30, "cs")
        await asyncio.sleep(2.0)
        await asyncio.to_thread(server.start)
        await equal(nc, "cs2", uri, 60)

        # forget: the host's keys gone (for a host gone for good; here its agent runs on and
        # writes them again at its next resync - not before).
        code, out = await asyncio.to_thread(cli, "forget", "cs2", "--nats-url", server.url)
        assert code == 0, out
        assert await bucket_view(nc, "cs2") == {}
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            keeper.close()
        await nc.close()
        server.stop()
        await asyncio.to_thread(daemon.stop)


async def test_a_host_writes_only_its_own_keys(secured: Any, tmp_path: Path) -> None:
    """With config/nats-server.conf.example: hv01 can write `hv01.<uuid>`, not hv02's keys,
    and cannot purge or roll up the bucket."""
    hv01, _ = await connect_as(secured, "hv01")
    try:
        await open_kv(hv01, current_state.bucket_config(1), current_state.BUCKET)
        js = hv01.jetstream()
        u = str(uuid.uuid4())
        ack = await js.publish(f"$KV.virt_domains.hv01.{u}", b"{}")
        assert ack.seq > 0
        with pytest.raises(Exception):  # noqa: B017, PT011 - a timeout: no permission
            await js.publish(f"$KV.virt_domains.hv02.{u}", b"{}", timeout=1)
        with pytest.raises(Exception):  # noqa: B017, PT011
            await js.purge_stream(current_state.STREAM)
    finally:
        await hv01.close()


async def test_the_docs_example_prints_the_current_state_then_the_changes(
    start_agent: Callable[..., Awaitable[RunningAgent]], testdrv: Any, nc: Any, nats_server: Any
) -> None:
    """docs/examples/current_state.py: the values there are, the end-of-current marker, then
    a change made after it started, and a delete when a domain leaves."""
    example = load("current_state")
    await start_agent(host_id="cs3")
    await equal(nc, "cs3", "test:///default")
    before = len(await bucket_view(nc, "cs3"))
    watching = asyncio.create_task(example.watch(nats_server.url, "cs3", limit=before + 3))
    await asyncio.sleep(1.0)
    dom = await asyncio.to_thread(testdrv.defineXML, XML.format(name="t-cs-example"))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(dom.undefine)
    said = await asyncio.wait_for(watching, 30)
    assert said[before] == "-- the current state is above; changes follow", said
    assert said[before + 1].startswith("cs3 t-cs-example shutoff"), said
    assert said[before + 2] == f"cs3.{dom.UUIDString()}: gone from its host", said
