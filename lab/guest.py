"""The lab guest: Debian's kernel plus a busybox initramfs, built once and cached.

The init script loads the virtio and failover modules in order, brings the net_failover bond
up with a static address from the kernel command line, brings up hot-plugged NICs as udev
would, reports the bond's members whenever they change (`LAB-BOND ...`), and pings the
gateway every 50 ms, one line per probe (`LAB-PING seq=N t=UPTIME ok|lost`, lost after 1 s
without a reply) on the serial console, where tests read it.

Three variants. `stock`: Debian's modules as shipped. `nobond`: a guest whose virtio driver
never binds (virtio_net is not loaded: an old kernel or a Windows guest without its protocol
driver look the same to the host) - the failover feature is never negotiated, the primary
carries the address alone, and when a primary is plugged again the guest gives it the address
(so an outage can be measured). `standby-rx`: as stock, but net_failover
is rebuilt from the Debian kernel source of the very same version with one condition changed:
frames that arrive on the standby are dropped only while the primary can carry traffic
(running with carrier - the condition net_failover already uses to choose its transmit
device), instead of whenever a primary is registered. docs/lab.md shows why: with the stock
rule the guest drops its replies from the moment a re-plugged primary registers until its
link is up.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from lab.prereqs import install_packages

MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "e1000e",
]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec >/dev/console 2>&1
echo "LAB-BOOT uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in MODULES; do
  insmod /lib/modules/$m.ko || echo "LAB-INSMOD-FAIL $m"
done
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    lab.ip=*) IP="${arg#lab.ip=}" ;;
    lab.gw=*) GW="${arg#lab.gw=}" ;;
    lab.dirty=*) DIRTY="${arg#lab.dirty=}" ;;
  esac
done
if [ -n "$DIRTY" ]; then
  # Keep rewriting DIRTY MiB of memory: a migration must copy them again and again.
  mkdir -p /dirty && mount -t tmpfs -o size=$((DIRTY + 8))m tmpfs /dirty
  ( while true; do
      dd if=/dev/urandom of=/dirty/x bs=1M count="$DIRTY" conv=notrunc 2>/dev/null
    done ) &
fi
ip link set lo up
bond() {
  # The failover master is the netdev with lower devices; else the first ethernet device.
  for d in /sys/class/net/*; do
    ls -d "$d"/lower_* >/dev/null 2>&1 && { echo "${d##*/}"; return; }
  done
  for d in /sys/class/net/eth*; do echo "${d##*/}"; return; done
}
members() { ls -d /sys/class/net/$1/lower_* 2>/dev/null | sed 's,.*/lower_,,' | tr '\n' ' '; }
i=0
while [ $i -lt 50 ]; do
  M=$(bond); [ -n "$M" ] && ls -d /sys/class/net/$M/lower_* >/dev/null 2>&1 && break
  i=$((i+1)); usleep 100000
done
M=$(bond)
for d in /sys/class/net/eth*; do ip link set "${d##*/}" up; done
[ -n "$IP" ] && ip addr add "$IP" dev "$M"
[ -n "$GW" ] && ip route add default via "$GW"
echo "LAB-BOND master=$M members=$(members $M)"
echo "LAB-READY uptime=$(cut -d' ' -f1 /proc/uptime)"
(
  last="$(members $M)"
  while true; do
    for d in /sys/class/net/eth*; do
      grep -q up "$d/operstate" 2>/dev/null || ip link set "${d##*/}" up 2>/dev/null
    done
    now="$(members $M)"
    if [ "$now" != "$last" ]; then
      echo "LAB-BOND master=$M members=$now uptime=$(cut -d' ' -f1 /proc/uptime)"
      last="$now"
    fi
    usleep 100000
  done
) &
if [ -n "$GW" ]; then
  (
    n=0
    while true; do
      n=$((n+1))
      read up _ < /proc/uptime
      (
        if ping -c 1 -W 1 "$GW" >/dev/null 2>&1; then r=ok; else r=lost; fi
        echo "LAB-PING seq=$n t=$up $r"
      ) &
      usleep 50000
    done
  ) &
fi
while true; do sleep 3600; done
""".replace("MODULES", " ".join(MODULES))


def _run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, cwd=cwd).stdout


def kernel_package() -> str:
    """The exact name of the kernel package linux-image-amd64 points at (never a wildcard)."""
    for attempt in range(2):
        out = subprocess.run(
            ["apt-cache", "depends", "linux-image-amd64"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for raw in out.splitlines():
            line = raw.strip()
            if line.startswith("Depends: linux-image-") and line.endswith("-amd64"):
                return line.split()[-1]
        if attempt == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
    raise RuntimeError(
        "cannot find the Debian kernel package (apt-cache depends linux-image-amd64)"
    )


# The one change of the `standby-rx` variant, in net_failover_handle_frame().
STOCK_RULE = "\tif (primary_dev && skb->dev == standby_dev)\n"
STANDBY_RX_RULE = (
    "\tif (primary_dev && skb->dev == standby_dev &&\n\t    net_failover_xmit_ready(primary_dev))\n"
)
VARIANTS = ("stock", "standby-rx", "nobond")
# What `nobond` leaves out, and what it adds to the init script: an address for a re-plugged
# primary (the bond that would keep it does not exist in that guest).
NOBOND_SKIPS = "virtio_net"
NOBOND_READDRESS = r"""(
  while true; do
    if [ -n "$IP" ] && ! ip -o addr show 2>/dev/null | grep -q " ${IP%/*}/"; then
      N=$(bond)
      if [ -n "$N" ]; then
        ip link set "$N" up; ip addr add "$IP" dev "$N"; ip route add default via "$GW"
        echo "LAB-READDRESS dev=$N uptime=$(cut -d' ' -f1 /proc/uptime)"
      fi
    fi
    usleep 100000
  done
) &
"""
KEEP_RUNNING = "while true; do sleep 3600; done\n"


def init_script(variant: str) -> str:
    if variant != "nobond":
        return INIT
    return INIT.replace(KEEP_RUNNING, NOBOND_READDRESS + KEEP_RUNNING)


def build_standby_rx_module(work: Path, kernel_deb: Path) -> Path:
    """net_failover.ko from the Debian source of `kernel_deb`'s version, with STANDBY_RX_RULE,
    built against the matching headers package."""
    fields = _run("dpkg-deb", "-f", str(kernel_deb), "Package", "Version", "Source")
    info = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
    abi = info["Package"].removeprefix("linux-image-")  # 6.1.0-56-amd64
    version = info["Version"]  # 6.1.192-2
    series = ".".join(version.split(".")[:2])  # 6.1
    if install_packages([f"linux-headers-{abi}", "make"]) != 0:
        raise RuntimeError(f"building net_failover.ko needs linux-headers-{abi} and make (root)")
    _run("apt-get", "download", f"linux-source-{series}={version}", cwd=work)
    src_deb = next(work.glob(f"linux-source-{series}_*.deb"))
    member = f"linux-source-{series}/drivers/net/net_failover.c"
    _run("dpkg-deb", "-x", str(src_deb), str(work / "source"))
    tarball = work / "source" / "usr" / "src" / f"linux-source-{series}.tar.xz"
    _run("tar", "-xJf", str(tarball), member, cwd=work)
    mod = work / "net_failover"
    mod.mkdir()
    code = (work / member).read_text()
    if STOCK_RULE not in code:
        raise RuntimeError(f"net_failover.c of {version} does not have the expected rule")
    (mod / "net_failover.c").write_text(code.replace(STOCK_RULE, STANDBY_RX_RULE))
    (mod / "Makefile").write_text("obj-m := net_failover.o\n")
    _run("make", "-s", "-C", f"/usr/src/linux-headers-{abi}", f"M={mod}", "modules")
    return mod / "net_failover.ko"


class GuestImage:
    """vmlinuz + initrd.gz under `cache_dir`, built on first use."""

    def __init__(self, cache_dir: Path, variant: str = "stock") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown guest variant {variant!r}")
        self.dir = Path(cache_dir)
        self.variant = variant
        self.kernel = self.dir / "vmlinuz"
        self.initrd = self.dir / "initrd.gz"
        self.stamp = self.dir / "built"

    def recipe(self) -> str:
        """What the image is built from, besides the kernel package: a changed init script,
        module list or patch rebuilds it."""
        text = "\n".join([init_script(self.variant), *MODULES, self.variant, STANDBY_RX_RULE])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def ensure(self) -> GuestImage:
        if (
            self.stamp.exists()
            and self.stamp.read_text().split()[-1:] == [self.recipe()]
            and self.kernel.exists()
            and self.initrd.exists()
        ):
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            work = Path(tmp)
            pkg = kernel_package()
            _run("apt-get", "download", pkg, cwd=work)
            deb = next(work.glob("linux-image-*.deb"))
            extracted = work / "x"
            _run("dpkg-deb", "-x", str(deb), str(extracted))
            vmlinuz = next((extracted / "boot").glob("vmlinuz-*"))
            root = work / "initramfs"
            (root / "bin").mkdir(parents=True)
            (root / "lib" / "modules").mkdir(parents=True)
            busybox = shutil.which("busybox")
            if busybox is None:
                raise RuntimeError("busybox not found: apt-get install busybox-static")
            shutil.copy2(busybox, root / "bin" / "busybox")
            for mod in MODULES:
                if self.variant == "nobond" and mod == NOBOND_SKIPS:
                    continue
                src = next(extracted.glob(f"lib/modules/*/kernel/**/{mod}.ko"))
                shutil.copy2(src, root / "lib" / "modules" / f"{mod}.ko")
            if self.variant == "standby-rx":
                built = build_standby_rx_module(work, deb)
                shutil.copy2(built, root / "lib" / "modules" / "net_failover.ko")
            init = root / "init"
            init.write_text(init_script(self.variant))
            init.chmod(0o755)
            files = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
            cpio = subprocess.run(
                ["cpio", "-o", "-H", "newc", "--quiet"],
                cwd=root,
                input=files,
                check=True,
                capture_output=True,
            ).stdout
            gz = subprocess.run(["gzip", "-1"], input=cpio, check=True, capture_output=True).stdout
            self.initrd.write_bytes(gz)
            shutil.copy2(vmlinuz, self.kernel)
        self.stamp.write_text(f"{pkg} {self.variant} {self.recipe()}\n")
        # QEMU of every lab host reads the kernel and initrd from here.
        os.chmod(self.dir, 0o755)  # noqa: S103
        return self
