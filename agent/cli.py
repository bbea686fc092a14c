"""Command line: `virt-agent run` (the agent), `events` (tail the bus), `call` (send a
command to a host's agent), `hosts` (the registered hosts), `migrate` (a live migration,
with failover if asked, followed with a progress bar), `check-config` and `health` (probe
a running agent, for container and orchestrator health checks)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from agent import __version__, statedir
from agent import logging as agent_logging
from agent.embedded import NatsServer
from agent.errors import AgentError, SettingsError
from agent.settings import FLAGS, TOKEN_RE, LoadedSettings, Settings, load

if TYPE_CHECKING:
    from agent.bus import BusTarget

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
EXIT_STATE_DIR_IN_USE = 3  # another agent holds the state directory (as check-config's 3)
EMBEDDED_LIBVIRT_URI = "test:///default"
# Past shutdown_grace_s by this much, a shutdown that has not ended is cut short.
SHUTDOWN_OVERDUE_S = 2.0


# Each subcommand's exit statuses, shown in its --help.
EXITS = {
    "run": "0 stopped in order; 1 failed (or shutdown overdue); 2 bad settings; "
           "3 the state directory is another agent's",
    "events": "0 done (--count reached, caught up, or interrupted); 1 NATS unreachable; "
              "2 bad arguments or settings",
    "history": "0 printed; 1 nothing stored for the domain, or NATS unreachable; 2 bad arguments",
    "call": "0 the reply is ok; 1 an error reply, no reply or NATS unreachable; 2 bad arguments",
    "hosts": "0 listed; 1 NATS unreachable; 2 bad settings",
    "ps": "0 listed; 1 NATS unreachable; 2 bad arguments or settings",
    "forget": "0 the host's keys deleted (or none there); 1 NATS unreachable or not "
              "permitted; 2 bad arguments or settings",
    "hub-sync": "0 every registered leaf host is a source; 1 a hub stream takes subjects "
                "itself, or NATS unreachable; 2 bad settings",
    "migrate": "0 accepted (with --wait: succeeded); 1 refused, failed or unreachable; "
               "2 bad arguments",
    "drain": "0 accepted (with --follow: every domain moved; with --dry-run: every domain "
             "placed); 1 refused, failed, unplaced or unreachable; 2 bad arguments",
    "undrain": "0 the host is out of maintenance; 1 refused (its drain runs) or unreachable; "
               "2 bad arguments",
    "check-config": "0 all good; 2 a setting; 3 state directory; 4 libvirt; 5 NATS; 6 HTTP; "
                    "7 a fleet stream differs",
    "health": "0 the endpoint answered 200; 1 it did not (or no HTTP is configured); "
              "2 bad settings",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt-agent", description=__doc__)
    p.add_argument("--version", action="version", version=f"virt-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    real_add = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return real_add(name, epilog=f"exit status: {EXITS[name]}", **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    _agent_parsers(sub)
    _bus_parsers(sub)
    _migrate_parser(sub)
    return p


def _agent_parsers(sub: Any) -> None:
    """The subcommands of the agent's own host: run, check-config, health."""
    run = sub.add_parser("run", help="run the agent")
    _settings_args(run)
    run.add_argument("--json", action="store_true", help="log as JSON lines (--log-format json)")

    chk = sub.add_parser("check-config", help="validate the settings and what they must reach")
    _settings_args(chk)
    chk.add_argument(
        "--offline",
        action="store_true",
        help="the settings only; do not try libvirt, NATS, the state dir, HTTP",
    )
    chk.add_argument("--json", action="store_true", help="one JSON document: every check")

    hl = sub.add_parser("health", help="probe the running agent's /healthz (or /readyz)")
    _settings_args(hl)
    hl.add_argument("--ready", action="store_true", help="probe /readyz instead of /healthz")
    hl.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    hl.add_argument("--json", action="store_true", help="one JSON document: url, status, body")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return n


def _seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(x) or x < 0 or x > 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds from 0 to 86400")
    return x


def _host_id(text: str) -> str:
    """One subject token: a wildcard or a dot would address other hosts, or none."""
    if not TOKEN_RE.match(text) or len(text) > 128:
        raise argparse.ArgumentTypeError(f"{text!r} is not a host id (one token [A-Za-z0-9_-]+)")
    return text


def _bus_parsers(sub: Any) -> None:
    """The operator's read and call subcommands: events, history, call, hosts."""
    ev = sub.add_parser("events", help="tail events from the bus")
    _bus_args(ev)
    ev.add_argument("--host", type=_host_id, help="only this host id")
    ev.add_argument("--domain", help="only this domain (name or UUID)")
    ev.add_argument("--type", dest="etype", help="only this event type, e.g. lifecycle")
    ev.add_argument("--json", action="store_true", help="print each CloudEvent as raw JSON")
    ev.add_argument("--count", type=_positive_int, help="exit after this many events")
    ev.add_argument(
        "--since",
        help="replay stored events from then: 90s, 30m, 2h, 7d ago or an "
        "ISO 8601 time (2026-11-30T10:00Z)",
    )
    ev.add_argument("--last", type=_positive_int, help="replay the last N stored events")
    ev.add_argument(
        "--follow",
        action="store_true",
        help="with --since/--last: then go on with live events (no gap, no repeat)",
    )
    ev.add_argument("--reorder-s", type=_seconds, default=1.0,
                    help="hold each event this long for earlier ones of its boot still on their "
                         "way, so output is in sequence order (0: print as received)")  # fmt: skip

    hi = sub.add_parser("history", help="one domain's timeline across hosts, from the streams")
    hi.add_argument("domain", help="name or UUID")
    hi.add_argument("--since", help="from then: 90s, 30m, 2h, 7d ago or an ISO 8601 time")
    hi.add_argument("--json", action="store_true", help="print each CloudEvent as raw JSON")
    _bus_args(hi)

    call = sub.add_parser("call", help="send a command to a host's agent and print the reply")
    call.add_argument("host", type=_host_id, help="host id")
    call.add_argument("verb", help="e.g. ping, capabilities, domain.list, domain.start")
    call.add_argument("args", nargs="*", help="one JSON object, or key=value pairs")
    _bus_args(call)
    call.add_argument(
        "--timeout", type=_seconds, default=30.0, help="seconds to wait for the reply"
    )
    call.add_argument("--json", action="store_true", help="the reply as one line of JSON")

    hosts = sub.add_parser("hosts", help="list the hosts registered in virt_hosts")
    _bus_args(hosts)
    hosts.add_argument("--json", action="store_true", help="print the registrations as JSON")

    ps = sub.add_parser("ps", help="every domain's current state, from virt_domains")
    ps.add_argument("--host", type=_host_id, help="only this host's domains")
    _bus_args(ps)
    ps.add_argument("--json", action="store_true", help="a JSON list of the bucket's values")

    fg = sub.add_parser("forget", help="remove a host gone for good from virt_domains")
    fg.add_argument("host", type=_host_id, help="host id")
    _bus_args(fg)

    hub = sub.add_parser(
        "hub-sync",
        help="leaf-node mode: make the hub's streams source every registered leaf host's",
    )
    _bus_args(hub)
    hub.add_argument("--json", action="store_true", help="print the sources as JSON")


def _migrate_parser(sub: Any) -> None:
    mig = sub.add_parser("migrate", help="live-migrate a domain between two hosts' agents")
    mig.add_argument("domain", help="domain name or UUID")
    mig.add_argument("--from", dest="source", type=_host_id, required=True,
                     help="the source host id")  # fmt: skip
    mig.add_argument("--to", dest="destination", type=_host_id, required=True,
                     help="the destination host id")  # fmt: skip
    mig.add_argument(
        "--failover",
        action="store_true",
        help="migrate_with_failover: unplug the passthrough primary, replug it there",
    )
    mig.add_argument("--mode", choices=["auto", "sequenced", "qemu"], help="failover mode")
    mig.add_argument("--primary", help="alias of the primary NIC (default: found)")
    mig.add_argument("--max-downtime-ms", type=int)
    mig.add_argument("--bandwidth-mib-s", type=int)
    mig.add_argument(
        "--postcopy",
        action="store_true",
        default=None,
        help="switch to post-copy if the migration stalls",
    )
    mig.add_argument("--timeout-s", type=float, help="abort the migration after this long")
    mig.add_argument("--wait", action="store_true", help="follow the operation to its end")
    mig.add_argument(
        "--json",
        action="store_true",
        help="the reply as JSON; with --wait, each operation event as a JSON line",
    )
    _bus_args(mig)

    dr = sub.add_parser("drain", help="empty a host for maintenance (host.drain)")
    dr.add_argument("host", type=_host_id, help="the host to drain")
    dr.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    dr.add_argument("--parallel", type=_positive_int, default=1,
                    help="migrations from the host at once")  # fmt: skip
    dr.add_argument(
        "--to",
        type=_host_id,
        action="append",
        help="a destination to use (repeatable; default every host that admits)",
    )
    dr.add_argument("--force", action="store_true",
                    help="move failover domains whose guest has no bond too")  # fmt: skip
    dr.add_argument("--follow", action="store_true", help="follow the drain to its end")
    dr.add_argument("--json", action="store_true", help="the reply, then each event, as JSON")
    _bus_args(dr)
    ud = sub.add_parser("undrain", help="end a host's maintenance (host.undrain)")
    ud.add_argument("host", type=_host_id)
    ud.add_argument("--json", action="store_true", help="the reply as JSON")
    _bus_args(ud)


def _settings_args(p: argparse.ArgumentParser) -> None:
    """The flags that override settings (agent.settings.FLAGS), for `run` and `check-config`."""
    p.add_argument("--config", help="TOML settings file (default: $VIRT_AGENT_CONFIG)")
    p.add_argument("--libvirt-uri", help="libvirt connection URI")
    p.add_argument("--nats-url", action="append", help="NATS server URL (repeatable)")
    p.add_argument("--host-id", help="this host's id: one subject token")
    p.add_argument("--state-dir", help="directory for the agent's state")
    p.add_argument("--http-addr", help="host:port for health and metrics ('' disables)")
    p.add_argument("--log-level", help="debug, info, warning, error")
    p.add_argument("--log-format", help="auto, json or console")
    p.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="start a bundled nats-server; use test:///default unless a libvirt URI is given",
    )


def _bus_args(p: argparse.ArgumentParser) -> None:
    """The bus settings of the operator's commands: the agent's own (config file, then
    VIRT_AGENT_* environment, then these flags) - TLS, creds, nkey, token, user and password
    included - so they work on a secured bus."""
    p.add_argument("--config", help="a settings file (its [nats] and subject_prefix are used)")
    p.add_argument("--nats-url", action="append", help="NATS server URL (repeatable)")
    p.add_argument("--prefix", default=None, help="subject prefix (default: virt)")
    p.add_argument(
        "--inbox-prefix",
        default=None,
        help="where replies come; a secured bus may allow only yours (e.g. _INBOX_controller);"
        " default nats.inbox_prefix, else _INBOX",
    )


def _bus(args: argparse.Namespace) -> BusTarget:
    """Raises SettingsError for a bad setting (main says which)."""
    from agent.bus import BusTarget, connect_options  # noqa: PLC0415

    overrides: dict[str, Any] = {}
    if args.nats_url:
        overrides["nats.urls"] = args.nats_url
    if args.prefix:
        overrides["subject_prefix"] = args.prefix
    if args.inbox_prefix:
        overrides["nats.inbox_prefix"] = args.inbox_prefix
    s = load(args.config, os.environ, overrides).settings
    options = connect_options(s.nats, s.host_id)
    if not s.nats.inbox_prefix:
        options["inbox_prefix"] = "_INBOX"  # a person's tool: NATS's own default
    return BusTarget(s.nats.urls, s.subject_prefix, options, s.nats)


def parse_call_args(args: list[str]) -> dict[str, Any]:
    """`{"a": 1}` as it is, or `a=1 b=text` with each value read as JSON when it parses."""
    if len(args) == 1 and args[0].lstrip().startswith("{"):
        body = msgspec.json.decode(args[0])
        if not isinstance(body, dict):
            raise ValueError("the request must be a JSON object")
        return body
    out: dict[str, Any] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {arg!r}")
        try:
            out[key] = msgspec.json.decode(value)
        except msgspec.DecodeError:
            out[key] = value
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given as flags, keyed by setting (see agent.settings.FLAGS)."""
    return {key: getattr(args, flag[2:].replace("-", "_")) for key, flag in FLAGS.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {
        "run": cmd_run,
        "events": cmd_events,
        "history": cmd_history,
        "call": cmd_call,
        "hosts": cmd_hosts,
        "ps": cmd_ps,
        "forget": cmd_forget,
        "hub-sync": cmd_hub_sync,
        "migrate": cmd_migrate,
        "drain": cmd_drain,
        "undrain": cmd_undrain,
        "check-config": cmd_check_config,
        "health": cmd_health,
    }
    try:
        return commands[args.command](args)
    except SettingsError as exc:
        print(f"virt-agent {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except AgentError as exc:
        print(f"virt-agent {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED


def cmd_check_config(args: argparse.Namespace) -> int:
    from agent.checkconfig import check  # noqa: PLC0415

    return check(args.config, _overrides(args), args.offline, args.json)


def cmd_health(args: argparse.Namespace) -> int:
    """GET /healthz or /readyz of the agent these settings describe; exit 0 on 200."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        listen = load(args.config, os.environ, _overrides(args)).settings.http.listen
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


# ---------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    try:
        overrides = _overrides(args)
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


def start_embedded(loaded: LoadedSettings) -> tuple[Settings, NatsServer | None]:
    """Bundled nats-server in the state directory, test driver unless a URI was given."""
    s = loaded.settings
    lv = s.libvirt
    if not loaded.explicit("libvirt.uri"):
        lv = msgspec.structs.replace(lv, uri=EMBEDDED_LIBVIRT_URI)
    server = None
    nats_settings = s.nats
    if not loaded.explicit("nats.urls"):
        store = Path(s.state_dir) / "nats"
        leaf = leaf_config(s, store) if s.nats.leaf_remotes else None
        server = NatsServer(store, port=s.nats.embedded_port, die_with_parent=True,
                            config_file=leaf)  # fmt: skip
        # This process holds the state directory: a server on its store is a stale one.
        stale = server.stop_stale()
        if stale is not None:
            structlog.get_logger("agent.cli").warning(
                "stale bundled nats-server of this state directory stopped", pid=stale
            )
        server.start()
        nats_settings = msgspec.structs.replace(s.nats, urls=[server.url])
    s = msgspec.structs.replace(s, libvirt=lv, nats=nats_settings)
    url = nats_settings.urls[0]
    where = f"JetStream data in {s.state_dir}/nats" if server else "configured, not embedded"
    print(
        f"virt-agent (embedded): NATS {url} ({where}), libvirt {lv.uri}, host id {s.host_id}\n"
        f"  watch the events:   virt-agent events --nats-url {url}\n"
        f"  stored events:      stream VIRT_EVENTS, subjects {s.subject_prefix}.*.event.> "
        f"and {s.subject_prefix}.*.host.>",
        flush=True,
    )
    return s, server


def leaf_config(s: Settings, store: Path) -> Path:
    """The bundled server as a leaf node of the hub: this host's id as its server name and
    JetStream domain (the hub's streams source from `$JS.<host>.API`)."""
    remote: dict[str, Any] = {"urls": s.nats.leaf_remotes}
    if s.nats.leaf_creds_file:
        remote["credentials"] = s.nats.leaf_creds_file
    conf = {"server_name": s.host_id, "jetstream": {"domain": s.host_id},
            "leafnodes": {"remotes": [remote]}}  # fmt: skip
    store.mkdir(parents=True, exist_ok=True)
    path = store / "leaf.conf"
    path.write_text(json.dumps(conf, indent=2) + "\n")  # nats-server reads JSON as well
    return path


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


# ---------------------------------------------------------------- events


def cmd_events(args: argparse.Namespace) -> int:
    from agent.tail import tail  # noqa: PLC0415

    bus = _bus(args)
    since = _since(args)
    replay = since is not None or args.last is not None
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(
            tail(
                bus,
                args.host,
                args.domain,
                args.etype,
                args.json,
                limit=args.count,
                reorder_s=args.reorder_s,
                since=since,
                last=args.last,
                follow=args.follow or not replay,
            )
        )
    return EXIT_OK


def _since(args: argparse.Namespace) -> datetime | None:
    """--since as a time; SettingsError (exit 2, saying what is accepted) if it is not one."""
    from agent.tail import parse_since  # noqa: PLC0415

    try:
        return parse_since(args.since) if args.since else None
    except ValueError:
        accepted = "a duration (90s, 30m, 2h, 7d) or an ISO 8601 time (2026-11-30T10:00Z)"
        raise SettingsError("--since", args.since, accepted, "command line") from None


def cmd_history(args: argparse.Namespace) -> int:
    from agent.history import history  # noqa: PLC0415

    bus = _bus(args)
    since = _since(args)
    return asyncio.run(history(bus, args.domain, args.json, since))


# ---------------------------------------------------------------- call and hosts


def cmd_call(args: argparse.Namespace) -> int:
    """Exit 0 when the reply is ok, 1 when it is an error, 2 for a bad invocation."""
    from agent.bus import request  # noqa: PLC0415

    try:
        body = parse_call_args(args.args)
    except (ValueError, msgspec.DecodeError) as exc:
        print(f"virt-agent call: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    bus = _bus(args)

    async def go() -> int:
        nc = await bus.connect("virt-agent call")
        try:
            subject = bus.subjects(args.host).cmd(args.verb)
            msg = await request(nc, args.host, subject, msgspec.json.encode(body), args.timeout)
        finally:
            await nc.close()
        reply = msgspec.json.decode(msg.data)
        print(msg.data.decode() if args.json else msgspec.json.format(msg.data, indent=2).decode())
        return EXIT_OK if isinstance(reply, dict) and reply.get("ok") else EXIT_FAILED

    return asyncio.run(go())


def cmd_hosts(args: argparse.Namespace) -> int:
    import nats  # noqa: PLC0415

    from agent.registry import BUCKET, Registry  # noqa: PLC0415

    bus = _bus(args)

    async def go() -> int:
        nc = await bus.connect("virt-agent hosts")
        try:
            try:
                js = nc.jetstream()
                kv = await js.key_value(BUCKET)
            except nats.js.errors.BucketNotFoundError:
                regs = []
            else:
                regs = await Registry(kv, js).hosts()
        finally:
            await nc.close()
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(regs), indent=2).decode())
            return EXIT_OK
        print(f"{'HOST':<20} {'VERSION':<8} {'LIBVIRT':<8} {'FAILOVER':<8} {'AGE':>6}  URI")
        now = time.time()
        for r in sorted(regs, key=lambda r: r.host):
            caps = r.capabilities
            lib = caps.libvirt_version if caps else "?"
            fo = "yes" if caps and caps.virtio_net_failover else "no"
            age = f"{now - r.updated:>5.0f}s"
            print(f"{r.host:<20} {r.version:<8} {lib:<8} {fo:<8} {age}  {r.libvirt_uri}")
        return EXIT_OK

    return asyncio.run(go())


def cmd_ps(args: argparse.Namespace) -> int:
    from agent import current_state  # noqa: PLC0415

    bus = _bus(args)

    async def go() -> int:
        nc = await bus.connect("virt-agent ps")
        try:
            states = await current_state.read_all(nc.jetstream(), args.host or "")
        finally:
            await nc.close()
        if args.json:
            print(msgspec.json.format(msgspec.json.encode(states), indent=2).decode())
            return EXIT_OK
        print(f"{'HOST':<20} {'NAME':<24} {'STATE':<12} {'REASON':<14} {'PERSISTENT':<10} "
              f"{'SINCE':<27} UUID")  # fmt: skip
        for st in states:
            print(f"{st.host:<20} {st.name:<24} {st.state:<12} {st.reason:<14} "
                  f"{'yes' if st.persistent else 'no':<10} {st.time:<27} {st.uuid}")  # fmt: skip
        return EXIT_OK

    return asyncio.run(go())


def cmd_forget(args: argparse.Namespace) -> int:
    """Delete a host's keys from virt_domains: for a host gone for good (its agent, if it
    runs again, writes them again at its next resync)."""
    from agent import current_state  # noqa: PLC0415

    bus = _bus(args)

    async def go() -> int:
        nc = await bus.connect("virt-agent forget")
        try:
            n = await current_state.forget(nc.jetstream(), args.host)
        finally:
            await nc.close()
        print(f"{args.host}: {n} domain(s) forgotten")
        return EXIT_OK

    return asyncio.run(go())


def cmd_hub_sync(args: argparse.Namespace) -> int:
    from agent import hub  # noqa: PLC0415

    bus = _bus(args)

    async def go() -> int:
        nc = await bus.connect("virt-agent hub-sync")
        try:
            sources = await hub.sync(nc, bus.nats, bus.prefix)
        finally:
            await nc.close()
        if args.json:
            print(json.dumps(sources))
        else:
            for stream, domains in sources.items():
                print(f"{stream:<12} sources {', '.join(domains) or 'no leaf host yet'}")
        return EXIT_OK

    return asyncio.run(go())


def json_lines(op: dict[str, Any]) -> None:
    """An operation's every update as one JSON line (`migrate --wait --json`)."""
    print(msgspec.json.encode(op).decode(), flush=True)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Exit 0 when the migration was accepted (or, with --wait, succeeded), else 1."""
    verb = "migrate_with_failover" if args.failover else "migrate"
    body: dict[str, Any] = {"domain": args.domain, "destination": args.destination}
    for key in ("mode", "primary", "max_downtime_ms", "bandwidth_mib_s", "postcopy", "timeout_s"):
        value = getattr(args, key)
        if value is not None:
            if key in ("mode", "primary") and not args.failover:
                print(f"virt-agent migrate: --{key} needs --failover", file=sys.stderr)
                return EXIT_BAD_SETTINGS
            body[key] = value
    title = f"{verb} {args.domain} {args.source} → {args.destination}"
    return _long_operation(args, "migrate", args.source, verb, body, title, args.wait)


def cmd_drain(args: argparse.Namespace) -> int:
    """Exit 0 when the drain was accepted (with --follow: every domain moved; with --dry-run:
    the plan places every domain), else 1."""
    body: dict[str, Any] = {"max_parallel": args.parallel, "force": args.force}
    if args.to:
        body["destinations"] = args.to
    if args.dry_run:
        body["dry_run"] = True
    return _long_operation(args, "drain", args.host, "host.drain", body, f"drain {args.host}",
                           args.follow)  # fmt: skip


def cmd_undrain(args: argparse.Namespace) -> int:
    return _long_operation(args, "undrain", args.host, "host.undrain", {}, "", False)


def _print_plan(plan: list[dict[str, Any]], as_json: bool) -> int:
    if not as_json:
        for e in plan:
            where = e["destination"] or f"- ({e.get('reason', '')})"
            print(f"{e['domain']['name']:<24} {where}")
    return EXIT_OK if all(e["destination"] for e in plan) else EXIT_FAILED


def _long_operation(
    args: argparse.Namespace, name: str, host: str, verb: str, body: dict[str, Any], title: str,
    follow_it: bool,
) -> int:  # fmt: skip
    """Send `verb` to `host`'s agent; print the reply (a plan, or the operation started), then
    with `follow_it` the operation's progress to its end."""
    from agent.bus import request  # noqa: PLC0415
    from agent.envelope import error_reply  # noqa: PLC0415
    from agent.errors import from_reply  # noqa: PLC0415
    from agent.opwatch import follow, printer  # noqa: PLC0415

    bus = _bus(args)

    async def go() -> int:
        nc = await bus.connect(f"virt-agent {name}")
        try:
            try:
                msg = await request(nc, host, bus.subjects(host).cmd(verb),
                                    msgspec.json.encode(body), 30)  # fmt: skip
                result = from_reply(msg.data, host)  # the error families, as peers do
            except AgentError as exc:  # refused, or no agent there: said the same way
                if args.json:
                    print(error_reply(exc).decode(), flush=True)
                else:
                    print(f"virt-agent {name}: {exc.code}: {exc.message}", file=sys.stderr)
                return EXIT_FAILED
            if args.json:
                print(msg.data.decode(), flush=True)
            if "plan" in result:
                return _print_plan(result["plan"], args.json)
            op_id = result.get("operation_id")
            if op_id is None:
                if not args.json:
                    print(msgspec.json.encode(result).decode())
                return EXIT_OK
            mode = result.get("mode")
            if not args.json:
                print(f"{title}: operation {op_id}" + (f" (mode {mode})" if mode else ""),
                      flush=True)  # fmt: skip
            if not follow_it:
                return EXIT_OK
            show = json_lines if args.json else printer(sys.stdout, sys.stdout.isatty())
            op = await follow(nc, bus.subjects(host).op(op_id), show)
        finally:
            await nc.close()
        if not args.json:
            print(f"{op['state']}" + (f": {op['error']['message']}" if op.get("error") else ""))
        return EXIT_OK if op["state"] == "succeeded" else EXIT_FAILED

    return asyncio.run(go())
