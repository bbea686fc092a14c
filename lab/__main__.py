"""`python -m lab up|down|status`: the lab for people (make lab-up / make lab-down)."""

from __future__ import annotations

import argparse
import json

from lab import network
from lab.lab import DEFAULT_ROOT, Lab


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab")
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--hosts", type=int, default=2)
    args = p.parse_args()
    lab = Lab(DEFAULT_ROOT, hosts=args.hosts)
    if args.command == "up":
        lab.up()
        for h in lab.hosts:
            print(f"host {h.name}: {h.uri}")
        print(f"accelerator: {lab.accel}; network: bridge {network.BRIDGE}")
        print(f'boot a guest: python -c "from lab.lab import Lab; ..."; state in {lab.root}')
    elif args.command == "down":
        lab.down()
        print("lab down")
    else:
        print(json.dumps(lab._load(), indent=2) if lab.state_file.exists() else "lab not running")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
