"""`virt-agent run` (the agent, its signals and the shutdown's overdue timer), `check-config`
and `health`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import threading
from typing import Any

import msgspec
import structlog

from agent import logging as agent_logging
from agent import statedir
from agent.cli.base import (
    EXIT_BAD_SETTINGS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STATE_DIR_IN_USE,
    command,
    settings_args,
    settings_overrides,
)
from agent.embedded import NatsServer, start_embedded
from agent.errors import AgentError, SettingsError
from agent.settings import Settings
from agent.settings_load import load

# Past shutdown_grace_s by this much, a shutdown that has not ended is cut short.
SHUTDOWN_OVERDUE_S = 2.0


# Each subcommand's exit statuses, shown in its --help.


def add_parsers(sub: Any) -> None:
    """The subcommands of the agent's own host: run, check-config, health."""
    run = command(sub, "run", help="run the agent")
    settings_args(run)
    run.add_argument("--json", action="store_true", help="log as JSON lines (--log-format json)")

    chk = command(sub, "check-config", help="validate the settings and what they must reach")
    settings_args(chk)
    chk.add_argument(
        "--offline",
        action="store_true",
        help="the settings only; do not try libvirt, NATS, the state dir, HTTP",
    )
    chk.add_argument("--json", action="store_true", help="one JSON document: every check")

    hl = command(sub, "health", help="probe the running agent's /healthz (or /readyz)")
    settings_args(hl)
    hl.add_argument("--ready", action="store_true", help="probe /readyz instead of /healthz")
    hl.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    hl.add_argument("--json", action="store_true", help="one JSON document: url, status, body")


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.checkconfig import check  # noqa: PLC0415

    return check(args.config, settings_overrides(args), args.offline, args.json)


def cmd_health(args: argparse.Namespace) -> int:
    """GET /healthz or /readyz of the agent these settings describe; exit 0 on 200."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        listen = load(args.config, os.environ, settings_overrides(args)).settings.http.listen
    except SettingsError as exc:
        print(exc.message, file=sys.stderr)
        return EXIT_BAD_SETTINGS
    if not listen:
        print("http.listen is empty: the agent serves no health endpoint", file=sys.stderr)
        return EXIT_FAILED
    host, _, port = listen.rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)  # noqa: S104
    url = f"http://{host}:{port}/{'readyz' if args.ready else 'healthz'}"
    status, body = 0, ""
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            status, body = resp.status, resp.read().decode(errors="replace").strip()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read().decode(errors="replace").strip()
    except (OSError, TimeoutError) as exc:
        body = str(exc)
    ok = status == 200
    if args.json:
        print(msgspec.json.encode({"ok": ok, "url": url, "status": status, "body": body}).decode())
    elif ok:
        print(body)
    else:
        print(f"{url}: {status or ''} {body}".replace("  ", " "), file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_run(args: argparse.Namespace) -> int:
    try:
        overrides = settings_overrides(args)
        if args.json:
            overrides["log.format"] = "json"
        loaded = load(args.config, os.environ, overrides)
    except SettingsError as exc:
        print(f"virt-agent: {exc.message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    s = loaded.settings
    agent_logging.unbreakable_stdio()
    agent_logging.configure(s.log.level, s.log.format)
    log = structlog.get_logger("agent.cli")
    server: NatsServer | None = None
    try:
        held = statedir.lock(s.state_dir)  # before an embedded nats-server uses it
    except statedir.StateDirInUse as exc:
        log.error("agent not started", error=exc.message, **exc.details)  # noqa: TRY400
        return EXIT_STATE_DIR_IN_USE
    try:
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
        statedir.unlock(held)


async def _run_agent(settings: Settings) -> int:
    from agent.supervisor import Agent  # noqa: PLC0415 - keeps `virt-agent events` light

    agent = Agent(settings)
    # Long-lived start-up objects need no more collection; per-event objects are short-lived
    # and freed by reference counting, so the young generation can be collected less often.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    loop = asyncio.get_running_loop()
    overdue_after = settings.agent.shutdown_grace_s + SHUTDOWN_OVERDUE_S

    def on_signal(signum: int, _frame: object) -> None:
        # A Python-level handler rather than loop.add_signal_handler: asyncio delivers those
        # as bytes on its self-pipe, and a loop flooded with wake-ups from libvirt's threads
        # can find that pipe full and lose the signal. This runs in the main thread between
        # two bytecodes, whatever the pipe holds.
        loop.call_soon_threadsafe(agent.request_stop, signal.Signals(signum).name)
        _arm_overdue(overdue_after)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        await agent.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


_overdue: threading.Timer | None = None


def _arm_overdue(after: float) -> None:
    """The grace is a promise to the service manager: a shutdown still running `after` seconds
    from the signal ends the process (what could be kept is in the spool by then)."""
    global _overdue
    if _overdue is not None:
        return

    def overdue() -> None:
        sys.stderr.write(
            msgspec.json.encode(
                {"event": "shutdown overdue, exiting", "after_s": after, "level": "error"}
            ).decode()
            + "\n"
        )
        sys.stderr.flush()
        os._exit(EXIT_FAILED)

    _overdue = threading.Timer(after, overdue)
    _overdue.daemon = True
    _overdue.start()
