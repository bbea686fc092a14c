"""The bus connection's own guarantees, checked on the bytes a real nats-server receives."""

from __future__ import annotations

import asyncio
import contextlib

import nats

from agent.bus import subscribed
from agent.embedded import NatsServer


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
