"""One lab "host": a libvirtd in a private mount namespace, with its own state and TCP port.

Several of these on one machine behave like separate hypervisors: each sees its own
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /etc/libvirt, has its
own host UUID, and is reached as qemu+tcp://127.0.0.1:<port>/system (or test+tcp://.../default
for the test driver it also serves). Needs root.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from agent.embedded import stop_process
from lab.prereqs import ensure_host_ready

BIND_TARGETS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "etc": "/etc/libvirt",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"libvirtd exited at start:\n{log.read_text(errors='replace')[-2000:]}"
            )
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.2)
            s.connect(("127.0.0.1", port))
            return
        time.sleep(0.05)
    raise RuntimeError(f"libvirtd did not listen on {port}; log {log}")


class LibvirtDaemon:
    def __init__(
        self,
        root: Path,
        name: str,
        tcp_port: int = 0,
        migration_ports: tuple[int, int] | None = None,
    ) -> None:
        self.root = Path(root) / name
        self.name = name
        self.tcp_port = tcp_port or free_port()
        self.migration_ports = migration_ports
        self.host_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"virt-agent-lab/{self.root}"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.root / "daemon.log"

    @property
    def qemu_uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"

    @property
    def test_uri(self) -> str:
        return f"test+tcp://127.0.0.1:{self.tcp_port}/default"

    def _dir(self, key: str) -> Path:
        return self.root / key

    def _layout(self) -> None:
        for key in BIND_TARGETS:
            self._dir(key).mkdir(parents=True, exist_ok=True)
        etc = self._dir("etc")
        (etc / "qemu").mkdir(exist_ok=True)
        # A fresh configuration of our own: no phantom domains from the machine's /etc/libvirt.
        (etc / "libvirtd.conf").write_text(
            "listen_tcp = 1\n"
            "listen_tls = 0\n"
            f'tcp_port = "{self.tcp_port}"\n'
            'listen_addr = "127.0.0.1"\n'
            'auth_tcp = "none"\n'
            'auth_unix_rw = "none"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            "max_clients = 5000\n"
            "max_queued_clients = 1000\n"
            "max_anonymous_clients = 1000\n"
            "max_client_requests = 50\n"
        )
        qemu = 'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n'
        if self.migration_ports:
            lo, hi = self.migration_ports
            qemu += f"migration_port_min = {lo}\nmigration_port_max = {hi}\n"
        (etc / "qemu.conf").write_text(qemu)
        (etc / "virtlogd.conf").write_text("")
        script = ["set -e"]
        for key, target in BIND_TARGETS.items():
            script.append(f"mount --bind {self._dir(key)} {target}")
        script += [
            "virtlogd -d -p /run/libvirt/virtlogd.pid -f /etc/libvirt/virtlogd.conf",
            "exec libvirtd --listen -p /run/libvirt/libvirtd.pid -f /etc/libvirt/libvirtd.conf",
        ]
        (self.root / "start.sh").write_text("\n".join(script) + "\n")

    def start(self, timeout: float = 30.0) -> LibvirtDaemon:
        ensure_host_ready()
        for target in BIND_TARGETS.values():
            Path(target).mkdir(parents=True, exist_ok=True)
        self._layout()
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", str(self.root / "start.sh")],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        (self.root / "libvirtd.pid").write_text(str(self.proc.pid))
        _wait_port(self.tcp_port, time.monotonic() + timeout, self.proc, self.log_file)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)
        kill_pidfile(self._dir("run") / "virtlogd.pid")

    def kill(self) -> None:
        """SIGKILL the daemon (a crash, for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> LibvirtDaemon:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def kill(pid: int | None, sig: int = signal.SIGTERM) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        kill(int(path.read_text().strip()))
