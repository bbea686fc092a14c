"""Every failover NIC form, and every definition the agent generates from it, as the lab's real
libvirtd (qemu driver, Debian 12's libvirt) sees it: `define` applies libvirt's own parsing and
teaming rules (not started: no VF exists here), and what the agent records is taken from the
inactive XML libvirt gives back, not from a fixture."""

from __future__ import annotations

import asyncio
import itertools
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from agent.devices import device_xml
from agent.errors import Forbidden
from agent.journal import Journal
from agent.nicxml import names_vf
from agent.pool import Pool
from agent.settings import DeviceSettings, FailoverSettings
from tests import nic_forms

pytestmark = pytest.mark.lab

RESOURCES = ["recorded", "pci:0000:5e:10.3", "network:sriov-b"]


def define_and_read(uri: str, primary: str, name: str) -> str:
    """Define a domain with the standby and this primary on a real libvirtd (validated
    against libvirt's schema too), and give back the primary from its inactive XML."""
    conn = libvirt.open(uri)
    try:
        dom = conn.defineXMLFlags(
            nic_forms.domain_xml(primary, name=name, kind="qemu"),
            libvirt.VIR_DOMAIN_DEFINE_VALIDATE,
        )
        try:
            inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        finally:
            dom.undefine()
    finally:
        conn.close()
    device = device_xml(inactive, nic_forms.PRIMARY_ALIAS)
    assert device is not None, f"libvirt kept the user alias {nic_forms.PRIMARY_ALIAS}"
    return device


@pytest.mark.parametrize(
    ("form", "resource"),
    list(itertools.product(nic_forms.FORMS, RESOURCES)),
    ids=lambda v: v.name if isinstance(v, nic_forms.Form) else v,
)
async def test_libvirt_defines_every_form_and_every_definition_generated_from_it(
    form: nic_forms.Form, resource: str, host_a: Any, tmp_path: Path
) -> None:
    """libvirt defines the form; from the inactive XML it gives back, the pool builds the destination's definition, which libvirt defines too, keeping alias, teaming and (where there is one) the MAC."""
    recorded = await asyncio.to_thread(define_and_read, host_a.uri, form.inactive, "nf-src")
    pool = Pool(FailoverSettings(), DeviceSettings(), Journal(tmp_path / "ops.db"))
    if resource == "recorded" and names_vf(recorded):
        # The source's VF by address: never plugged on another host without a pool.
        with pytest.raises(Forbidden, match="VF of the source host"):
            pool.definition(resource, recorded)
        return
    generated = pool.definition(resource, recorded, nic_forms.MAC)
    back = ET.fromstring(await asyncio.to_thread(define_and_read, host_a.uri, generated, "nf-dst"))
    src = ET.fromstring(recorded)
    teaming = back.find("teaming")
    assert teaming is not None
    assert (teaming.get("type"), teaming.get("persistent")) == (
        "transient", nic_forms.STANDBY_ALIAS,
    )  # fmt: skip
    mac = src.find("mac")
    if mac is not None:
        assert back.find("mac").get("address") == mac.get("address")
