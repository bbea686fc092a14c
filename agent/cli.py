"""Command line: `virt-agent run` (the agent) and `virt-agent events` (tail the bus)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent import __version__
from agent import logging as agent_logging
from agent.embedded import NatsServer
from agent.errors import AgentError, SettingsError
from agent.settings import FLAGS, LoadedSettings, Settings, load

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
EMBEDDED_LIBVIRT_URI = "test:///default"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"virt-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", help="TOML settings file (default: $VIRT_AGENT_CONFIG)")
    run.add_argument("--libvirt-uri", help="libvirt connection URI")
    run.add_argument("--nats-url", action="append", help="NATS server URL (repeatable)")
    run.add_argument("--host-id", help="this host's id: one subject token")
    run.add_argument("--state-dir", help="directory for the agent's state")
    run.add_argument("--http-addr", help="host:port for health and metrics ('' disables)")
    run.add_argument("--log-level", help="debug, info, warning, error")
    run.add_argument("--log-format", help="auto, json or console")
    run.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="start a bundled nats-server; use test:///default unless a libvirt URI is given",
    )

    ev = sub.add_parser("events", help="tail events from the bus")
    ev.add_argument("--nats-url", action="append", help="NATS server URL (repeatable)")
    ev.add_argument("--prefix", default=None, help="subject prefix (default: virt)")
    ev.add_argument("--host", help="only this host id")
    ev.add_argument("--domain", help="only this domain (name or UUID)")
    ev.add_argument("--type", dest="etype", help="only this event type, e.g. lifecycle")
    ev.add_argument("--json", action="store_true", help="print each CloudEvent as raw JSON")
    ev.add_argument("--count", type=int, help="exit after this many events")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given as flags, keyed by setting (see agent.settings.FLAGS)."""
    return {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in FLAGS.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "events":
        return cmd_events(args)
    return EXIT_FAILED  # pragma: no cover - argparse enforces the choices


# ---------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    try:
        loaded = load(args.config, os.environ, _overrides(args))
    except SettingsError as exc:
        print(f"virt-agent: {exc.message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    s = loaded.settings
    agent_logging.configure(s.log.level, s.log.format)
    log = structlog.get_logger("agent.cli")
    server: NatsServer | None = None
    try:
        Path(s.state_dir).mkdir(parents=True, exist_ok=True)
        if s.embedded:
            s, server = start_embedded(loaded)
        return asyncio.run(_run_agent(s))
    except AgentError as exc:
        log.error("agent failed", error=exc.message, **exc.details)  # noqa: TRY400 - expected failure, no traceback
        return EXIT_FAILED
    except OSError as exc:
        # A port already in use, a state directory we may not write: say which, no traceback.
        log.error("agent failed", error=str(exc))  # noqa: TRY400
        return EXIT_FAILED
    finally:
        if server is not None:
            server.stop()


def start_embedded(loaded: LoadedSettings) -> tuple[Settings, NatsServer | None]:
    """Bundled nats-server in the state directory, test driver unless a URI was given."""
    s = loaded.settings
    lv = s.libvirt
    if not loaded.explicit("libvirt.uri"):
        lv = msgspec.structs.replace(lv, uri=EMBEDDED_LIBVIRT_URI)
    server = None
    nats_settings = s.nats
    if not loaded.explicit("nats.urls"):
        server = NatsServer(Path(s.state_dir) / "nats", port=s.nats.embedded_port).start()
        nats_settings = msgspec.structs.replace(s.nats, urls=[server.url])
    s = msgspec.structs.replace(s, libvirt=lv, nats=nats_settings)
    url = nats_settings.urls[0]
    print(
        f"virt-agent (embedded): NATS {url} (JetStream data in {s.state_dir}/nats), "
        f"libvirt {lv.uri}, host id {s.host_id}\n"
        f"  watch the events:   virt-agent events --nats-url {url}\n"
        f"  stored events:      stream VIRT_EVENTS, subjects {s.subject_prefix}.*.event.> "
        f"and {s.subject_prefix}.*.host.>",
        flush=True,
    )
    return s, server


async def _run_agent(settings: Settings) -> int:
    from agent.supervisor import Agent  # noqa: PLC0415 - keeps `virt-agent events` light

    agent = Agent(settings)
    # Long-lived start-up objects need no more collection; per-event objects are short-lived
    # and freed by reference counting, so the young generation can be collected less often.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop, sig.name)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return EXIT_OK


# ---------------------------------------------------------------- events


def cmd_events(args: argparse.Namespace) -> int:
    from agent.tail import tail  # noqa: PLC0415

    urls = args.nats_url or [
        u.strip()
        for u in os.environ.get("VIRT_AGENT_NATS_URLS", "nats://127.0.0.1:4222").split(",")
        if u.strip()
    ]
    prefix = args.prefix or os.environ.get("VIRT_AGENT_SUBJECT_PREFIX", "virt")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(
            tail(urls, prefix, args.host, args.domain, args.etype, args.json, limit=args.count)
        )
    return EXIT_OK
