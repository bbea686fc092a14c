"""The current-state view's checker, shared by the suite and the fault campaign: what one
host's libvirt reports (every domain, active or defined: `virsh list --all`) against what the
`virt_domains` bucket holds for that host, read as a consumer reads it (nats-py's KeyValue)."""

from __future__ import annotations

from typing import Any

import libvirt
import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyDeletedError, KeyNotFoundError

# virDomainState, as `virsh domstate` names it.
STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
          6: "crashed", 7: "pmsuspended"}  # fmt: skip

View = dict[str, tuple[str, str, bool]]  # uuid -> name, state, persistent


def libvirt_view(uri: str) -> View:
    conn = libvirt.open(uri)
    try:
        out = {}
        for d in conn.listAllDomains(0):
            try:
                state = d.state()[0]
                out[d.UUIDString()] = (d.name(), STATES[state], bool(d.isPersistent()))
            except libvirt.libvirtError:
                continue  # gone meanwhile
        return out
    finally:
        conn.close()


async def bucket_view(nc: NATS, host: str) -> View:
    """Every live key `<host>.<uuid>` of virt_domains, through nats-py's own KeyValue."""
    try:
        kv = await nc.jetstream().key_value("virt_domains")
    except BucketNotFoundError:
        return {}
    out: View = {}
    try:
        names = await kv.keys()
    except Exception:  # nats-py: NoKeysError when empty
        return {}
    for key in names:
        if not key.startswith(f"{host}."):
            continue
        try:
            entry = await kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            continue
        v: dict[str, Any] = msgspec.json.decode(entry.value or b"{}")
        assert v["host"] == host, v
        assert key == f"{host}.{v['uuid']}", (key, v)
        assert set(v) == {"host", "uuid", "name", "state", "reason", "persistent", "time"}, v
        out[v["uuid"]] = (v["name"], v["state"], v["persistent"])
    return out


def differences(want: View, have: View) -> dict[str, Any]:
    """What the bucket has wrong against libvirt, per uuid (empty: equal)."""
    return {u: {"libvirt": want.get(u), "bucket": have.get(u)}
            for u in want.keys() | have.keys() if want.get(u) != have.get(u)}  # fmt: skip
