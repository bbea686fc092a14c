"""Commands in: verbs over NATS request/reply, checked against libvirt and the bus."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import libvirt
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from tests.conftest import ERROR_CODES, ROOT, Collector, RunningAgent, call
from tests.test_events import define


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
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, testdrv: Any
) -> None:
    """Each kind of bad request gets its contract error code and a message naming the problem."""
    agent = await start_agent(
        **{"commands.denied_verbs": ["domain.reboot"], "commands.max_payload_bytes": 1024}
    )
    h = agent.host
    dom = define(testdrv)
    dom.create()
    cases: list[tuple[str, Any, bytes | None, str, str]] = [
        ("domain.get", {"domain": "no-such-domain"}, None, "not_found", "no-such-domain"),
        ("domain.start", {"domain": dom.name()}, None, "conflict", "is running"),
        ("domain.get", None, b"{not json", "invalid_request", "JSON"),
        ("domain.get", None, b"[1, 2]", "invalid_request", "object"),
        ("domain.get", {"domain": 42}, None, "invalid_request", "$.domain"),
        ("domain.get", {}, None, "invalid_request", "domain"),
        ("domain.get", {"domain": dom.name(), "colour": "red"}, None, "invalid_request", "colour"),
        ("domain.get", {"domain": "x" * 2000}, None, "invalid_request", "exceeds the limit"),
        ("domain.reboot", {"domain": dom.name()}, None, "forbidden", "domain.reboot"),
        ("domain.explode", {"domain": dom.name()}, None, "not_found", "domain.explode"),
    ]
    for verb, payload, raw, code, needle in cases:
        reply = await call(nc, h, verb, payload, raw)
        assert error_code(reply) == code, (verb, payload, raw, reply)
        assert needle in reply["error"]["message"], reply
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING, "the forbidden reboot must not have acted"
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


async def test_commands_during_a_libvirt_outage_get_unavailable(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS
) -> None:
    """While libvirt is disconnected, domain verbs answer `unavailable`; ping still answers."""
    agent = await start_agent()
    await agent.agent.hypervisor.close()
    reply = await call(nc, agent.host, "domain.list")
    assert error_code(reply) == "unavailable"
    pong = await call(nc, agent.host, "ping")
    assert pong["result"]["libvirt_connected"] is False


@pytest.mark.parametrize("verb", ["domain.get"])
async def test_stopping_agent_refuses_new_commands(
    start_agent: Callable[..., Awaitable[RunningAgent]], nc: NATS, verb: str
) -> None:
    """Once the agent is stopping, a new command is answered `unavailable`, not dropped."""
    agent = await start_agent()
    agent.agent.commands.stop_accepting()
    reply = await call(nc, agent.host, verb, {"domain": "test"})
    assert error_code(reply) == "unavailable"
    assert reply["error"]["code"] in ERROR_CODES


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

    await agent.stop()
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(agent.host)
