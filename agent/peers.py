"""Agent-to-agent requests: this agent calling a verb on another host's agent over NATS
request/reply (the `failover.*` verbs). The subject ends with this host's id (contract v1.1:
`virt.<dest>.cmd.failover.reserve.<caller>`), which the server's permissions let only this
host use, so the destination knows who calls. A reply's error comes back as the same
AgentError family, so callers handle a peer's `not_found` like their own; a destination that
does not know the v1.1 form (a previous release) answers `not_found` before anything was
unplugged, so a mixed pair fails safe."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from agent.bus import request
from agent.envelope import Subjects
from agent.errors import NotFound, from_reply


class Peers:
    def __init__(self, nc: NATS, prefix: str, me: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.me = me

    async def call(self, host: str, verb: str, payload: dict[str, Any], timeout: float) -> Any:
        subject = Subjects(self.prefix, host).cmd(f"{verb}.{self.me}")
        msg = await request(self.nc, host, subject, msgspec.json.encode(payload), timeout)
        try:
            return from_reply(msg.data, host)
        except NotFound as exc:
            if exc.details.get("verb") != f"{verb}.{self.me}":
                raise
            raise NotFound(
                f"{host} does not know contract v1.1's agent-to-agent subjects (a previous "
                f"release?): upgrade it before migrating to it", **exc.details,
            ) from None  # fmt: skip
