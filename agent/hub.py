"""Leaf-node mode, the hub's side: the hub's VIRT_EVENTS and VIRT_OPS hold no subjects of
their own; each sources the same stream of every leaf host (`$JS.<domain>.API`), so a host cut
off from the hub keeps storing in its own domain and the hub catches up once, in order, when
the link is back. `virt-agent hub-sync` adds a source for every host registered with a
JetStream domain of its own; sources are never removed (a host whose registration lapsed
may come back, and a source added again would start over)."""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.api import ExternalStream, StreamConfig, StreamSource
from nats.js.errors import BucketNotFoundError, NotFoundError

from agent.envelope import Subjects
from agent.errors import Conflict
from agent.registry import BUCKET, Registry
from agent.settings import NatsSettings
from agent.streams import stream_configs


async def sync(nc: NATS, settings: NatsSettings, prefix: str) -> dict[str, list[str]]:
    """Make every leaf host a source of the hub's streams (creating them sources-only where
    missing); per stream, the domains it sources from now. Conflict if a hub stream takes
    subjects itself: then a leaf's events would be stored both directly and sourced."""
    js = nc.jetstream()
    try:
        regs = await Registry(await js.key_value(BUCKET), js).hosts()
    except BucketNotFoundError:
        regs = []
    domains = sorted({r.jetstream_domain for r in regs if r.jetstream_domain})
    out: dict[str, list[str]] = {}
    for want in stream_configs(settings, Subjects(prefix, "*")):
        assert want.name is not None
        try:
            have: StreamConfig | None = (await js.stream_info(want.name)).config
        except NotFoundError:
            have = None
        if have is not None and have.subjects:
            raise Conflict(
                f"the hub's {want.name} takes subjects {have.subjects}; in leaf-node mode it "
                "must only source the leaves' streams (else a leaf's messages are stored twice)",
                stream=want.name,
            )  # fmt: skip
        sources = list(have.sources or []) if have is not None else []
        known = {s.external.api for s in sources if s.external is not None and s.external.api}
        for d in domains:
            api = f"$JS.{d}.API"
            if api not in known:
                sources.append(StreamSource(name=want.name, external=ExternalStream(api=api)))
        if have is None:
            await js.add_stream(_sourced(want, sources))
        elif len(sources) != len(have.sources or []):
            await js.update_stream(_sourced(have, sources))
        out[want.name] = sorted(
            s.external.api.split(".")[1] for s in sources if s.external and s.external.api
        )
    return out


def _sourced(cfg: StreamConfig, sources: list[StreamSource]) -> StreamConfig:
    return cfg.evolve(subjects=None, sources=sources)
