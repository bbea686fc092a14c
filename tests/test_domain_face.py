"""agent/domain.py, the typed face of a libvirt domain, against libvirt's test driver: the
state enum agrees with what libvirt says of the domain, lookups answer not-found and
ambiguity as values and errors, metadata and the inactive definition round-trip, and a
driver without jobs runs none."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import libvirt
import pytest

from agent.domain import DomainState, Job
from agent.errors import InvalidRequest, NotFound, Unavailable
from agent.hypervisor import Hypervisor
from agent.metrics import Metrics
from agent.settings import LibvirtSettings
from tests.support.domains import DOMAIN_XML, define

NS = "http://virt-agent.test/face/1"


@pytest.fixture
async def hv(testdrv: Any) -> AsyncIterator[Hypervisor]:
    hv = Hypervisor(LibvirtSettings(), "test:///default", "h", lambda _e: None, Metrics())
    await hv.connect()
    yield hv
    await hv.close()


def test_every_state_libvirt_names_has_its_member() -> None:
    for member in DomainState:
        code = getattr(libvirt, f"VIR_DOMAIN_{member.name}")
        assert DomainState.of(code) is member
    assert DomainState.of(99) is DomainState.NOSTATE, "a state newer than the agent"


async def test_the_state_and_its_activity_agree_with_libvirt(hv: Hypervisor, testdrv: Any) -> None:
    raw = define(testdrv)
    seen = []
    for change in (None, raw.create, raw.suspend, raw.resume, raw.destroy):
        if change is not None:
            change()
        dom = await hv.domain(raw.UUIDString())
        state, _ = await dom.state()
        assert state.active == bool(raw.isActive()) == await dom.is_active(), state
        assert (await dom.info()).state is state
        seen.append(state)
    assert seen == [DomainState.SHUTOFF, DomainState.RUNNING, DomainState.PAUSED,
                    DomainState.RUNNING, DomainState.SHUTOFF]  # fmt: skip


async def test_lookups_answer_by_uuid_and_name_and_say_what_is_missing(
    hv: Hypervisor, testdrv: Any
) -> None:
    raw = define(testdrv)
    by_name = await hv.lookup(raw.name())
    by_uuid = await hv.lookup(raw.UUIDString())
    assert (by_name.uuid, by_name.name) == (by_uuid.uuid, by_uuid.name) == (
        raw.UUIDString(), raw.name())  # fmt: skip
    missing = str(uuid.uuid4())
    assert await hv.find(missing) is None
    with pytest.raises(NotFound, match=missing):
        await hv.domain(missing)
    with pytest.raises(NotFound, match="t-nothere"):
        await hv.lookup("t-nothere")
    # A domain named with another domain's UUID: which one is meant cannot be told.
    other = testdrv.defineXML(DOMAIN_XML.format(name=raw.UUIDString(), uuid=uuid.uuid4()))
    try:
        with pytest.raises(InvalidRequest, match="UUID of domain"):
            await hv.lookup(raw.UUIDString())
    finally:
        other.undefine()
    assert await hv.where_is(missing, None) == "nowhere"


async def test_metadata_is_written_read_and_removed(hv: Hypervisor, testdrv: Any) -> None:
    raw = define(testdrv)
    raw.create()
    dom = await hv.domain(raw.UUIDString())
    assert await dom.metadata(NS) is None, "none yet: a value, not an error"
    await dom.set_metadata(NS, "face", "<mark n='1'/>")
    assert 'n="1"' in (await dom.metadata(NS) or "")
    assert NS in raw.XMLDesc(0), "libvirt keeps it in the live definition"
    await dom.set_metadata(NS, "face", None)
    assert await dom.metadata(NS) is None


async def test_the_inactive_definition_is_the_persistent_one(hv: Hypervisor, testdrv: Any) -> None:
    raw = define(testdrv)
    raw.create()
    name, uid = raw.name(), raw.UUIDString()
    testdrv.defineXML(DOMAIN_XML.format(name=name, uuid=uid).replace("65536", "131072"))
    dom = await hv.domain(uid)
    assert await dom.persistent()
    assert "65536" in await dom.xml()
    assert "131072" in await dom.xml(inactive=True), "the next boot's definition"


async def test_a_driver_without_jobs_runs_none(hv: Hypervisor, testdrv: Any) -> None:
    raw = define(testdrv)
    raw.create()
    assert await (await hv.domain(raw.UUIDString())).job() is Job.NONE


async def test_a_hypervisor_not_connected_answers_unavailable() -> None:
    """Before libvirt connects (or while it is away) every question is `unavailable`, the code
    a caller retries on - not an internal error."""
    hv = Hypervisor(LibvirtSettings(), "test:///default", "h", lambda _e: None, Metrics())
    try:
        for ask in (hv.versions(), hv.lookup("t-any"), hv.find(str(uuid.uuid4())), hv.running(),
                    hv.where_is(str(uuid.uuid4()), None)):  # fmt: skip
            with pytest.raises(Unavailable, match="not connected"):
                await ask
    finally:
        await hv.close()
