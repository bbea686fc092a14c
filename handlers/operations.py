"""`operation.get`, `operation.list`, `operation.cancel`: long operations, from the journal."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from agent.context import Context, Verb
from agent.envelope import Operation
from agent.fields import DomainName, OpId, RequestId


class OpRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation_id: OpId
    request_id: RequestId | None = None


class ListRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    state: Annotated[str, Meta(max_length=32)] | None = None
    domain: DomainName | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    request_id: RequestId | None = None


async def op_get(ctx: Context, req: OpRequest) -> Operation:
    return ctx.operations.get(req.operation_id)


async def op_list(ctx: Context, req: ListRequest) -> list[Operation]:
    return ctx.operations.journal.recent(req.limit, req.state, req.domain)


class CancelRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation_id: OpId
    # For an operation that runs others (host.drain): cancel those too, with their rollback.
    cancel_running: bool = False
    request_id: RequestId | None = None


async def op_cancel(ctx: Context, req: CancelRequest) -> Operation:
    return ctx.operations.cancel(req.operation_id, running=req.cancel_running)


VERBS = [
    Verb("operation.get", OpRequest, op_get),
    Verb("operation.list", ListRequest, op_list),
    Verb("operation.cancel", CancelRequest, op_cancel),
]
