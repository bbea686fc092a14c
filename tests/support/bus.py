"""Talking to the test's nats-server as the contract's parties do: commands and their
replies, other hosts' identities, collected messages, stream contents."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent.embedded import NatsServer
from agent.registry import Registration
from agent.streams import read_stream
from tests.support import ROOT

# The contract's error codes (../shared/CONTRACT.md).
ERROR_CODES = frozenset({
    "invalid_request", "not_found", "conflict", "unsupported", "forbidden",
    "libvirt_error", "timeout", "unavailable", "internal",
})  # fmt: skip


SECURED_CONF = ROOT / "config" / "nats-server.conf.example"


def secured_url(server: NatsServer, user: str) -> str:
    return f"nats://{user}:change-me-{user}@127.0.0.1:{server.port}"


async def connect_as(
    server: NatsServer, user: str, inbox: str | None = None
) -> tuple[Any, list[str]]:
    """A connection as `user`, with its own inbox prefix (`_INBOX_<user>`) unless told."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(secured_url(server, user), error_cb=on_error,
                            inbox_prefix=inbox or f"_INBOX_{user}")  # fmt: skip
    return nc, errors


PEER_VERBS = frozenset(
    {"failover.reserve", "failover.release", "failover.replug", "failover.admit"}
)


async def request_as(nc: NATS, caller: str, subject: str, data: bytes, timeout: float) -> Msg:
    """A request whose reply comes to `_INBOX_<caller>.`, as a host's agent sends it."""
    inbox = f"_INBOX_{caller}.{uuid.uuid4().hex}"
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(subject, data, reply=inbox)
        return await sub.next_msg(timeout=timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def call(
    nc: NATS,
    host: str,
    verb: str,
    payload: Any = None,
    raw: bytes | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One command over NATS request/reply; the reply, checked to be a contract reply."""
    data = raw if raw is not None else msgspec.json.encode(payload if payload is not None else {})
    subject = f"virt.{host}.cmd.{verb}"
    head, _, caller = verb.rpartition(".")
    if head in PEER_VERBS:
        # An agent-to-agent verb is answered only on the caller's own inbox prefix.
        msg = await request_as(nc, caller, subject, data, timeout)
    else:
        msg = await nc.request(subject, data, timeout=timeout)
    reply = msgspec.json.decode(msg.data)
    assert isinstance(reply, dict)
    assert isinstance(reply["ok"], bool)
    return reply


async def eventually(
    condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.2
) -> None:
    """Until `condition()` holds (checked in a thread: it may read files or call libvirt),
    within a bound generous against what it waits for; the assertion names what never came."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(poll)


class Collector:
    """Every message on a subject pattern, decoded; wait for one matching a predicate."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        self.messages.append((msg.subject, msgspec.json.decode(msg.data), dict(msg.headers or {})))
        self._changed.set()

    def events(self) -> list[dict[str, Any]]:
        return [m[1] for m in self.messages]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for _, ev, _ in self.messages[seen:]:
                if predicate(ev):
                    return ev
            seen = len(self.messages)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching event within {timeout}s; got {self.events()[-5:]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_count(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.messages)} messages, wanted {n}")
            await asyncio.sleep(0.02)


async def registration(nc: NATS, host: str) -> Registration:
    """`host`'s entry in virt_hosts, as a reader sees it."""
    kv = await nc.jetstream().key_value("virt_hosts")
    return msgspec.json.decode((await kv.get(host)).value, type=Registration)


async def stream_messages(
    nc: NATS, stream: str, subject: str = ">"
) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Everything a JetStream stream holds on a subject filter, in stream order."""
    return [(m.subject, msgspec.json.decode(m.data), dict(m.headers or {}))
            for m in await read_stream(nc, stream, subject)]  # fmt: skip
