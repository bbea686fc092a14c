"""`virt-agent check-config`: validate the configuration and, unless --offline, what it must
reach - each check printed, the exit status naming the first that failed:

    0 all good            2 a setting is invalid     3 the state directory is not writable
    4 libvirt unreachable 5 NATS or JetStream unreachable   6 the HTTP address cannot be bound
    7 a fleet stream differs from these settings (or is missing while the operator manages them)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from agent.errors import SettingsError, redact
from agent.settings import NatsSettings, Settings
from agent.settings_load import load

EXIT = {"settings": 2, "state_dir": 3, "libvirt": 4, "nats": 5, "http": 6, "streams": 7}


def _state_dir(path: str) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path):
        pass
    return f"{path} writable"


def _libvirt(uri: str) -> str:
    import libvirt  # noqa: PLC0415

    conn = libvirt.open(uri)
    try:
        return f"{uri}: {conn.getType()} {conn.getLibVersion()}"
    finally:
        conn.close()


async def _connect(settings: NatsSettings, host: str) -> Any:
    import nats  # noqa: PLC0415

    from agent.bus import connect_options  # noqa: PLC0415

    urls, timeout = settings.urls, settings.connect_timeout_s
    return await asyncio.wait_for(
        nats.connect(servers=urls, connect_timeout=timeout, max_reconnect_attempts=0,
                     allow_reconnect=False, **connect_options(settings, host)),
        timeout * len(urls) + 1,
    )  # fmt: skip


async def _nats(settings: NatsSettings, host: str) -> str:
    nc = await _connect(settings, host)
    try:
        info = await nc.jetstream().account_info()
        server = redact(f"//{nc.connected_url.netloc}")[2:] if nc.connected_url else "?"
        return f"{server}: JetStream, {info.streams} streams"
    finally:
        await nc.close()


async def _streams(s: Settings) -> str:
    """The fleet's streams against these settings (an agent never changes them)."""
    from nats.js.errors import NotFoundError  # noqa: PLC0415

    from agent import batching  # noqa: PLC0415
    from agent.envelope import Subjects  # noqa: PLC0415
    from agent.metrics import Metrics  # noqa: PLC0415
    from agent.streams import EVENTS_STREAM, Streams, differences, stream_configs  # noqa: PLC0415

    nc = await _connect(s.nats, s.host_id)
    try:
        js = nc.jetstream()
        said, bad = [], []
        fleet = Streams(s.nats, Subjects(s.subject_prefix, s.host_id), Metrics(),
                        s.agent.registration_ttl_s)  # fmt: skip
        for cfg in stream_configs(s.nats, Subjects(s.subject_prefix, s.host_id)):
            assert cfg.name is not None
            try:
                have = (await js.stream_info(cfg.name)).config
            except NotFoundError:
                if s.nats.manage_streams:
                    said.append(f"{cfg.name} missing (the agent creates it)")
                else:
                    bad.append(f"{cfg.name} missing (nats.manage_streams is false)")
                continue
            fleet.compare(cfg.name, have, cfg)
            if (
                cfg.name == EVENTS_STREAM
                and batching.server_supports(nc)
                and not have.allow_batched
            ):
                said.append(f"warning: {cfg.name} has no allow_batched: each event is acknowledged "
                            "on its own (docs/operations.md, \"Fast-ingest batches\")")  # fmt: skip
            diff = differences(have, cfg)
            if not diff:
                said.append(f"{cfg.name} as these settings")
                continue
            text = ", ".join(
                f"{k} {v['stream']} (settings {v['settings']})" for k, v in diff.items()
            )
            (said if not s.nats.manage_streams else bad).append(f"{cfg.name} differs: {text}")
        # The registry bucket, and streams that take this host's command or inbox subjects:
        # what the agent reports in /readyz (`fleet_objects`).
        await fleet.check_bucket(nc)
        await fleet.check_captures(nc)
        for name, diff in fleet.mismatch.items():
            if diff and name not in [c.name for c in fleet.configs]:
                text = ", ".join(f"{k} {v['stream']} (settings {v['settings']})"
                                 for k, v in diff.items())  # fmt: skip
                said.append(f"{name} differs: {text}")
        bad += [f"{name.removeprefix('capture:')} is unsafe: {', '.join(why)}"
                for name, why in fleet.unsafe.items()]  # fmt: skip
        if bad:
            raise ValueError("; ".join(bad + said))
        return "; ".join(said)
    finally:
        await nc.close()


def _http(listen: str) -> str:
    if not listen:
        return "disabled"
    host, _, port = listen.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), int(port)))
    return f"{listen} free"


def check(
    config: str | None, overrides: dict[str, Any], offline: bool, as_json: bool = False
) -> int:
    results: list[dict[str, Any]] = []

    def line(name: str, ok: bool, text: str) -> None:
        results.append({"name": name, "ok": ok, "text": text})
        if not as_json:
            print(f"{'ok  ' if ok else 'FAIL'} {name:<10} {text}", flush=True)

    def done(code: int) -> int:
        if as_json:
            print(json.dumps({"ok": code == 0, "exit": code, "checks": results}), flush=True)
        return code

    try:
        s = load(config, os.environ, overrides).settings
    except SettingsError as exc:
        line("settings", False, exc.message)
        return done(EXIT["settings"])
    line("settings", True, f"host {s.host_id}, libvirt {s.libvirt.uri}, nats {redact(s.nats.urls)}")
    if offline:
        return done(0)
    checks: list[tuple[str, Any]] = [
        ("state_dir", lambda: _state_dir(s.state_dir)),
        ("libvirt", lambda: _libvirt(s.libvirt.uri)),
        ("nats", lambda: asyncio.run(_nats(s.nats, s.host_id))),
        ("streams", lambda: asyncio.run(_streams(s))),
        ("http", lambda: _http(s.http.listen)),
    ]
    for name, fn in checks:
        try:
            line(name, True, fn())
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
            line(name, False, redact(str(exc).strip() or type(exc).__name__))
            return done(EXIT[name])
    return done(0)
