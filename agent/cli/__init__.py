"""The command line, `virt-agent`: run.py runs the agent (`run`, `check-config`, `health`),
tools.py holds the operator's bus tools (`events`, `history`, `call`, `hosts`, `ps`, `forget`,
`hub-sync`), operations.py the long operations followed with a progress display (`migrate`,
`drain`, `undrain`); base.py what they share (exit statuses, argument types, the settings
flags, the bus target)."""

from __future__ import annotations

import argparse
import sys

from agent import __version__
from agent.cli import operations, run, tools
from agent.cli.base import EXIT_BAD_SETTINGS, EXIT_FAILED
from agent.errors import AgentError, SettingsError

DESCRIPTION = (
    "virt-agent: libvirt's domain events out to NATS, commands in. `run` runs the agent; "
    "`events`, `history`, `call`, `hosts`, `ps`, `forget`, `hub-sync`, `migrate`, `drain` "
    "and `undrain` are the operator's tools on the bus; `check-config` and `health` check a "
    "host's agent."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virt-agent", description=DESCRIPTION)
    p.add_argument("--version", action="version", version=f"virt-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (run, tools, operations):
        module.add_parsers(sub)
    return p


COMMANDS = {
    "run": run.cmd_run, "check-config": run.cmd_check_config, "health": run.cmd_health,
    "events": tools.cmd_events, "history": tools.cmd_history, "call": tools.cmd_call,
    "hosts": tools.cmd_hosts, "ps": tools.cmd_ps, "forget": tools.cmd_forget,
    "hub-sync": tools.cmd_hub_sync, "migrate": operations.cmd_migrate,
    "drain": operations.cmd_drain, "undrain": operations.cmd_undrain,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SettingsError as exc:
        print(f"virt-agent {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    except AgentError as exc:
        print(f"virt-agent {args.command}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
