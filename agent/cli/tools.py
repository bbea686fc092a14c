"""The operator's read and call tools on the bus: `events`, `history`, `call`, `hosts`, `ps`,
`forget`, `hub-sync`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from agent.cli.base import (
    EXIT_BAD_SETTINGS,
    EXIT_FAILED,
    EXIT_OK,
    bus_args,
    bus_target,
    command,
    host_id,
    on_bus,
    parse_call_args,
    positive_int,
    seconds,
)
from agent.errors import SettingsError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

    from agent.bus import BusTarget


def add_parsers(sub: Any) -> None:
    """The operator's read and call subcommands: events, history, call, hosts."""
    ev = command(sub, "events", help="tail events from the bus")
    bus_args(ev)
    ev.add_argument("--host", type=host_id, help="only this host id")
    ev.add_argument("--domain", help="only this domain (name or UUID)")
    ev.add_argument("--type", dest="etype", help="only this event type, e.g. lifecycle")
    ev.add_argument("--json", action="store_true", help="print each CloudEvent as raw JSON")
    ev.add_argument("--count", type=positive_int, help="exit after this many events")
    ev.add_argument(
        "--since",
        help="replay stored events from then: 90s, 30m, 2h, 7d ago or an "
        "ISO 8601 time (2026-11-30T10:00Z)",
    )
    ev.add_argument("--last", type=positive_int, help="replay the last N stored events")
    ev.add_argument(
        "--follow",
        action="store_true",
        help="with --since/--last: then go on with live events (no gap, no repeat)",
    )
    ev.add_argument("--reorder-s", type=seconds, default=1.0,
                    help="hold each event this long for earlier ones of its boot still on their "
                         "way, so output is in sequence order (0: print as received)")  # fmt: skip

    hi = command(sub, "history", help="one domain's timeline across hosts, from the streams")
    hi.add_argument("domain", help="name or UUID")
    hi.add_argument("--since", help="from then: 90s, 30m, 2h, 7d ago or an ISO 8601 time")
    hi.add_argument("--json", action="store_true", help="print each CloudEvent as raw JSON")
    bus_args(hi)

    call = command(sub, "call", help="send a command to a host's agent and print the reply")
    call.add_argument("host", type=host_id, help="host id")
    call.add_argument("verb", help="e.g. ping, capabilities, domain.list, domain.start")
    call.add_argument("args", nargs="*", help="one JSON object, or key=value pairs")
    bus_args(call)
    call.add_argument("--timeout", type=seconds, default=30.0, help="seconds to wait for the reply")
    call.add_argument("--json", action="store_true", help="the reply as one line of JSON")

    hosts = command(sub, "hosts", help="list the hosts registered in virt_hosts")
    bus_args(hosts)
    hosts.add_argument("--json", action="store_true", help="print the registrations as JSON")

    ps = command(sub, "ps", help="every domain's current state, from virt_domains")
    ps.add_argument("--host", type=host_id, help="only this host's domains")
    bus_args(ps)
    ps.add_argument("--json", action="store_true", help="a JSON list of the bucket's values")

    fg = command(sub, "forget", help="remove a host gone for good from virt_domains")
    fg.add_argument("host", type=host_id, help="host id")
    bus_args(fg)

    hub = command(
        sub,
        "hub-sync",
        help="leaf-node mode: make the hub's streams source every registered leaf host's",
    )
    bus_args(hub)
    hub.add_argument("--json", action="store_true", help="print the sources as JSON")


# ---------------------------------------------------------------- events


def cmd_events(args: argparse.Namespace) -> int:
    from agent.tail import tail  # noqa: PLC0415

    bus = bus_target(args)
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

    bus = bus_target(args)
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

    async def ask(nc: NATS, bus: BusTarget) -> Msg:
        subject = bus.subjects(args.host).cmd(args.verb)
        return await request(nc, args.host, subject, msgspec.json.encode(body), args.timeout)

    msg = on_bus(args, "call", ask)
    reply = msgspec.json.decode(msg.data)
    print(msg.data.decode() if args.json else msgspec.json.format(msg.data, indent=2).decode())
    return EXIT_OK if isinstance(reply, dict) and reply.get("ok") else EXIT_FAILED


def cmd_hosts(args: argparse.Namespace) -> int:
    import nats  # noqa: PLC0415

    from agent.registry import BUCKET, Registration, Registry  # noqa: PLC0415

    async def registered(nc: NATS, _: BusTarget) -> list[Registration]:
        js = nc.jetstream()
        try:
            kv = await js.key_value(BUCKET)
        except nats.js.errors.BucketNotFoundError:
            return []
        return await Registry(kv, js).hosts()

    regs = on_bus(args, "hosts", registered)
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


def cmd_ps(args: argparse.Namespace) -> int:
    from agent import current_state  # noqa: PLC0415

    states = on_bus(
        args, "ps", lambda nc, _: current_state.read_all(nc.jetstream(), args.host or "")
    )
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(states), indent=2).decode())
        return EXIT_OK
    print(f"{'HOST':<20} {'NAME':<24} {'STATE':<12} {'REASON':<14} {'PERSISTENT':<10} "
          f"{'SINCE':<27} UUID")  # fmt: skip
    for st in states:
        print(f"{st.host:<20} {st.name:<24} {st.state:<12} {st.reason:<14} "
              f"{'yes' if st.persistent else 'no':<10} {st.time:<27} {st.uuid}")  # fmt: skip
    return EXIT_OK


def cmd_forget(args: argparse.Namespace) -> int:
    """Delete a host's keys from virt_domains: for a host gone for good (its agent, if it
    runs again, writes them again at its next resync)."""
    from agent import current_state  # noqa: PLC0415

    n = on_bus(args, "forget", lambda nc, _: current_state.forget(nc.jetstream(), args.host))
    print(f"{args.host}: {n} domain(s) forgotten")
    return EXIT_OK


def cmd_hub_sync(args: argparse.Namespace) -> int:
    from agent import hub  # noqa: PLC0415

    sources = on_bus(args, "hub-sync", lambda nc, bus: hub.sync(nc, bus.nats, bus.prefix))
    if args.json:
        print(json.dumps(sources))
    else:
        for stream, domains in sources.items():
            print(f"{stream:<12} sources {', '.join(domains) or 'no leaf host yet'}")
    return EXIT_OK
