"""The two-host (or N-host) QEMU lab: daemons, network, guest image, guests, teardown.

    python -m lab up [--hosts N]     start (idempotent; reuses a running lab)
    python -m lab down               stop everything the lab started, also after a crash
    python -m lab status

State lives under $VIRT_LAB_DIR (default /var/tmp/virt-agent-lab; not a VIRT_AGENT_* name,
which the agent reserves for its settings). `lab.json` there
records what runs, so `down` can clean up after an interrupted test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from lab import network
from lab.daemon import LibvirtDaemon, free_port, kill, kill_pidfile
from lab.guest import GuestImage
from lab.prereqs import ensure_host_ready, install_packages

DEFAULT_ROOT = Path(os.environ.get("VIRT_LAB_DIR", "/var/tmp/virt-agent-lab"))
HOST_NAMES = ["a", "b", "c", "d"]
READY_LINE = "LAB-READY"


# Fixed MACs per guest index: the primary and its standby share one.
def guest_mac(index: int) -> str:
    return f"52:54:00:1a:b0:{index + 1:02x}"


INTERFACE_BRIDGE = """<interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
      <model type='{model}'/>{extra}
      <alias name='{alias}'/>
    </interface>"""

DOMAIN = """<domain type='{accel}'{namespaces}>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet loglevel=4 panic=-1 lab.ip={ip} lab.gw={gw}{extra}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {interfaces}
    <serial type='file'>
      <source path='{serial}' append='on'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>{qemu}
</domain>"""

# QEMU-managed failover through libvirt (../shared/LAB.md): QEMU pairs the e1000e with the
# standby itself (failover_pair_id), unplugs it when a migration starts and plugs it back on
# the destination; its option ROM must be off, or the destination refuses the migration.
QEMU_NS = " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
QEMU_PAIRED = """
  <qemu:override>
    <qemu:device alias='ua-primary0'>
      <qemu:frontend>
        <qemu:property name='failover_pair_id' type='string' value='ua-backup0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>"""


def primary_interface_xml(mac: str, rom: bool = True) -> str:
    """The emulated e1000e that stands in for a VF: the failover primary."""
    return INTERFACE_BRIDGE.format(
        bridge=network.BRIDGE, mac=mac, model="e1000e", alias="ua-primary0",
        extra="" if rom else "\n      <rom enabled='no'/>",
    )  # fmt: skip


def standby_interface_xml(mac: str) -> str:
    return INTERFACE_BRIDGE.format(
        bridge=network.BRIDGE,
        mac=mac,
        model="virtio",
        extra="\n      <teaming type='persistent'/>",
        alias="ua-backup0",
    )


@dataclass
class Host:
    name: str
    daemon: LibvirtDaemon

    @property
    def uri(self) -> str:
        return self.daemon.qemu_uri

    def connect(self) -> Any:
        return libvirt.open(self.uri)


class Lab:
    def __init__(self, root: Path = DEFAULT_ROOT, hosts: int = 2) -> None:
        self.root = Path(root)
        self.n_hosts = hosts
        self.hosts: list[Host] = []
        self.image = GuestImage(self.root / "guest")
        # Built on first use only (it needs the kernel source): see lab/guest.py.
        self.images = {
            "stock": self.image,
            "standby-rx": GuestImage(self.root / "guest-standby-rx", "standby-rx"),
            "nobond": GuestImage(self.root / "guest-nobond", "nobond"),
        }
        self.serial_dir = self.root / "serial"
        self.state_file = self.root / "lab.json"
        self.accel = "qemu"

    # ------------------------------------------------------------ up / down

    def up(self) -> Lab:
        if install_packages() != 0:
            raise RuntimeError("the lab's Debian packages are missing (see the message above)")
        ensure_host_ready()
        self.down()  # whatever an interrupted run left behind
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.serial_dir, ignore_errors=True)
        self.serial_dir.mkdir()
        self.image.ensure()
        try:
            network.up()
        except subprocess.CalledProcessError as exc:
            # No quiet fallback to QEMU user networking: probes through slirp would pass
            # without the guests sharing a segment, and prove nothing about failover.
            network.down()
            raise RuntimeError(
                f"the lab network (bridge {network.BRIDGE}, gateway namespace {network.NETNS}) "
                f"could not be made: {' '.join(exc.cmd)}: {exc.stderr.strip()}"
            ) from None
        base = 49152
        for i in range(self.n_hosts):
            name = HOST_NAMES[i]
            ports = (base + 100 * i, base + 100 * i + 63)
            daemon = LibvirtDaemon(self.root / "hosts", name, free_port(), ports)
            daemon.start()
            # A run killed with its daemons left its guests' definitions in their state:
            # every host starts empty.
            self._destroy_all(daemon.qemu_uri)
            self.hosts.append(Host(name, daemon))
        self._save()
        self.accel = self._detect_accel()
        self._save()
        return self

    @contextlib.contextmanager
    def session(self) -> Iterator[Lab]:
        """Up for the `with` block, and down after it, also when bringing it up failed half
        way (the test suite's `lab` fixture and `make bench` share it)."""
        try:
            self.up()
            yield self
        finally:
            self.down()

    def remove_guests(self, names: Iterable[str]) -> list[str]:
        """Remove these guests from every host, then any other domain found there; the
        others' `host:name` (what should not have been left)."""
        names = set(names)
        left = []
        for h in self.hosts:
            conn = h.connect()
            try:
                for dom in conn.listAllDomains(0):
                    if dom.name() not in names:
                        left.append(f"{h.name}:{dom.name()}")
                    remove_domain(dom)
            finally:
                conn.close()
        return left

    def down(self) -> None:
        """Stop guests, daemons and the network - from memory or from lab.json."""
        state = self._load()
        for h in self.hosts:
            self._destroy_all(h.uri)
        for info in state.get("hosts", []):
            self._destroy_all(info["uri"])
        for h in self.hosts:
            h.daemon.stop()
        for info in state.get("hosts", []):
            kill(info.get("pid"))
            kill_pidfile(Path(info["root"]) / "run" / "virtlogd.pid")
        self._kill_stray_qemu()
        network.down()
        self.hosts = []
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def _destroy_all(self, uri: str) -> None:
        try:
            conn = libvirt.open(uri)
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains(0):
                remove_domain(dom)
        finally:
            conn.close()

    def _kill_stray_qemu(self) -> None:
        out = subprocess.run(
            ["pgrep", "-af", "qemu-system"], capture_output=True, text=True, check=False
        )
        for line in out.stdout.splitlines():
            pid, _, cmd = line.partition(" ")
            if str(self.root) in cmd:
                kill(int(pid), signal.SIGKILL)

    def _save(self) -> None:
        self.state_file.write_text(
            json.dumps(
                {
                    "accel": self.accel,
                    "hosts": [
                        {"name": h.name, "uri": h.uri, "root": str(h.daemon.root),
                         "pid": h.daemon.proc.pid if h.daemon.proc else None,
                         "port": h.daemon.tcp_port}
                        for h in self.hosts
                    ],
                },
                indent=2,
            )
        )  # fmt: skip

    def _load(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}

    # ------------------------------------------------------------ guests

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def serial_path(self, name: str) -> Path:
        return self.serial_dir / f"{name}.log"

    def domain_xml(
        self,
        name: str,
        kind: str = "failover",
        index: int = 0,
        accel: str | None = None,
        variant: str = "stock",
        dirty_mib: int = 0,
    ) -> str:
        """`failover`: virtio standby (teaming persistent) + e1000e primary, same MAC.
        `qemu-failover`: the same pair, QEMU pairing them itself (failover_pair_id): migrated
        with mode qemu, QEMU moves the primary. `virtio`: the standby alone. `primary`: the
        e1000e alone (no standby).
        `dirty_mib`: the guest keeps rewriting that much memory (a migration that converges
        slowly)."""
        mac = guest_mac(index)
        nics = [] if kind == "primary" else [standby_interface_xml(mac)]
        if kind in ("failover", "primary", "qemu-failover"):
            nics.append(primary_interface_xml(mac, rom=kind != "qemu-failover"))
        gw = network.GATEWAY
        ip = network.guest_address(index)
        image = self.images[variant].ensure()
        return DOMAIN.format(
            accel=accel or self.accel,
            name=name,
            kernel=image.kernel,
            initrd=image.initrd,
            ip=ip,
            gw=gw,
            extra=f" lab.dirty={dirty_mib}" if dirty_mib else "",
            interfaces="\n    ".join(nics),
            namespaces=QEMU_NS if kind == "qemu-failover" else "",
            qemu=QEMU_PAIRED if kind == "qemu-failover" else "",
            serial=self.serial_path(name),
        )

    def boot(
        self,
        host: str,
        name: str,
        kind: str = "failover",
        index: int = 0,
        timeout: float = 90.0,
        variant: str = "stock",
        dirty_mib: int = 0,
    ) -> Any:
        """Define and start a persistent guest; return its domain once the guest says LAB-READY."""
        conn = self.host(host).connect()
        serial = self.serial_path(name)
        with contextlib.suppress(FileNotFoundError):
            serial.unlink()
        dom = conn.defineXML(
            self.domain_xml(name, kind, index, variant=variant, dirty_mib=dirty_mib)
        )
        dom.create()
        wait_for_serial(serial, READY_LINE, timeout)
        return dom

    def _detect_accel(self) -> str:
        """KVM only if a guest really boots under it here; else TCG."""
        cached = self.root / "accel"
        if cached.exists():
            return cached.read_text().strip()
        accel = "qemu"
        if os.path.exists("/dev/kvm") and self.hosts:
            conn = self.hosts[0].connect()
            name = "lab-kvm-probe"
            serial = self.serial_path(name)
            try:
                dom = conn.createXML(self.domain_xml(name, "virtio", 9, accel="kvm"), 0)
                try:
                    wait_for_serial(serial, READY_LINE, 25)
                    accel = "kvm"
                except TimeoutError:
                    pass
                finally:
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.destroy()
            except libvirt.libvirtError:
                pass
            finally:
                conn.close()
        cached.write_text(accel + "\n")
        return accel


def remove_domain(dom: Any) -> None:
    """Stop a domain if it runs and forget it if it is defined; errors (already gone) ignored."""
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isPersistent():
            dom.undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            )


def wait_for_serial(path: Path, needle: str, timeout: float, after: int = 0) -> str:
    """Wait until `needle` appears in the serial log past byte `after`; return that text."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            text = path.read_bytes()[after:].decode(errors="replace")
            if needle in text:
                return text
        time.sleep(0.05)
    raise TimeoutError(f"{needle!r} not in {path} after {timeout}s")


PING_RE = re.compile(r"LAB-PING seq=(\d+) t=([\d.]+) (ok|lost)")


@dataclass(frozen=True)
class Probe:
    seq: int
    uptime: float
    ok: bool


def probes(text: str) -> list[Probe]:
    """The guest's ping probes in the text, in sequence order."""
    found = {int(m[1]): Probe(int(m[1]), float(m[2]), m[3] == "ok") for m in PING_RE.finditer(text)}
    return [found[k] for k in sorted(found)]


def lost_probes(text: str) -> int:
    return sum(1 for p in probes(text) if not p.ok)


def bond_members(text: str) -> list[list[str]]:
    """Every LAB-BOND report in the serial text: the members of the failover master."""
    out = []
    for line in text.splitlines():
        if line.startswith("LAB-BOND "):
            part = line.split("members=", 1)[1].split(" uptime=")[0]
            out.append(part.split())
    return out
