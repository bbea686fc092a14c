"""The NATS connection: its options, the first connection retried, and what nats-py leaves out."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, SlowConsumerError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from agent.backoff import Backoff
from agent.envelope import Subjects
from agent.errors import AgentError, Timeout, Unavailable, redact
from agent.metrics import Metrics
from agent.settings import NatsSettings

log = structlog.get_logger("agent.bus")


@dataclass(frozen=True)
class BusTarget:
    """Where an operator's command (`events`, `call`, `hosts`, `migrate`) finds the bus."""

    urls: list[str]
    prefix: str
    options: dict[str, Any]  # nats.connect's TLS, authentication and inbox options
    nats: NatsSettings = field(default_factory=NatsSettings)  # the rest of [nats]

    def subjects(self, host: str) -> Subjects:
        """The contract's subjects of `host` (`*`: of every host) under this prefix."""
        return Subjects(self.prefix, host)

    async def connect(self, name: str, **more: Any) -> NATS:
        """A NATS connection, or AgentError saying (redacted) why there is none."""
        try:
            options = {"allow_reconnect": False, **self.options, **more}
            return await nats.connect(servers=self.urls, name=name, **options)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise AgentError(f"cannot reach NATS at {', '.join(redact(self.urls))}: "
                             f"{redact(str(exc) or type(exc).__name__)}") from None  # fmt: skip


# JetStream did not answer (no leader yet after a node restart, no quorum, a reconnect in
# progress): asked again later, not a failure of the agent.
JETSTREAM_UNANSWERED: tuple[type[BaseException], ...] = (
    NatsTimeoutError, TimeoutError, NoRespondersError, ServiceUnavailableError,
    nats.errors.ConnectionReconnectingError,
)  # fmt: skip


async def request(nc: NATS, host: str, subject: str, body: bytes, timeout: float) -> Msg:
    """One request to `host`'s agent, NATS's failures mapped once to the agent's errors: no
    agent there (`unavailable`), no reply in time (`timeout`), the bus failing (`unavailable`)."""
    verb = subject.split(".cmd.", 1)[-1]
    try:
        return await nc.request(subject, body, timeout=timeout)
    except NoRespondersError:
        raise Unavailable(f"no agent answers on host {host!r}", host=host) from None
    except (TimeoutError, NatsTimeoutError):
        raise Timeout(f"host {host!r} did not answer {verb} within {timeout:g}s",
                      host=host, verb=verb) from None  # fmt: skip
    except NatsError as exc:
        raise Unavailable(f"request to {host!r} failed: {exc}", host=host) from None


def connect_options(settings: NatsSettings, host: str) -> dict[str, Any]:
    """nats-py options for the configured TLS and authentication (secrets read from files),
    and the inbox prefix replies come to (`_INBOX_<host>` unless set)."""
    opts: dict[str, Any] = {"inbox_prefix": settings.inbox_prefix or f"_INBOX_{host}"}
    if settings.tls_ca_file or settings.tls_cert_file:
        ctx = ssl.create_default_context(cafile=settings.tls_ca_file or None)
        if settings.tls_cert_file:
            ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
        opts["tls"] = ctx
    if settings.user:
        opts["user"] = settings.user
        if settings.password_file:
            opts["password"] = Path(settings.password_file).read_text().strip()
    if settings.token_file:
        opts["token"] = Path(settings.token_file).read_text().strip()
    if settings.nkey_seed_file:
        opts["nkeys_seed"] = settings.nkey_seed_file
    if settings.creds_file:
        opts["user_credentials"] = settings.creds_file
    return opts


class Bus:
    """Owns the NATS connection. nats-py reconnects by itself once connected; the first
    connection is retried here with back-off until it succeeds or the agent stops."""

    def __init__(
        self, settings: NatsSettings, client_name: str, metrics: Metrics, host: str
    ) -> None:
        self.settings = settings
        self.host = host
        self.client_name = client_name
        self.metrics = metrics
        self.nc: NATS | None = None
        self._draining = False
        self._slow_logged = 0.0

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def connect(self, stop: asyncio.Event) -> NATS:
        backoff = Backoff(0.25, 10.0)
        while True:
            try:
                # nats-py retries the initial connection forever by itself (reconnects are
                # unlimited); each attempt is bounded here so a stop request is heard and the
                # failure is logged.
                attempt = asyncio.ensure_future(asyncio.wait_for(
                    nats.connect(
                        servers=self.settings.urls,
                        name=self.client_name,
                        connect_timeout=self.settings.connect_timeout_s,
                        ping_interval=self.settings.ping_interval_s,
                        max_outstanding_pings=self.settings.max_outstanding_pings,
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=1,
                        # Buffer while reconnecting, beyond the publisher's in-flight bound.
                        pending_size=64 * 1024 * 1024,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        **connect_options(self.settings, self.host),
                    ),
                    self.settings.connect_timeout_s * len(self.settings.urls) + 1,
                ))  # fmt: skip
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait({attempt, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not attempt.done():
                    attempt.cancel()
                    with contextlib.suppress(asyncio.CancelledError, NatsError, OSError):
                        await attempt
                    raise Unavailable("stopped before NATS was reachable")
                nc = attempt.result()
            except (NatsError, OSError, TimeoutError) as exc:
                log.warning(
                    "NATS not reachable yet",
                    servers=redact(self.settings.urls),
                    error=str(exc) or type(exc).__name__,
                    retry_in_s=round(backoff.delay, 2),
                )
                if await backoff.wait(stop):
                    raise Unavailable("stopped before NATS was reachable") from exc
                continue
            self.nc = nc
            self.metrics.nats_connected.set(1)
            log.info(
                "NATS connected",
                server=redact(f"//{nc.connected_url.netloc}")[2:] if nc.connected_url else "",
            )
            return nc

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, SlowConsumerError):
            # One per message dropped: counted, logged once per burst.
            self.metrics.slow_consumer_drops.inc()
            now = time.monotonic()
            if now - self._slow_logged < 10:
                return
            self._slow_logged = now
        log.warning("NATS error", error=str(exc) or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        self.metrics.nats_connected.set(0)
        if not self._draining:
            log.warning("NATS disconnected")

    async def _on_reconnected(self) -> None:
        self.metrics.nats_connected.set(1)
        self.metrics.nats_reconnects.inc()
        nc = self.nc
        log.info(
            "NATS reconnected",
            server=redact(f"//{nc.connected_url.netloc}")[2:] if nc and nc.connected_url else "",
        )

    async def drain(self, timeout: float) -> None:
        nc, self.nc = self.nc, None
        if nc is None or nc.is_closed:
            return
        self._draining = True
        try:
            await asyncio.wait_for(nc.drain(), timeout * 0.7)
        except (TimeoutError, NatsError) as exc:
            log.warning("NATS drain incomplete, closing", error=str(exc) or type(exc).__name__)
            # Closing a connection that is reconnecting can fail on the dead socket too, and a
            # stalled socket must not hang us.
            with contextlib.suppress(NatsError, OSError, TimeoutError):
                await asyncio.wait_for(nc.close(), timeout * 0.3)
        self.metrics.nats_connected.set(0)


async def subscribed(nc: NATS, timeout: float = 10.0) -> None:
    """Return once the server has read everything this client sent before the call: its
    new subscriptions are in place, its publishes delivered.

    nats-py's `flush()` writes its PING straight to the socket, ahead of commands still
    waiting in the client's pending buffer (a SUB just made is there), so a lone `flush()`
    can return before the server has seen the subscription. A PING sent while that buffer
    is empty follows everything before it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        clean = nc.pending_data_size == 0
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError("the NATS server did not confirm this client's commands in time")
        await nc.flush(max(1, int(remaining)))
        if clean:
            return
