"""Long operations from the command line: `migrate` (with failover if asked), `drain`,
`undrain`, each followed with a progress display."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec

from agent.cli.base import (
    EXIT_BAD_SETTINGS,
    EXIT_FAILED,
    EXIT_OK,
    bus_args,
    bus_target,
    command,
    host_id,
    positive_int,
)
from agent.envelope import OpState
from agent.errors import AgentError


def add_parsers(sub: Any) -> None:
    mig = command(sub, "migrate", help="live-migrate a domain between two hosts' agents")
    mig.add_argument("domain", help="domain name or UUID")
    mig.add_argument("--from", dest="source", type=host_id, required=True,
                     help="the source host id")  # fmt: skip
    mig.add_argument("--to", dest="destination", type=host_id, required=True,
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
    bus_args(mig)

    dr = command(sub, "drain", help="empty a host for maintenance (host.drain)")
    dr.add_argument("host", type=host_id, help="the host to drain")
    dr.add_argument("--dry-run", action="store_true", help="print the plan; change nothing")
    dr.add_argument("--parallel", type=positive_int, default=1,
                    help="migrations from the host at once")  # fmt: skip
    dr.add_argument(
        "--to",
        type=host_id,
        action="append",
        help="a destination to use (repeatable; default every host that admits)",
    )
    dr.add_argument("--force", action="store_true",
                    help="move failover domains whose guest has no bond too")  # fmt: skip
    dr.add_argument("--follow", action="store_true", help="follow the drain to its end")
    dr.add_argument("--json", action="store_true", help="the reply, then each event, as JSON")
    bus_args(dr)
    ud = command(sub, "undrain", help="end a host's maintenance (host.undrain)")
    ud.add_argument("host", type=host_id)
    ud.add_argument("--json", action="store_true", help="the reply as JSON")
    bus_args(ud)


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

    bus = bus_target(args)

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
        return EXIT_OK if op["state"] == OpState.SUCCEEDED else EXIT_FAILED

    return asyncio.run(go())
