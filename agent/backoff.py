"""One exponential back-off with jitter for every loop that tries again: libvirt reconnect,
NATS connect, JetStream at start, the resync after a (re)connect, the replug of a primary, the
reconcile of owed primaries. Small enough not to need a library: a delay that doubles up to a
bound, with +-20 % jitter so a fleet does not retry in step, and a wait that a stop request
cuts short."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import structlog

log = structlog.get_logger("agent.backoff")
T = TypeVar("T")


class Backoff:
    def __init__(self, first_s: float, max_s: float, jitter: float = 0.2) -> None:
        self.first_s = first_s
        self.max_s = max_s
        self.jitter = jitter
        self.delay = first_s

    def next(self) -> float:
        """The delay to wait now; the one after it is doubled (up to the bound)."""
        d = self.delay
        self.delay = min(self.max_s, self.delay * 2)
        return d * random.uniform(1 - self.jitter, 1 + self.jitter)  # noqa: S311 - not crypto

    def reset(self) -> None:
        self.delay = self.first_s

    async def wait(self, stop: asyncio.Event | None = None) -> bool:
        """Sleep the next delay; True if `stop` was set meanwhile."""
        d = self.next()
        if stop is None:
            await asyncio.sleep(d)
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), d)
        return stop.is_set()


async def until_done(
    step: Callable[[], Awaitable[T]],
    *,
    transient: tuple[type[BaseException], ...],
    stop: asyncio.Event,
    backoff: Backoff,
    what: str,
) -> T | None:
    """`step()` again after each transient failure (logged as `what`) until it succeeds;
    None once `stop` is set."""
    while True:
        try:
            return await step()
        except transient as exc:
            log.warning(what, error=str(exc) or type(exc).__name__,
                        retry_in_s=round(backoff.delay, 2))  # fmt: skip
            if await backoff.wait(stop):
                return None
