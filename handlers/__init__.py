"""Command handlers, one module per verb family; `all_verbs()` is the registry.

A handler is `async def handler(ctx, request) -> result` (agent/context.py: `Context`, `Verb`):
it receives a validated, typed request and returns something msgspec can encode, or raises an
AgentError whose family is the reply's error code. Handlers never publish to NATS themselves.
"""

from __future__ import annotations

from agent.context import Verb


def all_verbs() -> dict[str, Verb]:
    from handlers import (  # noqa: PLC0415
        devices,
        domain,
        drain,
        failover,
        migration,
        operations,
        pool,
        system,
    )

    verbs: list[Verb] = [
        *system.VERBS, *domain.VERBS, *devices.VERBS, *migration.VERBS, *failover.VERBS,
        *pool.VERBS, *operations.VERBS, *drain.VERBS,
    ]  # fmt: skip
    return {v.name: v for v in verbs}
