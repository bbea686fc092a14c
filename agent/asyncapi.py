"""The bus API as an AsyncAPI 3.0 document, generated from the models the agent encodes and
decodes with, so it cannot drift from them:

    python -m agent.asyncapi > docs/asyncapi.yaml     (JSON, which is YAML)

A test regenerates it and compares, and validates real emitted messages against it.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import msgspec

from agent import __version__, events
from agent.envelope import FINAL, HOST_EVENT_TYPES, CloudEvent, OpEvent, OpState

REF = "#/components/schemas/{name}"
OP_STATES = (OpState.RUNNING, *sorted(FINAL))


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def domain_event_types() -> dict[str, type[events.EventData]]:
    """Contract event type -> the struct of its `data` (Generic for ids without a decoder)."""
    by_name = {_snake(c.__name__): c for c in events.EventData.__subclasses__()}
    shared = {"pmwakeup": "pm_event", "pmsuspend": "pm_event", "pmsuspend_disk": "pm_event",
              "device_added": "device", "device_removed": "device",
              "device_removal_failed": "device"}  # fmt: skip
    out = {}
    for kind in events.catalog():
        out[kind.event_type] = by_name.get(shared.get(kind.event_type, kind.event_type),
                                           events.Generic)  # fmt: skip
    return out


def _envelope(type_const: str, data_ref: str, subject: bool) -> dict[str, Any]:
    props: dict[str, Any] = {"type": {"const": type_const}, "data": {"$ref": data_ref}}
    required = ["subject"] if subject else []
    return {"allOf": [{"$ref": REF.format(name="CloudEvent")},
                      {"type": "object", "properties": props, "required": required}]}  # fmt: skip


def build() -> dict[str, Any]:
    from agent.current_state import DomainState  # noqa: PLC0415
    from agent.envelope import Reply  # noqa: PLC0415
    from handlers import all_verbs  # noqa: PLC0415 - the verbs import the whole agent

    dom_types = domain_event_types()
    host_types = {name: cls for cls, name in HOST_EVENT_TYPES.items()}
    verbs = sorted(all_verbs().values(), key=lambda v: v.name)
    requests = sorted({v.request for v in verbs}, key=lambda c: f"{c.__module__}.{c.__name__}")
    data = sorted(set(dom_types.values()), key=lambda c: c.__name__)
    structs: list[Any] = [CloudEvent, OpEvent, Reply, DomainState, *data, *host_types.values(),
                          *requests]  # fmt: skip
    refs_of, schemas = msgspec.json.schema_components(structs, ref_template=REF)
    request_ref = dict(zip(requests, refs_of[-len(requests) :], strict=True))
    messages: dict[str, Any] = {}
    for et, cls in sorted(dom_types.items()):
        messages[f"domain.{et}"] = {
            "name": f"virt.domain.{et}",
            "payload": _envelope(f"virt.domain.{et}", REF.format(name=cls.__name__), True),
        }
    for name, host_cls in sorted(host_types.items()):
        messages[f"host.{name}"] = {
            "name": f"virt.host.{name}",
            "payload": _envelope(f"virt.host.{name}", REF.format(name=host_cls.__name__), False),
        }
    messages["operation"] = {
        "name": "virt.operation.<state>",
        "payload": {"allOf": [{"$ref": REF.format(name="CloudEvent")}, {
            "type": "object",
            "properties": {"type": {"enum": [f"virt.operation.{s}" for s in OP_STATES]},
                           "data": {"$ref": REF.format(name="OpEvent")}},
        }]},
    }  # fmt: skip
    messages["reply"] = {"name": "reply", "payload": {"$ref": REF.format(name="Reply")}}
    messages["domainState"] = {
        "name": "virt_domains value",
        "payload": {"$ref": REF.format(name="DomainState")},
    }
    operations: dict[str, Any] = {
        "publishDomainEvents": {"action": "send", "channel": {"$ref": "#/channels/domainEvent"}},
        "publishHostEvents": {"action": "send", "channel": {"$ref": "#/channels/hostEvent"}},
        "publishOperationEvents": {"action": "send",
                                   "channel": {"$ref": "#/channels/operation"}},
        "writeDomainStates": {"action": "send", "channel": {"$ref": "#/channels/domainState"}},
    }  # fmt: skip
    for verb in verbs:
        key = f"command.{verb.name}"
        messages[key] = {"name": verb.name, "payload": request_ref[verb.request]}
        channel = "peerCommand" if verb.peer else "command"
        operations[f"command_{verb.name.replace('.', '_')}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{key}"}],
            "reply": {"channel": {"$ref": "#/channels/reply"},
                      "messages": [{"$ref": "#/channels/reply/messages/reply"}]},
        }  # fmt: skip

    peer = {v.name: v.peer for v in verbs}

    def refs(prefix: str) -> dict[str, Any]:
        return {k: {"$ref": f"#/components/messages/{k}"} for k in messages if k.startswith(prefix)}

    host = {"description": "the agent's host id, one subject token"}
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "virt-agent bus API",
            "version": f"1 (agent {__version__})",
            "description": "libvirt domain events out, commands in (../shared/CONTRACT.md). "
            "Generated from the agent's models by `python -m agent.asyncapi`.",
        },
        "defaultContentType": "application/json",
        "channels": {
            "domainEvent": {
                "address": "virt.{host}.event.{domain_uuid}.{event_type}",
                "parameters": {
                    "host": host,
                    "domain_uuid": {},
                    "event_type": {"enum": sorted(dom_types)},
                },
                "messages": refs("domain."),
            },
            "hostEvent": {
                "address": "virt.{host}.host.{event_type}",
                "parameters": {"host": host, "event_type": {"enum": sorted(host_types)}},
                "messages": refs("host."),
            },
            "operation": {
                "address": "virt.{host}.op.{operation_id}",
                "parameters": {"host": host, "operation_id": {}},
                "messages": refs("operation"),
            },
            "command": {
                "address": "virt.{host}.cmd.{verb}",
                "parameters": {
                    "host": host,
                    "verb": {"enum": sorted(v.name for v in verbs if not v.peer)},
                },
                "messages": {
                    k: v
                    for k, v in refs("command.").items()
                    if not peer.get(k.removeprefix("command."))
                },
            },
            "peerCommand": {
                "address": "virt.{host}.cmd.{verb}.{caller}",
                "description": "agent-to-agent verbs (contract v1.1): `caller` is the calling "
                "host's id, which the server's permissions let only that host use. The v1 form "
                "without it is served while commands.accept_v1_peer_calls is true.",
                "parameters": {
                    "host": host,
                    "caller": host,
                    "verb": {"enum": sorted(v.name for v in verbs if v.peer)},
                },
                "messages": {
                    k: v
                    for k, v in refs("command.").items()
                    if peer.get(k.removeprefix("command."))
                },
            },
            "reply": {"address": None, "messages": refs("reply")},
            "domainState": {
                "address": "$KV.virt_domains.{host}.{domain_uuid}",
                "description": "the key-value bucket virt_domains (contract v1.2, Current "
                "state): key `<host>.<domain_uuid>`, the domain's current state, written by "
                "the owning host's agent on lifecycle changes and reconciled at every resync; "
                "a KV delete marker (header KV-Operation: DEL) when the domain leaves the host. "
                "Read with any KV client: nats-py `js.key_value('virt_domains')`, "
                "`kv.watch('<host>.*')`, or `virt-agent ps`.",
                "parameters": {"host": host, "domain_uuid": {}},
                "messages": refs("domainState"),
            },
        },
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }


def main() -> None:
    sys.stdout.write(json.dumps(build(), indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
