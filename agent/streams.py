"""The contract's JetStream streams: fleet objects, created when missing, never rewritten.

VIRT_EVENTS and VIRT_OPS are shared by every host. An agent creates a stream that does not
exist (unless `nats.manage_streams` is false: then the operator does) and never changes one
that does: a host whose limits drifted would otherwise cut every host's history. A difference
between a stream and this agent's settings is reported instead (log, the
`virt_agent_stream_config_mismatch` gauge, `check-config`).

When JetStream answers a publish with no-responders (the stream was deleted, or NATS came back
with an empty store) the publisher asks for a check: a missing stream is created again, loudly
(`virt_agent_streams_recreated_total`), and `/readyz` is false while one is missing."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from agent import batching, current_state
from agent.envelope import Subjects
from agent.kv import STREAM_NAME_IN_USE
from agent.metrics import Metrics
from agent.registry import STREAM, bucket_config
from agent.settings import NatsSettings

log = structlog.get_logger("agent.streams")

EVENTS_STREAM = "VIRT_EVENTS"
OPS_STREAM = "VIRT_OPS"
# JetStream's error code for "stream name already in use with a different configuration".

# What an agent's settings say about a stream, compared with what the fleet's stream has.
COMPARED = ("subjects", "num_replicas", "max_bytes", "max_age", "duplicate_window", "storage",
            "retention", "discard")  # fmt: skip


def stream_configs(settings: NatsSettings, subjects: Subjects) -> list[StreamConfig]:
    """The fleet's streams, or in leaf-node mode (`hub_domain` set) this host's own."""
    own = bool(settings.hub_domain)
    common = {
        "retention": RetentionPolicy.LIMITS,
        "storage": StorageType.FILE,
        "discard": DiscardPolicy.OLD,
        "num_replicas": settings.stream_replicas,
        "duplicate_window": float(settings.duplicate_window_s),
        "max_age": float(settings.events_max_age_s),
        "max_bytes": settings.events_max_bytes,
    }
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            description="libvirt domain events and agent host events (virt-agent contract v1)",
            subjects=subjects.events_stream_subjects(own),
            **common,
        ),
        StreamConfig(
            name=OPS_STREAM,
            description="progress and outcome of long operations (virt-agent contract v1)",
            subjects=subjects.ops_stream_subjects(own),
            **common,
        ),
    ]


def differences(
    have: StreamConfig, want: StreamConfig, compared: tuple[str, ...] = COMPARED
) -> dict[str, dict[str, Any]]:
    """Field -> {"stream": what the fleet's stream has, "settings": what this agent's say}."""
    out: dict[str, dict[str, Any]] = {}
    for name in compared:
        a, b = getattr(have, name), getattr(want, name)
        if name == "subjects":
            a, b = sorted(a or []), sorted(b or [])
        elif isinstance(a, float) or isinstance(b, float):
            a, b = round(a or 0.0, 3), round(b or 0.0, 3)
        elif name == "allow_batched":
            a, b = bool(a), bool(b)
        elif name in ("max_bytes",):
            a, b = a if a is not None else -1, b if b is not None else -1
        if a != b:
            out[name] = {"stream": getattr(a, "value", a), "settings": getattr(b, "value", b)}
    return out


# Differences that let one host read or erase what is another's: the fleet object is not used
# as trustworthy (readiness false) until an operator puts it right.
UNSAFE = frozenset({"subjects", "allow_rollup_hdrs", "deny_purge", "deny_delete"})
BUCKET_COMPARED = ("subjects", "max_msgs_per_subject", "allow_rollup_hdrs", "deny_purge",
                   "deny_delete", "storage", "num_replicas")  # fmt: skip


class Streams:
    def __init__(
        self, settings: NatsSettings, subjects: Subjects, metrics: Metrics, bucket_ttl_s: float
    ) -> None:
        self.configs = stream_configs(settings, subjects)
        # The fleet's buckets (agent/registry.py, agent/current_state.py), by stream.
        self.buckets = {
            STREAM: bucket_config(bucket_ttl_s, settings.stream_replicas),
            current_state.STREAM: current_state.bucket_config(settings.stream_replicas),
        }
        self.hub_domain = settings.hub_domain
        # Subjects only this host's agent may receive on: no stream may take them.
        self.own_subjects = [
            subjects.cmd(">"),
            f"{settings.inbox_prefix or '_INBOX_' + subjects.host}.>",
        ]
        # Fleet object -> what makes it untrustworthy (an unsafe difference, or capturing
        # this host's own subjects); empty while all is well.
        self.unsafe: dict[str, list[str]] = {}
        self.manage = settings.manage_streams
        self.metrics = metrics
        self.present = False  # every stream exists (as of the last check)
        # Subjects JetStream said no stream takes (monotonic time it said so): a message
        # answered no-responders on one of them is refused for good. Any other no-responders
        # answer is a missing stream or one without a leader yet (a cluster recovering).
        self.unbound: dict[str, float] = {}
        self._asked: set[str] = set()
        self.check_requested = asyncio.Event()
        self.mismatch: dict[str, dict[str, dict[str, Any]]] = {}
        # VIRT_EVENTS takes fast-ingest batches (allow_batched, nats-server 2.14+): the
        # publisher batches only then (agent/batching.py).
        self.batched = False

    async def ensure(self, nc: NATS, *, startup: bool = False) -> bool:
        """Create what is missing (when managed), compare what exists; True if all exist."""
        js = nc.jetstream()
        missing = []
        batches = batching.server_supports(nc)
        for cfg in self.configs:
            assert cfg.name is not None
            if cfg.name == EVENTS_STREAM:
                cfg.allow_batched = True if batches else None
            try:
                info = await js.stream_info(cfg.name)
            except NotFoundError:
                if not self.manage:
                    missing.append(cfg.name)
                    continue
                try:
                    await js.add_stream(cfg)
                except BadRequestError as exc:
                    if exc.err_code != STREAM_NAME_IN_USE:
                        raise
                    continue  # another host created it meanwhile
                self.metrics.stream_config_mismatch.labels(cfg.name).set(0)
                if cfg.name == EVENTS_STREAM:
                    self.batched = bool(cfg.allow_batched)
                if startup:
                    log.info("stream created", stream=cfg.name)
                else:
                    log.error(  # noqa: TRY400 - inside the except, but not about it
                        "stream was missing (deleted, or NATS lost its store); created again",
                        stream=cfg.name,
                    )
                    self.metrics.streams_recreated.labels(cfg.name).inc()
                continue
            compared = COMPARED + (("allow_batched",) if cfg.allow_batched else ())
            self.compare(cfg.name, info.config, cfg, compared)
            if cfg.name == EVENTS_STREAM:
                self.batched = batches and bool(info.config.allow_batched)
        await self.check_bucket(nc)
        await self.check_captures(nc)
        self.present = not missing
        if missing:
            self.check_requested.set()  # the watch task looks again until they exist
            log.error("streams missing; nats.manage_streams is false, so the operator creates "
                      "them; messages wait", streams=missing)  # fmt: skip
        else:
            await self._look_up(js)
        return self.present

    def ask(self, subject: str) -> None:
        """A publish on `subject` was answered no-responders: does any stream take it?"""
        if len(self._asked) < 1024:
            self._asked.add(subject)
        self.check_requested.set()

    async def _look_up(self, js: Any) -> None:
        for subject in list(self._asked):
            try:
                await js.find_stream_name_by_subject(subject)
            except NotFoundError:
                self.unbound[subject] = time.monotonic()
            except (NatsError, OSError):
                continue  # asked again at the next check
            else:
                self.unbound.pop(subject, None)
            self._asked.discard(subject)
        while len(self.unbound) > 1024:
            del self.unbound[next(iter(self.unbound))]

    async def check_bucket(self, nc: NATS) -> None:
        """The buckets' streams, compared like the others (made by agent/registry.py and
        agent/current_state.py, in the hub's JetStream domain in leaf-node mode)."""
        js = nc.jetstream(domain=self.hub_domain or None)
        for name, want in self.buckets.items():
            try:
                info = await js.stream_info(name)
            except NotFoundError:
                continue  # made at the registration, at the first domain state
            self.compare(name, info.config, want, BUCKET_COMPARED)

    async def check_captures(self, nc: NATS) -> None:
        """Which streams take this host's command subjects or inbox: none should. One that
        does reads this host's commands and replies, and answers them with PubAcks."""
        names: set[str] = set()
        for subject in self.own_subjects:
            body = msgspec.json.encode({"subject": subject})
            msg = await nc.request("$JS.API.STREAM.NAMES", body, timeout=5)
            names.update(msgspec.json.decode(msg.data).get("streams") or [])
        for name in sorted(names | {n for n in self.unsafe if n.startswith("capture:")}):
            captures = name in names
            self.metrics.stream_captures_own_subjects.labels(name).set(1 if captures else 0)
            key = f"capture:{name}"
            if captures and key not in self.unsafe:
                log.error("a stream takes this host's command or inbox subjects: it reads them "
                          "and answers commands; an operator must delete it", stream=name,
                          subjects=self.own_subjects)  # fmt: skip
                self.unsafe[key] = ["captures " + " ".join(self.own_subjects)]
            elif not captures:
                self.unsafe.pop(key, None)

    def compare(
        self,
        name: str,
        have: StreamConfig,
        want: StreamConfig,
        compared: tuple[str, ...] = COMPARED,
    ) -> None:
        diff = differences(have, want, compared)
        unsafe = sorted(UNSAFE & diff.keys())
        if unsafe:
            self.unsafe[name] = unsafe
        else:
            self.unsafe.pop(name, None)
        if diff != self.mismatch.get(name, {}):
            if diff:
                log.warning("the fleet's stream differs from this agent's settings; left as it "
                            "is", stream=name, differences=diff)  # fmt: skip
            self.mismatch[name] = diff
        self.metrics.stream_config_mismatch.labels(name).set(1 if diff else 0)

    async def watch(self, nc: NATS) -> None:
        """Check again whenever the publisher asks; while a stream is missing, every 2 s."""
        while True:
            await self.check_requested.wait()
            self.check_requested.clear()
            try:
                ok = await self.ensure(nc)
            except (NatsError, OSError) as exc:
                log.warning("stream check failed, will retry", error=str(exc))
                ok = False
            if not ok:
                self.present = False
                await asyncio.sleep(2)
                self.check_requested.set()
            else:
                self.check_requested.clear()


async def read_stream(
    nc: NATS,
    stream: str,
    subject: str = ">",
    since: datetime | None = None,
    patience_s: float = 60.0,
) -> list[Msg]:
    """Everything `stream` holds on `subject` (from `since`), in stream order, through an
    ordered consumer; none if the stream does not exist. A cluster that just lost a node
    answers JetStream requests again once it has elected new leaders: asked again until
    then, within `patience_s`."""
    js = nc.jetstream()
    config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    if since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=since.astimezone(UTC).isoformat())  # fmt: skip
    deadline = time.monotonic() + patience_s
    while True:
        try:
            if (await js.stream_info(stream)).state.messages == 0:
                return []
            sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, config=config)
            break
        except NotFoundError:
            return []
        except NatsTimeoutError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    out: list[Msg] = []
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2.0)
            except TimeoutError:
                break  # nothing (more) under the filter
            out.append(msg)
            if msg.metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return out
