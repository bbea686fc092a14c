"""Commands in: verbs over NATS request/reply, checked against libvirt and the bus."""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import libvirt
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from agent.registry import Registration
from agent.supervisor import AgentState
from lab.agents import answering
from lab.daemon import LibvirtDaemon
from tests.support import ROOT
from tests.support.agents import FAST_RECONNECT, AgentProcess, RunningAgent
from tests.support.bus import ERROR_CODES, Collector, call
from tests.support.domains import DOMAIN_XML, Flipper, define


def error_code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    assert set(reply["error"]) == {"code", "message", "details"}
    return str(reply["error"]["code"])


async def test_ping_answers_with_the_agents_identity(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS
) -> None:
    """ping names the host and the boot of the agent that answered."""
    agent = await start_agent()
    reply = await call(nc, agent.host, "ping")
    assert reply["ok"] is True
    assert reply["result"]["host"] == agent.host
    assert reply["result"]["boot_id"] == agent.agent.boot_id
    assert reply["result"]["libvirt_connected"] is True


async def test_domain_verbs_change_libvirt_and_raise_events(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: NATS,
    testdrv: Any,
) -> None:
    """start, suspend, resume, destroy over NATS: libvirt's state follows, and the events are on the bus."""
    agent = await start_agent()
    dom = define(testdrv)
    u = dom.UUIDString()
    c = await collect(f"virt.{agent.host}.event.{u}.lifecycle")
    steps = [
        ("domain.start", libvirt.VIR_DOMAIN_RUNNING, ("started", "booted")),
        ("domain.suspend", libvirt.VIR_DOMAIN_PAUSED, ("suspended", "paused")),
        ("domain.resume", libvirt.VIR_DOMAIN_RUNNING, ("resumed", "unpaused")),
        ("domain.destroy", libvirt.VIR_DOMAIN_SHUTOFF, ("stopped", "destroyed")),
    ]
    for verb, state, event in steps:
        reply = await call(nc, agent.host, verb, {"domain": dom.name()})
        assert reply["ok"] is True, reply
        assert dom.state()[0] == state
        await c.wait_for(lambda e, ev=event: (e["data"]["event"], e["data"]["detail"]) == ev)

    got = await call(nc, agent.host, "domain.get", {"domain": u})
    assert got["result"]["name"] == dom.name()
    assert got["result"]["state"] == "shutoff"
    listed = await call(nc, agent.host, "domain.list")
    assert u in {d["uuid"] for d in listed["result"]}


async def test_errors_are_structured_and_name_what_was_wrong(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: NATS,
    testdrv: Any,
) -> None:
    """Each kind of bad request gets its contract error code and a message naming the problem; a denied verb does not act."""
    agent = await start_agent(
        **{"commands.denied_verbs": ["domain.destroy"], "commands.max_payload_bytes": 1024}
    )
    h = agent.host
    dom = define(testdrv)
    dom.create()
    lifecycle = await collect(f"virt.{h}.event.{dom.UUIDString()}.lifecycle")
    cases: list[tuple[str, Any, bytes | None, str, str]] = [
        ("domain.get", {"domain": "no-such-domain"}, None, "not_found", "no-such-domain"),
        ("domain.start", {"domain": dom.name()}, None, "conflict", "is running"),
        ("domain.get", None, b"{not json", "invalid_request", "JSON"),
        ("domain.get", None, b"[1, 2]", "invalid_request", "object"),
        ("domain.get", {"domain": 42}, None, "invalid_request", "$.domain"),
        ("domain.get", {}, None, "invalid_request", "domain"),
        ("domain.get", {"domain": dom.name(), "colour": "red"}, None, "invalid_request", "colour"),
        ("domain.get", {"domain": "x" * 2000}, None, "invalid_request", "exceeds the limit"),
        ("domain.destroy", {"domain": dom.name()}, None, "forbidden", "domain.destroy"),
        ("domain.explode", {"domain": dom.name()}, None, "not_found", "domain.explode"),
    ]
    for verb, payload, raw, code, needle in cases:
        reply = await call(nc, h, verb, payload, raw)
        assert error_code(reply) == code, (verb, payload, raw, reply)
        assert needle in reply["error"]["message"], reply
    await agent.settled()
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "the denied destroy must not have acted"
    stopped = [e for e in lifecycle.events() if e["data"]["event"] == "stopped"]
    assert stopped == [], "no stopped event on the bus"
    assert (await call(nc, h, "ping"))["ok"] is True


async def test_request_id_makes_a_command_act_once(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: NATS,
    testdrv: Any,
) -> None:
    """The same request_id twice: the first outcome both times, and libvirt acted once."""
    agent = await start_agent()
    dom = define(testdrv)
    dom.create()
    c = await collect(f"virt.{agent.host}.event.{dom.UUIDString()}.lifecycle")
    payload = {"domain": dom.name(), "request_id": "destroy-1"}
    first, second = await asyncio.gather(
        call(nc, agent.host, "domain.destroy", payload),
        call(nc, agent.host, "domain.destroy", payload),
    )
    third = await call(nc, agent.host, "domain.destroy", payload)
    assert first["ok"] is True
    assert second == first
    assert third == first
    await agent.settled()
    stops = [e for e in c.events() if e["data"]["event"] == "stopped"]
    assert len(stops) == 1
    # A new request_id acts again - and libvirt refuses to destroy a stopped domain.
    again = await call(
        nc, agent.host, "domain.destroy", {"domain": dom.name(), "request_id": "destroy-2"}
    )
    assert error_code(again) == "conflict"


@pytest.mark.daemon
async def test_commands_during_a_libvirt_outage_get_unavailable(
    tmp_path: Path, start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS
) -> None:
    """libvirtd killed: domain verbs answer `unavailable` and ping says libvirt is away; libvirtd back: they work again."""
    daemon = await asyncio.to_thread(LibvirtDaemon(tmp_path, "outage").start)
    try:
        agent = await start_agent(**{"libvirt.uri": daemon.test_uri, **FAST_RECONNECT})
        assert (await call(nc, agent.host, "domain.list"))["ok"] is True
        await asyncio.to_thread(daemon.kill)

        async def libvirt_connected() -> bool:
            return bool((await call(nc, agent.host, "ping"))["result"]["libvirt_connected"])

        await until_async(libvirt_connected, want=False, timeout=30)
        reply = await call(nc, agent.host, "domain.list")
        assert error_code(reply) == "unavailable"
        assert "libvirt" in reply["error"]["message"]

        await asyncio.to_thread(daemon.stop)  # its log daemon, before the same host starts again
        await asyncio.to_thread(daemon.start)
        await until_async(libvirt_connected, want=True, timeout=60)
        listed = await call(nc, agent.host, "domain.list")
        assert [d["name"] for d in listed["result"]] == ["test"]
    finally:
        await asyncio.to_thread(daemon.stop)


async def until_async(
    probe: Callable[[], Awaitable[bool]], want: bool, timeout: float, poll: float = 0.2
) -> None:
    """Until `probe()` answers `want` (the agent notices a change in its own time)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await probe() != want:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still not {want} after {timeout}s")
        await asyncio.sleep(poll)


@pytest.mark.daemon
async def test_stopping_agent_refuses_new_commands(
    test_daemon: LibvirtDaemon,
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: NATS,
) -> None:
    """During a real shutdown (events still flowing, so it takes a while), a new command is answered `unavailable` and does not act."""
    agent = await start_agent(**{"libvirt.uri": test_daemon.test_uri})
    conn = await asyncio.to_thread(libvirt.open, test_daemon.test_uri)
    target = await asyncio.to_thread(define, conn)
    await asyncio.to_thread(target.create)
    flipper = await asyncio.to_thread(lambda: Flipper(test_daemon.test_uri).start())
    try:
        agent.agent.request_stop("test")
        while agent.agent.state is not AgentState.STOPPING:  # noqa: ASYNC110 - a state, no event
            await asyncio.sleep(0)
        reply = await call(nc, agent.host, "domain.suspend", {"domain": target.name()})
        assert error_code(reply) == "unavailable"
        assert reply["error"]["code"] in ERROR_CODES
        await asyncio.wait_for(agent.task, 60)
        state = (await asyncio.to_thread(target.state))[0]
        assert state == libvirt.VIR_DOMAIN_RUNNING, "the refused command did not act"
    finally:
        await asyncio.to_thread(flipper.stop)
        await asyncio.to_thread(target.destroy)
        await asyncio.to_thread(target.undefine)
        await asyncio.to_thread(conn.close)


async def test_registration_in_virt_hosts_and_the_cli(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, nats_server: Any
) -> None:
    """The agent registers in virt_hosts; `virt-agent hosts` and `virt-agent call` see it; stop withdraws it."""
    agent = await start_agent()
    kv = await nc.jetstream().key_value("virt_hosts")
    entry = await kv.get(agent.host)
    reg = msgspec.json.decode(entry.value)
    assert reg["boot_id"] == agent.agent.boot_id
    assert reg["libvirt_uri"] == "test:///default"
    assert reg["capabilities"]["libvirt_version"] == "9.0.0"

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", *args, "--nats-url", nats_server.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        return proc.returncode or 0, out.decode()

    code, out = await cli("hosts")
    assert code == 0
    assert agent.host in out
    code, out = await cli("call", agent.host, "domain.get", "domain=test")
    assert code == 0, out
    assert msgspec.json.decode(out)["result"]["name"] == "test"
    code, out = await cli("call", agent.host, "domain.get", "domain=nope")
    assert code == 1
    assert msgspec.json.decode(out)["error"]["code"] == "not_found"
    # `migrate` reads the reply as the agents read each other's: a refusal is its error.
    code, out = await cli("migrate", "test", "--from", agent.host, "--to", "nowhere")
    assert code == 1
    assert "not_found" in out, out
    assert "nowhere" in out, out
    code, out = await cli("migrate", "test", "--from", agent.host, "--to", "nowhere", "--json")
    assert code == 1
    assert msgspec.json.decode(out)["error"]["code"] == "not_found", out

    await agent.stop()
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(agent.host)


async def test_a_name_that_looks_like_a_uuid_finds_the_right_domain(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, testdrv: Any
) -> None:
    """A domain may be named like a UUID: asked for by that text, the agent finds it by name when no domain has that UUID, and refuses the request as ambiguous when another domain has it."""
    agent = await start_agent()
    test_uuid = testdrv.lookupByName("test").UUIDString()
    free_uuid = str(uuid.uuid4())
    twins = [
        testdrv.defineXML(DOMAIN_XML.format(name=name, uuid=uuid.uuid4()))
        for name in (test_uuid, free_uuid)
    ]
    try:
        by_name = await call(nc, agent.host, "domain.get", {"domain": free_uuid})
        assert by_name["ok"] is True, by_name
        assert by_name["result"]["uuid"] == twins[1].UUIDString()
        ambiguous = await call(nc, agent.host, "domain.get", {"domain": test_uuid})
        assert error_code(ambiguous) == "invalid_request"
        assert twins[0].UUIDString() in ambiguous["error"]["message"]
        both = await call(nc, agent.host, "domain.destroy", {"domain": test_uuid})
        assert error_code(both) == "invalid_request", "never acts on a guess"
        assert testdrv.lookupByName("test").isActive()
    finally:
        for dom in twins:
            dom.undefine()


@pytest.mark.daemon
async def test_a_request_id_repeated_after_kill_9_and_a_restart_acts_once(
    test_daemon: LibvirtDaemon,
    nats_server: Any,
    agent_process: Callable[..., AgentProcess],
    tmp_path: Path,
) -> None:
    """The outcome of a request_id outlives the agent: after SIGKILL and a restart, the same
    request gets the first reply and libvirt is not asked again; the same id with another
    request is `conflict`."""
    host = "idem"
    args = ("--libvirt-uri", test_daemon.test_uri, "--nats-url", nats_server.url,
            "--host-id", host, "--http-addr", "", "--state-dir", str(tmp_path / "st"))  # fmt: skip
    first = agent_process(*args)
    nc = await nats.connect(nats_server.url)
    conn = await asyncio.to_thread(libvirt.open, test_daemon.test_uri)
    dom = await asyncio.to_thread(define, conn)
    try:
        await asyncio.to_thread(dom.create)
        await answering(nc, [host])
        payload = {"domain": dom.name(), "request_id": "suspend-1"}
        one = await call(nc, host, "domain.suspend", payload)
        assert one["ok"] is True, one
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        first.signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        await asyncio.to_thread(dom.resume)  # a second suspend would show
        agent_process(*args)
        await answering(nc, [host])
        assert await call(nc, host, "domain.suspend", payload) == one
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "acted once"
        other = await call(nc, host, "domain.suspend", payload | {"domain": "test"})
        assert error_code(other) == "conflict", other
        assert "request_id" in other["error"]["message"]
    finally:
        await nc.close()
        await asyncio.to_thread(dom.destroy)
        await asyncio.to_thread(dom.undefine)
        conn.close()


async def test_an_operation_waits_for_a_domains_lock_instead_of_a_spurious_conflict(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, testdrv: Any
) -> None:
    """Something holds the domain's lock for a moment - another command, or the failover
    reconciler reading the record of a domain that just started: `migrate` waits for it,
    as mutating commands wait for each other, and then starts its operation. It was refused
    `conflict` ("a command is changing domain") - a controller that started a VM and
    migrated it at once met it, and the soak (bench/soak.py) on its first domains."""
    agent = await start_agent()
    assert agent.agent.fleet is not None
    await agent.agent.fleet.registry.publish(Registration(host="elsewhere", boot_id="b", version="0",
                                        libvirt_uri="test:///default", migration_uri="",
                                        capabilities=None, updated=0.0))  # fmt: skip
    dom = define(testdrv)
    dom.create()
    async with agent.agent.host_ctx.lock(dom.UUIDString()):
        request = asyncio.create_task(
            call(nc, agent.host, "migrate", {"domain": dom.name(), "destination": "elsewhere"})
        )
        await asyncio.sleep(1.0)
        assert not request.done(), request.result()
    reply = await request
    assert reply["ok"] is True, reply
    op = await call(
        nc, agent.host, "operation.get", {"operation_id": reply["result"]["operation_id"]}
    )
    assert op["result"]["domain"] == dom.UUIDString(), op


async def test_each_reply_is_counted_by_its_outcome_also_when_repeated_from_the_journal(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    nc: NATS,
    testdrv: Any,
    tmp_path: Path,
) -> None:
    """`virt_agent_commands_total{outcome}` follows the replies sent: a success, a refusal,
    and both again by request_id - from memory, and from the journal after a restart."""

    def count(agent: RunningAgent, outcome: str) -> float:
        value = agent.agent.metrics.registry.get_sample_value(
            "virt_agent_commands_total", {"verb": "domain.suspend", "outcome": outcome})  # fmt: skip
        return value or 0.0

    state = str(tmp_path / "kept")
    agent = await start_agent(state_dir=state)
    dom = define(testdrv)
    dom.create()
    ok = {"domain": dom.name(), "request_id": "suspend-ok"}
    refused = {"domain": "t-nothere", "request_id": "suspend-refused"}
    replies = [await call(nc, agent.host, "domain.suspend", p) for p in (ok, refused, ok, refused)]
    assert [r["ok"] for r in replies] == [True, False, True, False]
    assert (count(agent, "ok"), count(agent, "error")) == (2, 2)
    await agent.stop()

    again = await start_agent(state_dir=state, host_id=agent.host)
    kept = [await call(nc, again.host, "domain.suspend", p) for p in (ok, refused)]
    assert kept == replies[:2], "the journal's replies"
    assert (count(again, "ok"), count(again, "error")) == (1, 1)
