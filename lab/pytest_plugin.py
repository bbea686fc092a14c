"""The lab as pytest fixtures (a plugin: tests/conftest.py names it): the three-host lab for
the session, its hosts, and guests booted for one test and removed after it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lab.prereqs import LabUnavailable


@pytest.fixture(scope="session")
def lab() -> Iterator[Any]:
    """The three-host QEMU lab (lab/lab.py; host c for drains), up for the session and torn
    down after it; the tests that use it are skipped where it cannot run."""
    from lab.lab import Lab  # noqa: PLC0415 - only lab tests pay for importing it

    try:
        with Lab(hosts=3).session() as the_lab:
            yield the_lab
    except LabUnavailable as exc:  # raised while it came up (and went down again)
        pytest.skip(str(exc))


@pytest.fixture
def host_a(lab: Any) -> Any:
    """Lab host a (its libvirtd: host_a.uri)."""
    return lab.host("a")


@pytest.fixture
def host_b(lab: Any) -> Any:
    """Lab host b (its libvirtd: host_b.uri)."""
    return lab.host("b")


@pytest.fixture
def guest(lab: Any) -> Iterator[Callable[..., Any]]:
    """Boot lab guests (failover pair or virtio only); each is destroyed and undefined after,
    and no guest may be left on a lab host then (none keeps burning CPU under other tests)."""
    booted: list[str] = []

    def boot(
        host: str = "a", kind: str = "failover", variant: str = "stock", dirty_mib: int = 0
    ) -> Any:
        name = f"g{uuid.uuid4().hex[:6]}"
        booted.append(name)
        return lab.boot(
            host, name, kind, index=len(booted) - 1, variant=variant, dirty_mib=dirty_mib
        )

    yield boot
    left = lab.remove_guests(booted)
    if left:
        pytest.fail(f"guests left on the lab hosts (removed now): {left}", pytrace=False)
