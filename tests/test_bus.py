"""The bus connection's own guarantees, checked on the bytes a real nats-server receives."""

from __future__ import annotations

import asyncio
import contextlib

import nats

from agent.bus import subscribed
from agent.embedded import NatsServer
from agent.registry import BUCKET, Registration, Registry, open_bucket


class RecordingProxy:
    """A TCP relay in front of the nats-server that keeps every byte the client sent."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.sent = bytearray()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_w]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, keep: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    if keep:
                        self.sent += data
                    w.write(data)
                    await w.drain()

        for t in (pipe(reader, up_w, True), pipe(up_r, writer, False)):
            task = asyncio.create_task(t)
            self._tasks.add(task)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers:
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
        await self._server.wait_closed()


async def test_subscribed_returns_only_once_the_server_has_the_subscription(
    nats_server: NatsServer,
) -> None:
    """nats-py's flush() writes its PING ahead of commands still in the client's buffer, so a
    subscription followed by a lone flush() can still be on its way when flush() returns; a
    publisher on another connection then reaches a server that has no such subscriber yet."""
    proxy = RecordingProxy(nats_server.port)
    port = await proxy.start()
    nc = await nats.connect(f"nats://127.0.0.1:{port}")
    try:
        for i in range(5):
            start = len(proxy.sent)
            await nc.subscribe(f"probe.{i}")
            await subscribed(nc)
            # What the server had read when it answered the last PING:
            sent = bytes(proxy.sent[start:])
            last_ping = sent.rfind(b"PING\r\n")
            assert last_ping != -1, sent
            assert f"SUB probe.{i} ".encode() in sent[:last_ping], sent
    finally:
        await nc.close()
        await proxy.close()


async def test_the_host_list_never_misses_a_registered_host(nats_server: NatsServer) -> None:
    """nats-py's `KeyValue.keys()` decides "no keys" from a consumer-info reply that can
    arrive before the consumer's first message: a registered host was sometimes missing from
    `virt-agent hosts` (2 of 300 listings on a quiet machine). Each listing here is a fresh
    connection, as the CLI makes one."""
    nc = await nats.connect(nats_server.url)
    try:
        registry = Registry(await open_bucket(nc, 60, 1), nc.jetstream())
        for host in ("hv01", "hv02"):
            await registry.publish(registration(host))
        await registry.withdraw("hv02")
        await registry.publish(registration("hv03"))

        async def listing() -> list[str]:
            c = await nats.connect(nats_server.url)
            try:
                js = c.jetstream()
                kv = await js.key_value(BUCKET)
                try:
                    return sorted(r.host for r in await Registry(kv, js).hosts())
                except nats.js.errors.BadRequestError as exc:
                    return [str(exc)]
            finally:
                await c.close()

        # Listing leaves no consumer behind (keys() left one per listing for 5 minutes, and
        # an operator's loop of `virt-agent hosts` reached the server's consumer limit).
        lists = [
            h for _ in range(300) for h in await asyncio.gather(*(listing() for _ in range(4)))
        ]
        wrong = [hosts for hosts in lists if hosts != ["hv01", "hv03"]]
        assert not wrong, f"{len(wrong)} of {len(lists)} listings wrong: {wrong[:3]}"
    finally:
        await nc.close()


def registration(host: str) -> Registration:
    return Registration(host=host, boot_id="b", version="0", libvirt_uri="test:///default",
                        migration_uri="", capabilities=None, updated=0.0)  # fmt: skip
