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
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError

from agent import errors
from agent.envelope import Subjects
from agent.errors import AgentError, Timeout, Unavailable

_FAMILIES: dict[str, type[AgentError]] = {
    cls.code: cls
    for cls in (
        errors.InvalidRequest, errors.NotFound, errors.Conflict, errors.Unsupported,
        errors.Forbidden, errors.LibvirtFailure, errors.Timeout, errors.Unavailable,
    )
}  # fmt: skip


class Peers:
    def __init__(self, nc: NATS, prefix: str, me: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self.me = me

    async def call(self, host: str, verb: str, payload: dict[str, Any], timeout: float) -> Any:
        subject = Subjects(self.prefix, host).cmd(f"{verb}.{self.me}")
        try:
            msg = await self.nc.request(subject, msgspec.json.encode(payload), timeout=timeout)
        except NoRespondersError:
            raise Unavailable(f"no agent answers on host {host!r}", host=host) from None
        except TimeoutError:
            raise Timeout(f"host {host!r} did not answer {verb} within {timeout}s",
                          host=host, verb=verb) from None  # fmt: skip
        except NatsError as exc:
            raise Unavailable(f"request to {host!r} failed: {exc}", host=host) from None
        reply = msgspec.json.decode(msg.data)
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        family = _FAMILIES.get(err.get("code", ""), AgentError)
        raise family(f"{host}: {err.get('message', 'unknown error')}", peer=host,
                     **(err.get("details") or {}))  # fmt: skip
