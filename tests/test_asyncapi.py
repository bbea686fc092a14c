"""docs/asyncapi.yaml is what the models generate, and what the agent really emits conforms
to it: domain events of many types, host events, operation events and command replies,
collected from a running agent and validated against the document's schemas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import jsonschema
import referencing
from referencing.jsonschema import DRAFT202012

from agent.asyncapi import build
from agent.envelope import FINAL
from tests.support import ROOT
from tests.support.agents import RunningAgent
from tests.support.bus import Collector, call
from tests.support.domains import define

DOC = ROOT / "docs" / "asyncapi.yaml"
FINAL_OPERATION_TYPES = {f"virt.operation.{state}" for state in FINAL}


def test_the_document_is_generated_from_the_models() -> None:
    """Regenerate with `python -m agent.asyncapi > docs/asyncapi.yaml` when this fails."""
    assert json.loads(DOC.read_text()) == json.loads(json.dumps(build()))


def validator(doc: dict[str, Any], message: str) -> jsonschema.Draft202012Validator:
    resource = referencing.Resource.from_contents(doc, default_specification=DRAFT202012)
    registry = referencing.Registry().with_resource("urn:virt-agent:asyncapi", resource)
    schema = {"$ref": f"urn:virt-agent:asyncapi#/components/messages/{message}/payload"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def message_key(event: dict[str, Any]) -> str:
    t = event["type"]
    if t.startswith("virt.operation."):
        return "operation"
    return t.removeprefix("virt.")


async def test_emitted_messages_conform_to_the_document(
    start_agent: Callable[..., Awaitable[RunningAgent]],
    collect: Callable[[str], Awaitable[Collector]],
    nc: Any,
    testdrv: Any,
) -> None:
    doc = json.loads(DOC.read_text())
    agent = await start_agent()
    # A second host, so that a migration is accepted as an operation (and fails on the test
    # driver, which cannot migrate): its operation events are validated too.
    peer = await start_agent()
    kinds = ("event", "host", "op")
    collectors = [await collect(f"virt.{agent.host}.{kind}.>") for kind in kinds]
    domain_events = collectors[0]
    await agent.agent.resync("requested")
    dom = define(testdrv)
    for action in (dom.create, dom.suspend, dom.resume, dom.destroy, dom.undefine):
        await asyncio.to_thread(action)
    replies = [
        await call(nc, agent.host, "ping"),
        await call(nc, agent.host, "domain.list"),
        await call(nc, agent.host, "domain.get", {"domain": "test"}),
        await call(nc, agent.host, "domain.get", {"domain": "nope"}),
        await call(nc, agent.host, "migrate", {"domain": "test", "destination": "nowhere"}),
        await call(nc, agent.host, "migrate", {"domain": "test", "destination": peer.host}),
        await call(nc, agent.host, "no.such.verb"),
    ]
    await domain_events.wait_for(lambda e: e["data"].get("event") == "undefined")
    await collectors[2].wait_for(lambda e: e["type"] in FINAL_OPERATION_TYPES, 30)
    await agent.settled()

    seen = set()
    for subject, ev, _ in [m for c in collectors for m in c.messages]:
        key = message_key(ev)
        errors = [e.message for e in validator(doc, key).iter_errors(ev)]
        assert errors == [], f"{subject}: {errors}"
        seen.add(key)
    assert {"domain.lifecycle", "host.resync", "operation"} <= seen
    for reply in replies:
        assert list(validator(doc, "reply").iter_errors(reply)) == []
    # A request that the document says is invalid is also refused by the agent.
    bad = {"domain": 5}
    assert list(validator(doc, "command.domain.get").iter_errors(bad))
    refused = await call(nc, agent.host, "domain.get", bad)
    assert refused["error"]["code"] == "invalid_request"
