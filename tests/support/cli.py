"""Running `virt-agent` subcommands as processes (check-config, the operator's tools)."""

from __future__ import annotations

import subprocess
import sys

from lab.agents import agent_env
from tests.support import ROOT


def cli(*args: str, timeout: float = 60, **env: str) -> tuple[int, str]:
    """`virt-agent <args>` with these environment settings; (exit status, output). A command
    still running at `timeout` (a tail) is stopped and reported as -1."""
    try:
        p = subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, env=agent_env(**env),
                           capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        err = exc.stderr or b""
        text = (out.decode() if isinstance(out, bytes) else out) + (
            err.decode() if isinstance(err, bytes) else err
        )
        return -1, text
    return p.returncode, p.stdout + p.stderr


def check(*args: str, **env: str) -> tuple[int, str]:
    full = agent_env(**env)
    p = subprocess.run([sys.executable, "-m", "agent", "check-config", *args], cwd=ROOT,
                       env=full, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    return p.returncode, p.stdout + p.stderr
