"""`device.detach` and `device.attach`: hot-unplug by alias, waiting for DEVICE_REMOVED, and
hot-plug of a configured template or of what the agent itself recorded at detach. No XML is
taken from the bus."""

from __future__ import annotations

from typing import Any

import msgspec

from agent.context import Context, Verb
from agent.devices import alias_of, defined_form, device_xml, plug, template_xml, unplug
from agent.errors import Conflict, InvalidRequest, NotFound
from agent.fields import Alias, DomainName, RequestId, TemplateName


class DetachRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    domain: DomainName
    alias: Alias
    request_id: RequestId | None = None


class AttachRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    domain: DomainName
    # Exactly one: a template named in the agent's configuration, or the alias of a device
    # this agent detached (its recorded definition is plugged back).
    template: TemplateName | None = None
    alias: Alias | None = None
    request_id: RequestId | None = None


async def detach(ctx: Context, req: DetachRequest) -> dict[str, Any]:
    hv = ctx.hypervisor
    dom = await hv.lookup(req.domain)
    uuid = dom.uuid
    async with ctx.exclusive(uuid):
        live = await dom.xml()
        if device_xml(live, req.alias) is None:
            raise NotFound(
                f"domain {req.domain!r} has no device with alias {req.alias!r}", alias=req.alias
            )
        # As defined: a port of a hostdev network is recorded as the port, not as the VF its
        # network gave it (device.attach would plug that VF by address behind its back).
        xml = await defined_form(dom, live, req.alias)
        ctx.operations.journal.record_device(uuid, req.alias, xml)
        await unplug(hv, dom, req.alias, ctx.devices.detach_timeout_s)
    return {"alias": req.alias, "removed": True, "recorded": True}


async def attach(ctx: Context, req: AttachRequest) -> dict[str, Any]:
    hv = ctx.hypervisor
    if (req.template is None) == (req.alias is None):
        raise InvalidRequest("give exactly one of template or alias")
    dom = await hv.lookup(req.domain)
    uuid = dom.uuid
    if req.template is not None:
        xml = template_xml(ctx.devices, req.template)
    else:
        assert req.alias is not None
        recorded = ctx.operations.journal.recorded_device(uuid, req.alias)
        if recorded is None:
            raise NotFound(
                f"no device {req.alias!r} was detached from {req.domain!r} by this agent",
                alias=req.alias,
            )
        xml = recorded
    alias = alias_of(xml)
    async with ctx.exclusive(uuid):
        live = await dom.xml()
        if device_xml(live, alias) is not None:
            raise Conflict(
                f"domain {req.domain!r} already has a device with alias {alias!r}", alias=alias
            )
        await plug(hv, dom, xml, alias, ctx.devices.detach_timeout_s)
    return {"alias": alias, "added": True}


VERBS = [
    Verb("device.detach", DetachRequest, detach),
    Verb("device.attach", AttachRequest, attach),
]
