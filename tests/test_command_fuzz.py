"""Property: whatever bytes arrive on a command subject, the agent answers with a well-formed
reply and stays healthy. 10,000 generated and mutated payloads across every verb and every
field of its request."""

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
from tests.support.agents import AgentProcess
from tests.support.bus import ERROR_CODES

VERBS = all_verbs()

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
numbers = st.one_of(
    st.sampled_from([1, 30, 600.0]),
    st.sampled_from([0, -1, 86_401, 1e12]),
    st.integers(-(2**63), 2**64),
    st.floats(allow_nan=False),
)
names = st.sampled_from(["test", "nope", str(uuid.UUID(int=0)), "", "a.b", "*", ">", "x" * 300])
ids = st.one_of(st.sampled_from(["0", "ab12", "f" * 64, "f" * 65, "XYZ"]), st.text(max_size=40))
# Values for the request fields, near the valid ones and beyond them; any other field gets
# arbitrary JSON.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "domain": names,
    "destination": names,
    "source": names,
    "force": st.booleans(),
    "postcopy": st.booleans(),
    "primary": st.sampled_from(["ua-primary0", "net0", "hostdev0", "", "ua-" + "x" * 300]),
    "alias": st.sampled_from(["ua-primary0", "ua-x", "", "net0"]),
    "mode": st.sampled_from(["auto", "sequenced", "qemu", "live", ""]),
    "operation_id": ids,
    "reservation_id": ids,
    "admission_id": ids,
    "name": names,
    "memory_kib": st.sampled_from([1, 1024, 1 << 20, 0, -1, 1 << 43]),
    "vcpus": st.sampled_from([1, 2, 0, 100_000]),
    "request_id": st.text(min_size=1, max_size=8),
    "timeout_s": numbers,
    "bandwidth_mib_s": numbers,
    "max_downtime_ms": numbers,
    "lease_s": numbers,
    "vf": st.sampled_from(["0000:3b:02.0", "0000:3B:02.1", "3b:02.0", "0000:3b:02.8", ""]),
    "mac": st.sampled_from(["52:54:00:aa:bb:cc", "52:54:00:AA:BB:CC", "52:54:00:aa:bb", ""]),
    "device": st.sampled_from(
        [
            "<interface type='bridge'><source bridge='br0'/><model type='e1000e'/>"
            "<alias name='ua-primary0'/></interface>",
            "<interface type='hostdev'><source><address type='pci' domain='0' bus='0x3b' "
            "slot='2' function='1'/></source><alias name='ua-primary0'/></interface>",
            "<interface type='network'><source network='sriov'/></interface>",
            "<interface",
            "",
        ]
    ),
    "carry": st.sampled_from(
        ["<carry managed='yes'><vlan><tag id='42'/></vlan></carry>", "<carry/>", "<", ""]
    ),
}


def request_like(verb: str, wild: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A JSON object made of any subset of the verb's own request fields, each with a value
    near the valid ones (or, `wild`, sometimes arbitrary JSON and a field it does not know)."""
    known = VERBS.get(verb)
    fields = [f.name for f in msgspec.structs.fields(known.request)] if known else []
    optional = {f: FIELD_VALUES.get(f, json_values) for f in fields}
    if wild:
        optional = {f: st.one_of(v, json_values) for f, v in optional.items()}
        optional["extra"] = json_values
    return st.fixed_dictionaries({}, optional=optional)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    verb = draw(st.sampled_from([*VERBS, "nope", "domain.nope", "ping.extra"]))
    kind = draw(st.sampled_from(["bytes", "json", "fields", "wild", "mutated"]))
    if kind == "bytes":
        return verb, draw(st.binary(max_size=200))
    if kind == "json":
        return verb, msgspec.json.encode(draw(json_values))
    body = msgspec.json.encode(draw(request_like(verb, wild=kind != "fields")))
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
    return verb, body


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
# Requests that passed decoding and validation and reached the verb's own code.
decoded: dict[str, int] = {}


def test_every_payload_gets_a_well_formed_reply(fuzz_target: tuple[Bus, str, AgentProcess]) -> None:
    """10,000 generated and mutated payloads on every verb: each answered with ok or a contract error code."""
    bus, host, proc = fuzz_target
    counted.clear()
    decoded.clear()

    @settings(max_examples=10_000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(request=requests())
    def check(request: tuple[str, bytes]) -> None:
        verb, data = request
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
        if reply["ok"] or reply["error"]["code"] != "invalid_request":
            decoded[verb] = decoded.get(verb, 0) + 1

    check()
    assert sum(counted.values()) >= 10_000
    assert set(VERBS) <= set(counted)
    # The fields are fuzzed past decoding, into the verbs themselves (a few verbs need
    # several valid ids at once and are reached only now and then).
    assert len(set(decoded) & set(VERBS)) >= len(VERBS) - 3, sorted(decoded.items())
    assert proc.proc.poll() is None, "the agent must still be running"
    pong = msgspec.json.decode(bus.request(f"virt.{host}.cmd.ping", b"{}"))
    assert pong["ok"] is True
    assert "Traceback" not in proc.output()
