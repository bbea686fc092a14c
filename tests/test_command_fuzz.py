"""Property: whatever bytes arrive on a command subject, the agent answers with a well-formed
reply and stays healthy. 10,000 generated and mutated payloads across every verb."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.embedded import NatsServer
from handlers import all_verbs
from tests.conftest import ERROR_CODES, AgentProcess

VERBS = sorted(all_verbs())
FIELDS = ["domain", "request_id", "force", "primary", "mode", "destination", ""]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
valid_like = st.fixed_dictionaries(
    {},
    optional={
        "domain": st.one_of(st.sampled_from(["test", "nope", str(uuid.UUID(int=0))]), json_values),
        "request_id": st.one_of(st.text(min_size=1, max_size=8), json_values),
        "extra": json_values,
    },
)


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "valid_like", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return msgspec.json.encode(draw(json_values))
    body = msgspec.json.encode(draw(valid_like))
    if kind == "mutated" and body:
        i = draw(st.integers(0, len(body) - 1))
        op = draw(st.sampled_from(["flip", "cut", "dup", "insert"]))
        if op == "flip":
            body = body[:i] + bytes([body[i] ^ draw(st.integers(1, 255))]) + body[i + 1 :]
        elif op == "cut":
            body = body[:i]
        elif op == "dup":
            body = body[:i] + body[i:] * draw(st.integers(2, 50))
        else:
            body = (
                body[:i]
                + draw(st.sampled_from([b'"', b"{", b"}", b",", b"\\", b"\x00"]))
                + body[i:]
            )
    return body


class Bus:
    """A private event loop and client, so a synchronous hypothesis test can make requests."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url))

    def request(self, subject: str, data: bytes) -> bytes:
        msg = self.loop.run_until_complete(self.nc.request(subject, data, timeout=10))
        return bytes(msg.data)

    def close(self) -> None:
        self.loop.run_until_complete(self.nc.close())
        self.loop.close()


@pytest.fixture
def fuzz_target(
    nats_server: NatsServer, agent_process: Callable[..., AgentProcess], tmp_path: Path
) -> Iterator[tuple[Bus, str, AgentProcess]]:
    """An agent process on test:///default and a client to poke it with."""
    host = f"f{uuid.uuid4().hex[:8]}"
    proc = agent_process(
        "--libvirt-uri", "test:///default", "--nats-url", nats_server.url, "--host-id", host,
        "--http-addr", "", "--state-dir", str(tmp_path / "st"),
        env={"VIRT_AGENT_COMMANDS_MAX_PAYLOAD_BYTES": "4096", "VIRT_AGENT_LOG_LEVEL": "warning"},
    )  # fmt: skip
    bus = Bus(nats_server.url)
    for _ in range(200):
        try:
            bus.request(f"virt.{host}.cmd.ping", b"{}")
            break
        except Exception:
            bus.loop.run_until_complete(asyncio.sleep(0.1))
    yield bus, host, proc
    bus.close()


counted: dict[str, int] = {}


def test_every_payload_gets_a_well_formed_reply(fuzz_target: tuple[Bus, str, AgentProcess]) -> None:
    """10,000 generated and mutated payloads on every verb: each answered with ok or a contract error code."""
    bus, host, proc = fuzz_target
    counted.clear()

    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(verb=st.sampled_from([*VERBS, "nope", "domain.nope", "ping.extra"]), data=payloads())
    def check(verb: str, data: bytes) -> None:
        reply: Any = msgspec.json.decode(bus.request(f"virt.{host}.cmd.{verb}", data))
        assert isinstance(reply, dict)
        assert isinstance(reply.get("ok"), bool)
        if reply["ok"]:
            assert "result" in reply
        else:
            err = reply["error"]
            assert err["code"] in ERROR_CODES, reply
            assert err["code"] != "internal", reply
            assert isinstance(err["message"], str)
            assert err["message"]
        counted[verb] = counted.get(verb, 0) + 1

    check()
    assert sum(counted.values()) >= 10_000
    assert set(VERBS) <= set(counted)
    assert proc.proc.poll() is None, "the agent must still be running"
    pong = msgspec.json.decode(bus.request(f"virt.{host}.cmd.ping", b"{}"))
    assert pong["ok"] is True
    assert "Traceback" not in proc.output()
