"""The Containerfile, built and run with podman as docs/operations.md says: host networking,
libvirt through its UNIX socket mounted at /run/libvirt (here a real libvirtd serving the test
driver), the state directory as a volume. The image must answer on the bus, publish libvirt's
events, pass its own HEALTHCHECK, log JSON and stop cleanly on `podman stop`.

The base is Debian 12 made here with debootstrap (no container registry is reachable from
this machine), given the machine's extra CA certificates so pip reaches PyPI through the
site's TLS proxy - what a site's own base image carries. The runtime is runc with limits below
the machine's hard limits: crun refuses this machine's hybrid cgroup hierarchy, and the
sandbox may not raise a hard limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import libvirt
import nats
import pytest

from agent.bus import subscribed
from agent.embedded import NatsServer
from lab.daemon import LibvirtDaemon, free_port
from lab.prereqs import install_packages
from tests.support import ROOT
from tests.support.bus import Collector, call

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
BASE = "localhost/virt-agent-base:bookworm"
IMAGE = "localhost/virt-agent:test"
NAME = "virt-agent-test"
HOST = "ctr01"


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


def build_base() -> None:
    """Debian 12 minbase from the Debian mirror, plus the machine's local CA certificates."""
    if podman("image", "exists", BASE).returncode == 0:
        return
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(root),
                        "http://deb.debian.org/debian"], check=True, capture_output=True,
                       timeout=900)  # fmt: skip
        local_cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        if local_cas:
            dest = root / "usr/local/share/ca-certificates"
            dest.mkdir(parents=True, exist_ok=True)
            for ca in local_cas:
                shutil.copy(ca, dest)
            # update-ca-certificates (run when the build installs ca-certificates) adds them
            # to the bundle; pip uses the bundle rather than its own copy of certifi's.
            (root / "etc/pip.conf").write_text(
                "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
            )
        archive = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True)
        out = podman("import", "--change", 'CMD ["/bin/bash"]', str(archive), BASE, timeout=600)
        assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def image() -> str:
    if install_packages(["podman", "runc", "debootstrap"]) != 0:
        pytest.skip("podman, runc and debootstrap are needed (installed when run as root)")
    build_base()
    out = podman("build", "--format", "docker", "--network", "host", *LIMITS,
                 "--build-arg", f"BASE={BASE}", "-t", IMAGE, "-f", str(ROOT / "Containerfile"),
                 str(ROOT), timeout=1500)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return IMAGE


def run_container(image: str, nats_url: str, daemon: LibvirtDaemon, state: Path) -> str:
    """The agent's container as docs/operations.md runs it; returns its HTTP address."""
    podman("rm", "-f", NAME)
    http = f"127.0.0.1:{free_port()}"
    state.mkdir()
    out = podman(
        "run", "-d", "--name", NAME, "--network", "host", *LIMITS,
        "-v", f"{daemon.root / 'run'}:/run/libvirt",
        "-v", f"{state}:/var/lib/virt-agent",
        "-e", f"VIRT_AGENT_HOST_ID={HOST}",
        "-e", "VIRT_AGENT_LIBVIRT_URI=test+unix:///default",
        "-e", f"VIRT_AGENT_NATS_URLS={nats_url}",
        "-e", f"VIRT_AGENT_HTTP_LISTEN={http}",
        image,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return http


async def test_the_image_runs_the_agent_beside_libvirt_and_stops_cleanly(
    image: str, nats_server: NatsServer, test_daemon: LibvirtDaemon, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    seen = Collector()
    await nc.subscribe(f"virt.{HOST}.>", cb=seen.on_msg)
    await subscribed(nc)
    conn = libvirt.open(test_daemon.test_uri)
    try:
        await asyncio.to_thread(run_container, image, nats_server.url, test_daemon, tmp_path / "st")
        # It comes up through the mounted socket and announces itself on the bus.
        try:
            await seen.wait_for(lambda e: e.get("type") == "virt.host.agent_started", 60)
        except AssertionError:
            logs = podman("logs", NAME)
            raise AssertionError(
                f"the agent did not start: {(logs.stdout + logs.stderr)[-3000:]}"
            ) from None
        await seen.wait_for(lambda e: e.get("type") == "virt.host.libvirt_connected", 30)
        assert (await call(nc, HOST, "ping"))["ok"] is True
        # A command reaches the host's libvirtd and its event comes back out.
        dom = conn.lookupByName("test")
        reply = await call(nc, HOST, "domain.suspend", {"domain": "test"})
        assert reply["ok"] is True, reply
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        await seen.wait_for(lambda e: e.get("data", {}).get("event") == "suspended", 15)
        assert (await call(nc, HOST, "domain.resume", {"domain": "test"}))["ok"] is True
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
        await seen.wait_for(lambda e: e.get("data", {}).get("event") == "resumed", 15)

        # The image's HEALTHCHECK (virt-agent health) passes, and the agent is ready.
        health = await asyncio.to_thread(podman, "healthcheck", "run", NAME)
        assert health.returncode == 0, health.stdout + health.stderr
        ready = await asyncio.to_thread(
            podman, "exec", NAME, "/opt/virt-agent/bin/virt-agent", "health", "--ready"
        )
        assert ready.returncode == 0, ready.stdout + ready.stderr

        # podman stop sends SIGTERM: the agent says goodbye on the bus and exits 0.
        stop = await asyncio.to_thread(podman, "stop", "-t", "30", NAME)
        assert stop.returncode == 0, stop.stderr
        await seen.wait_for(lambda e: e.get("type") == "virt.host.agent_stopping")
        state = podman("inspect", "--format", "{{.State.ExitCode}}", NAME).stdout.strip()
        assert state == "0", podman("logs", NAME).stderr[-3000:]
        logs = podman("logs", NAME)
        lines = [ln for ln in (logs.stdout + logs.stderr).splitlines() if ln.startswith("{")]
        records = [json.loads(ln) for ln in lines]
        assert {"agent starting", "agent stopped"} <= {r["event"] for r in records}
        assert all(r["host"] == HOST for r in records if "host" in r)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName("test")
            if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
                dom.resume()
        conn.close()
        await nc.close()
        podman("rm", "-f", NAME)
