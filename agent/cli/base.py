"""What every subcommand shares: exit statuses, argument types, the settings flags and the
bus target of the operator's tools."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from agent.settings import TOKEN_RE
from agent.settings_load import FLAGS, load

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from agent.bus import BusTarget

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_SETTINGS = 2
EXIT_STATE_DIR_IN_USE = 3  # another agent holds the state directory (as check-config's 3)
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


def command(sub: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand, its exit statuses in its --help."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, epilog=f"exit status: {EXITS[name]}", **kw
    )
    return parser


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
    return n


def seconds(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(x) or x < 0 or x > 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds from 0 to 86400")
    return x


def host_id(text: str) -> str:
    """One subject token: a wildcard or a dot would address other hosts, or none."""
    if not TOKEN_RE.match(text) or len(text) > 128:
        raise argparse.ArgumentTypeError(f"{text!r} is not a host id (one token [A-Za-z0-9_-]+)")
    return text


SPECIAL: dict[str, dict[str, Any]] = {
    "nats.urls": {"action": "append"},
    "embedded": {"action": "store_true", "default": None},
}


def settings_args(p: argparse.ArgumentParser) -> None:
    """The flags that override settings (agent.settings_load.FLAGS), for `run`, `check-config`
    and `health`; each flag's value lands under its setting's key."""
    p.add_argument("--config", help="TOML settings file (default: $VIRT_AGENT_CONFIG)")
    for key, (flag, text) in FLAGS.items():
        kw: dict[str, Any] = SPECIAL.get(key, {})
        if kw.get("action") != "store_true":
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        p.add_argument(flag, dest=key, help=text, **kw)


def bus_args(p: argparse.ArgumentParser) -> None:
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


def bus_target(args: argparse.Namespace) -> BusTarget:
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


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given as flags, keyed by setting (see agent.settings_load.FLAGS)."""
    return {key: getattr(args, key) for key in FLAGS}


def on_bus(args: argparse.Namespace, what: str, fn: Callable[[NATS, BusTarget], Awaitable[T]]) -> T:
    """`fn` with a connection to the bus these arguments name, closed after; its result."""
    target = bus_target(args)

    async def go() -> T:
        nc = await target.connect(f"virt-agent {what}")
        try:
            return await fn(nc, target)
        finally:
            await nc.close()

    return asyncio.run(go())
