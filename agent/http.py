"""HTTP face for operators and orchestrators: /healthz, /readyz and Prometheus /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from agent.metrics import Metrics

log = structlog.get_logger("agent.http")


class HttpServer:
    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        readiness: Callable[[], dict[str, Any]],
    ) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.metrics = metrics
        self._health = health
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        self.bound: list[str] = []

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        self.bound = [f"{a[0]}:{a[1]}" for a in runner.addresses]
        log.info("http listening", addresses=self.bound)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response(self._health())

    async def _readyz(self, _: web.Request) -> web.Response:
        body = self._readiness()
        return web.json_response(body, status=200 if body.get("ready") else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"}
        )
