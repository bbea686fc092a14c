"""`virt-agent check-config`: each check printed, the exit status naming the first failure -
against a real nats-server, libvirt's test driver, a real socket in use."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.embedded import NatsServer
from lab.agents import agent_env
from lab.daemon import free_port
from tests.support import ROOT
from tests.support.agents import RunningAgent
from tests.support.cli import check


@pytest.fixture
def good(nats_server: NatsServer, tmp_path: Path) -> list[str]:
    return ["--libvirt-uri", "test:///default", "--nats-url", nats_server.url,
            "--state-dir", str(tmp_path / "st"), "--http-addr", f"127.0.0.1:{free_port()}"]  # fmt: skip


def test_a_good_configuration_passes_every_check(good: list[str]) -> None:
    code, out = check(*good)
    assert code == 0, out
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["ok", "settings"], ["ok", "state_dir"], ["ok", "libvirt"], ["ok", "nats"],
        ["ok", "streams"], ["ok", "http"],
    ]  # fmt: skip
    assert "JetStream" in out


def test_each_failure_has_its_exit_status(good: list[str], tmp_path: Path) -> None:
    def with_(flag: str, value: str) -> list[str]:
        args = list(good)
        args[args.index(flag) + 1] = value
        return args

    assert check(*with_("--nats-url", "bogus"))[0] == 2
    ro = tmp_path / "ro"
    ro.write_text("a file, not a directory")
    assert check(*with_("--state-dir", str(ro / "st")))[0] == 3
    assert check(*with_("--libvirt-uri", f"test+tcp://127.0.0.1:{free_port()}/default"))[0] == 4
    code, out = check(*with_("--nats-url", f"nats://127.0.0.1:{free_port()}"),
                      VIRT_AGENT_NATS_CONNECT_TIMEOUT_S="1")  # fmt: skip
    assert code == 5, out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out = check(*with_("--http-addr", f"127.0.0.1:{port}"))
    assert code == 6, out
    assert "FAIL http" in out


async def test_a_fleet_stream_that_differs_from_these_settings_is_reported(
    good: list[str], start_agent: Callable[..., Awaitable[RunningAgent]]
) -> None:
    """The streams exist (an agent made them); a host whose max_bytes drifted is told, with
    the stream's value and its own, and exit status 7; operator-managed streams only inform."""
    agent = await start_agent()
    await agent.settled()
    code, out = await asyncio.to_thread(check, *good)
    assert code == 0, out
    assert "VIRT_EVENTS as these settings" in out
    code, out = await asyncio.to_thread(check, *good, VIRT_AGENT_NATS_EVENTS_MAX_BYTES="20000")
    assert code == 7, out
    assert "FAIL streams" in out
    assert "VIRT_EVENTS differs: max_bytes -1 (settings 20000)" in out
    code, out = await asyncio.to_thread(check, *good, VIRT_AGENT_NATS_EVENTS_MAX_BYTES="20000",
                                        VIRT_AGENT_NATS_MANAGE_STREAMS="false")  # fmt: skip
    assert code == 0, out
    assert "VIRT_OPS differs: max_bytes -1 (settings 20000)" in out


def test_a_crash_point_from_the_environment_is_refused(good: list[str], tmp_path: Path) -> None:
    """VIRT_AGENT_TEST_EXIT_AT in a service's environment: check-config and run refuse it
    (exit 2, naming it), and the agent never starts, so it can never exit mid-migration."""
    code, out = check(*good, VIRT_AGENT_TEST_EXIT_AT="migrate")
    assert code == 2, out
    assert "VIRT_AGENT_TEST_EXIT_AT" in out
    assert "test harness" in out
    run = subprocess.run(
        [sys.executable, "-m", "agent", "run", *good], cwd=ROOT, capture_output=True, text=True,
        env=agent_env(VIRT_AGENT_TEST_EXIT_AT="migrate"), timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "VIRT_AGENT_TEST_EXIT_AT" in run.stderr


def test_offline_checks_only_the_settings() -> None:
    code, out = check("--offline", "--nats-url", f"nats://127.0.0.1:{free_port()}")
    assert code == 0, out
    assert out.splitlines()[-1].startswith("ok   settings")


async def test_health_probes_the_running_agent_at_its_http_address(
    start_agent: Callable[..., Awaitable[RunningAgent]],
) -> None:
    """`virt-agent health` (the container's HEALTHCHECK): 0 when /healthz or /readyz answers
    200 at http.listen (a wildcard address probed on loopback), 1 when nothing answers."""
    port = free_port()
    await start_agent(**{"http.listen": f"0.0.0.0:{port}"})

    def health(*args: str) -> tuple[int, str]:
        p = subprocess.run([sys.executable, "-m", "agent", "health", *args], cwd=ROOT,
                           env=agent_env(), capture_output=True, text=True, timeout=30,
                           check=False)  # fmt: skip
        return p.returncode, p.stdout + p.stderr

    for args in (
        ["--http-addr", f"0.0.0.0:{port}"],
        ["--http-addr", f"127.0.0.1:{port}", "--ready"],
    ):
        code, out = await asyncio.to_thread(health, *args)
        assert code == 0, out
    code, out = await asyncio.to_thread(health, "--http-addr", f"127.0.0.1:{free_port()}")
    assert code == 1
    assert "Connection refused" in out


def test_every_subcommand_speaks_json_and_documents_its_exit_statuses(
    good: list[str], nats_server: NatsServer
) -> None:
    """`--json` on every subcommand gives one JSON document (or JSON lines for streams), and
    each subcommand's help lists its exit statuses."""
    for sub in ("run", "events", "history", "call", "hosts", "migrate", "drain", "undrain",
                "check-config", "health"):  # fmt: skip
        p = subprocess.run([sys.executable, "-m", "agent", sub, "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert "--json" in p.stdout, sub
        assert "exit status" in p.stdout.lower(), sub
    code, out = check(*good, "--json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["ok"] is True
    assert [c["name"] for c in doc["checks"]] == [
        "settings", "state_dir", "libvirt", "nats", "streams", "http"]  # fmt: skip
    bogus = list(good)
    bogus[bogus.index("--nats-url") + 1] = "bogus"
    code, out = check(*bogus, "--json")
    assert code == 2
    assert json.loads(out)["checks"][0] == {"name": "settings", "ok": False,
                                            "text": json.loads(out)["checks"][0]["text"]}  # fmt: skip
    bus = ["--nats-url", nats_server.url]
    p = subprocess.run([sys.executable, "-m", "agent", "migrate", "vm1", "--from", "nohost",
                        "--to", "other", "--json", *bus], cwd=ROOT,
                       env=agent_env(), capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 1
    assert json.loads(p.stdout)["ok"] is False, p.stdout
    p = subprocess.run([sys.executable, "-m", "agent", "health", "--json", "--http-addr",
                        f"127.0.0.1:{free_port()}"], cwd=ROOT, env=agent_env(),
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 1
    assert json.loads(p.stdout)["ok"] is False
