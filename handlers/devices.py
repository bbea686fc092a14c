"""`device.detach` and `device.attach`: hot-unplug by alias, waiting for DEVICE_REMOVED, and
hot-plug of a configured template or of what the agent itself recorded at detach. No XML is
taken from the bus."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Annotated, Any

import libvirt
import msgspec
from msgspec import Meta

from agent.errors import Conflict, InvalidRequest, LibvirtFailure, NotFound, Timeout, Unavailable
from agent.settings import DeviceSettings
from handlers import Context, Verb
from handlers.domain import DomainName, RequestId, find_domain

Alias = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=128)]
TemplateName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]+$", min_length=1, max_length=128)]


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


def device_xml(domain_xml: str, alias: str) -> str | None:
    """The live definition of the device with this alias, without host-chosen parts."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own XML
    devices = root.find("devices")
    for dev in list(devices) if devices is not None else []:
        a = dev.find("alias")
        if a is not None and a.get("name") == alias:
            for tag in ("target",):  # the host's tap name: the destination picks its own
                for t in dev.findall(tag):
                    dev.remove(t)
            return ET.tostring(dev, encoding="unicode")
    return None


def alias_of(xml: str) -> str:
    a = ET.fromstring(xml).find("alias")  # noqa: S314 - from the agent's own config or journal
    if a is None or not a.get("name"):
        raise InvalidRequest(
            "the device definition has no <alias name='ua-...'/>; it cannot be tracked"
        )
    return str(a.get("name"))


def template_xml(settings: DeviceSettings, name: str) -> str:
    path = settings.templates.get(name)
    if path is None:
        raise NotFound(
            f"no device template {name!r} in the configuration",
            templates=sorted(settings.templates),
        )
    return Path(path).read_text()


async def detach(ctx: Context, req: DetachRequest) -> dict[str, Any]:
    hv = ctx.hypervisor
    if ctx.operations is None:
        raise Unavailable("the journal is not open yet")
    dom = await find_domain(ctx, req.domain)
    uuid = dom.UUIDString()
    async with ctx.lock(uuid):
        live = await hv.call(dom.XMLDesc, 0)
        xml = device_xml(live, req.alias)
        if xml is None:
            raise NotFound(
                f"domain {req.domain!r} has no device with alias {req.alias!r}", alias=req.alias
            )
        ctx.operations.journal.record_device(uuid, req.alias, xml)
        done = hv.expect(uuid, ("device_removed", "device_removal_failed"), req.alias)
        await hv.call(dom.detachDeviceAlias, req.alias, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        limit = ctx.devices.detach_timeout_s
        try:
            event = await asyncio.wait_for(asyncio.shield(done), limit)
        except TimeoutError:
            # Not re-sent: a second device_del would interrupt the guest's unplug.
            raise Timeout(
                f"no DEVICE_REMOVED for {req.alias!r} within {limit}s;"
                " the unplug is still in flight",
                alias=req.alias,
            ) from None
        if event.event_type == "device_removal_failed":
            raise LibvirtFailure(f"the guest refused to release {req.alias!r}", alias=req.alias)
    return {"alias": req.alias, "removed": True, "recorded": True}


async def attach(ctx: Context, req: AttachRequest) -> dict[str, Any]:
    hv = ctx.hypervisor
    if (req.template is None) == (req.alias is None):
        raise InvalidRequest("give exactly one of template or alias")
    if ctx.operations is None:
        raise Unavailable("the journal is not open yet")
    dom = await find_domain(ctx, req.domain)
    uuid = dom.UUIDString()
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
    async with ctx.lock(uuid):
        live = await hv.call(dom.XMLDesc, 0)
        if device_xml(live, alias) is not None:
            raise Conflict(
                f"domain {req.domain!r} already has a device with alias {alias!r}", alias=alias
            )
        done = hv.expect(uuid, ("device_added",), alias)
        await hv.call(dom.attachDeviceFlags, xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        try:
            await asyncio.wait_for(asyncio.shield(done), ctx.devices.detach_timeout_s)
        except TimeoutError:
            raise Timeout(f"no DEVICE_ADDED for {alias!r}", alias=alias) from None
    return {"alias": alias, "added": True}


VERBS = [
    Verb("device.detach", DetachRequest, detach, mutating=True),
    Verb("device.attach", AttachRequest, attach, mutating=True),
]
