"""A nats-server and one `virt-agent run` process per lab host: what the demo and the lab
benchmark drive migrate-with-failover through, as an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from agent.embedded import NatsServer, stop_process
from agent.opwatch import follow
from lab.daemon import free_port
from lab.lab import Lab

ROOT = Path(__file__).resolve().parent.parent


def agent_env(**extra: str) -> dict[str, str]:
    """The environment for a `virt-agent` process: this one's without VIRT_AGENT_* settings
    (they would override what it is given), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRT_AGENT_")}
    env.update(extra)
    return env


async def answering(nc: NATS, hosts: list[str], timeout: float = 30) -> None:
    """Until every one of these hosts' agents answers `ping` and has registered this boot in
    `virt_hosts` (only then can another host find it as a destination; a ping is answered
    as soon as commands are heard, before libvirt's capabilities are probed)."""
    deadline = time.monotonic() + timeout
    pending = set(hosts)
    while pending:
        for h in list(pending):
            with contextlib.suppress(Exception):
                msg = await nc.request(f"virt.{h}.cmd.ping", b"{}", timeout=1)
                pong = msgspec.json.decode(msg.data)
                if not pong.get("ok"):
                    continue
                kv = await nc.jetstream().key_value("virt_hosts")
                entry = await kv.get(h)
                registered = msgspec.json.decode(entry.value or b"{}").get("boot_id")
                if registered == pong["result"]["boot_id"]:
                    pending.discard(h)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"agents not answering: {sorted(pending)[:5]}")
        await asyncio.sleep(0.2)


class LabAgents:
    def __init__(self, lab: Lab, work: Path, **env: str) -> None:
        self.lab = lab
        self.work = Path(work)
        self.env = env
        self.server: NatsServer | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.nc: NATS | None = None
        self.http: dict[str, str] = {}  # lab host -> the agent's health and metrics address

    def host_id(self, name: str) -> str:
        return f"lab-{name}"

    async def start(self) -> LabAgents:
        await asyncio.to_thread(self._spawn)
        assert self.server is not None
        self.nc = await nats.connect(self.server.url)
        for h in self.lab.hosts:
            await self._ready(h.name)
        return self

    def _spawn(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.server = NatsServer(self.work / "nats").start()
        env = agent_env()
        # Migration data over loopback, as the raw scripted baselines send it.
        env.update({"VIRT_AGENT_LOG_FORMAT": "json",
                    "VIRT_AGENT_LIBVIRT_MIGRATION_URI": "tcp://127.0.0.1", **self.env})  # fmt: skip
        for h in self.lab.hosts:
            self.http[h.name] = f"127.0.0.1:{free_port()}"
            log = open(self.work / f"agent-{h.name}.log", "wb")  # noqa: SIM115 - owned by the process
            self.procs[h.name] = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--libvirt-uri", h.uri,
                 "--nats-url", self.server.url, "--host-id", self.host_id(h.name),
                 "--state-dir", str(self.work / f"state-{h.name}"),
                 "--http-addr", self.http[h.name]],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip

    async def _ready(self, name: str) -> None:
        assert self.nc is not None
        try:
            await answering(self.nc, [self.host_id(name)])
        except TimeoutError:
            raise RuntimeError(
                f"agent for lab host {name} not ready; see {self.work}/agent-{name}.log"
            ) from None

    async def operation(
        self, src: str, verb: str, body: dict[str, Any], on_update: Any = None
    ) -> tuple[dict[str, Any], float]:
        """A long-operation verb on lab host `src`'s agent: the final operation and the wall
        time from the request to its final state."""
        assert self.nc is not None
        t0 = time.monotonic()
        msg = await self.nc.request(
            f"virt.{self.host_id(src)}.cmd.{verb}", msgspec.json.encode(body), timeout=30
        )
        reply = msgspec.json.decode(msg.data)
        if not reply.get("ok"):
            raise RuntimeError(f"{verb} refused: {reply['error']}")
        op_id = reply["result"]["operation_id"]
        op = await follow(self.nc, f"virt.{self.host_id(src)}.op.{op_id}", on_update, 900)
        return op, time.monotonic() - t0

    async def failover(
        self, domain: str, src: str, dst: str, on_update: Any = None
    ) -> tuple[dict[str, Any], float]:
        """migrate_with_failover src → dst."""
        body = {"domain": domain, "destination": self.host_id(dst)}
        return await self.operation(src, "migrate_with_failover", body, on_update)

    async def request(self, host: str, verb: str, body: dict[str, Any]) -> dict[str, Any]:
        """A short verb on lab host `host`'s agent: its result (an error reply raises)."""
        assert self.nc is not None
        msg = await self.nc.request(
            f"virt.{self.host_id(host)}.cmd.{verb}", msgspec.json.encode(body), timeout=60
        )
        reply = msgspec.json.decode(msg.data)
        if not reply.get("ok"):
            raise RuntimeError(f"{verb} refused: {reply['error']}")
        return dict(reply["result"])

    def metric(self, name: str, metric: str) -> dict[str, float]:
        """Samples of one metric family from a lab host's agent, by label text."""
        with urllib.request.urlopen(f"http://{self.http[name]}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(metric):
                key, _, value = line.rpartition(" ")
                out[key[len(metric) :]] = float(value)
        return out

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()
        for p in self.procs.values():
            stop_process(p)
        if self.server is not None:
            self.server.stop()
