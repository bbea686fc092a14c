"""What a lab host needs from the machine: root, libvirt's binaries, and the users libvirtd
looks up before it reads its configuration."""

from __future__ import annotations

import os
import shutil
import subprocess

DEBIAN_PACKAGES = [
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "libvirt-dev",
    "qemu-system-x86",
    "qemu-utils",
    "busybox-static",
    "cpio",
    "iproute2",
    "pkg-config",
    "gcc",
    # promtool and prometheus: the alert rules are checked, unit-tested and shown firing in a
    # real Prometheus (tests/test_prometheus.py).
    "prometheus",
    # xmllint: libvirt's virt-xml-validate runs it (tests/test_failover_plan.py validates every
    # definition the agent makes); libvirt-clients only recommends it.
    "libxml2-utils",
]
INSTALL_COMMAND = "apt-get update && apt-get install -y " + " ".join(DEBIAN_PACKAGES)


class LabUnavailable(RuntimeError):
    """The machine cannot host the lab; the message says what to do."""


def ensure_host_ready() -> None:
    if os.geteuid() != 0:
        raise LabUnavailable("the lab needs root (mount namespaces, libvirtd)")
    missing = [b for b in ("libvirtd", "virtlogd", "unshare") if shutil.which(b) is None]
    if missing:
        raise LabUnavailable(f"missing {', '.join(missing)}; install with: {INSTALL_COMMAND}")
    # libvirtd refuses to start unless these exist (looked up before qemu.conf is read).
    for group in ("kvm", "libvirt-qemu"):
        subprocess.run(["groupadd", "-f", group], check=True)
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True, check=False).returncode != 0:
        subprocess.run(
            ["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "-d", "/var/lib/libvirt",
             "-s", "/usr/sbin/nologin", "libvirt-qemu"],
            check=True,
        )  # fmt: skip


def missing_packages(packages: list[str]) -> list[str]:
    out = []
    for pkg in packages:
        r = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in r.stdout:
            out.append(pkg)
    return out


def install_packages(packages: list[str] = DEBIAN_PACKAGES) -> int:
    """Install those of `packages` that are missing (as root), else print the command."""
    missing = missing_packages(packages)
    if not missing:
        return 0
    if os.geteuid() != 0:
        print(f"missing Debian packages: {' '.join(missing)}\n"
              f"run as root: apt-get update && apt-get install -y {' '.join(missing)}")  # fmt: skip
        return 1
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    return 0


if __name__ == "__main__":
    raise SystemExit(install_packages())
