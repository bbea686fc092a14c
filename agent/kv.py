"""The fleet's key-value buckets (`virt_hosts`, `virt_domains`) as the agent uses them:
opened without nats-py's checks, written through the JetStream domain they live in, listed
from the stream's subject counts."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

STREAM_NAME_IN_USE = 10058  # JetStream: "stream name already in use with a different configuration"


async def open_kv(nc: NATS, config: StreamConfig, bucket: str, domain: str = "") -> KeyValue:
    """The bucket whose stream is `config`, made if missing, in JetStream `domain` (empty:
    the connected server's). An existing one is used as it is: agent/streams.py reports how
    it differs."""
    js = nc.jetstream(domain=domain or None)
    try:
        info = await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        assert config.name is not None
        info = await js.stream_info(config.name)
    # Not js.key_value(): that refuses a stream unlike a bucket, and the agent must run on
    # (and say so) when someone made the stream otherwise.
    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js,
                    direct=bool(info.config.allow_direct))  # fmt: skip


def bucket_stream(bucket: str, description: str, replicas: int, **more: Any) -> StreamConfig:
    """A bucket's stream as the fleet makes it: a key-value bucket of history 1, without what
    lets one writer erase others' keys - no rollup headers (`Nats-Rollup: all` on one key
    wipes every key), no purge, no message deletes."""
    return StreamConfig(
        name=f"KV_{bucket}", description=description, subjects=[f"$KV.{bucket}.>"],
        max_msgs_per_subject=1, storage=StorageType.FILE, num_replicas=replicas,
        discard=DiscardPolicy.NEW, allow_direct=True, allow_rollup_hdrs=False,
        deny_delete=True, deny_purge=True, **more,
    )  # fmt: skip


def put_prefix(bucket: str, domain: str = "") -> str:
    """The subject prefix a key is written under: through the domain's API prefix when the
    bucket is in another JetStream domain (a leaf node writing into the hub's; nats-py's
    KeyValue does not do it)."""
    return f"$JS.{domain}.API.$KV.{bucket}." if domain else f"$KV.{bucket}."


async def keys(js: JetStreamContext, bucket: str, under: str = "") -> list[str]:
    """The keys of `bucket` (those starting with `under`, a whole-token prefix ending with
    a dot), deleted ones included until their marker is gone. From the stream's subject
    counts, not nats-py's `KeyValue.keys()`: that decides "no keys" from a consumer-info
    reply that can overtake the consumer's first message, and leaves a consumer on the
    server for five minutes per listing."""
    pre = f"$KV.{bucket}."
    try:
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{pre}{under}>")
    except NotFoundError:
        return []
    return sorted(s.removeprefix(pre) for s in info.state.subjects or {})
