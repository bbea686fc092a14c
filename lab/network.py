"""The lab's L2 segment: one Linux bridge shared by every lab host's guests, and the gateway in
a network namespace of its own, on TEST-NET-1 (192.0.2.0/24, a documentation range)."""

from __future__ import annotations

import subprocess

BRIDGE = "labbr0"
NETNS = "labgw"
GATEWAY = "192.0.2.1"
PREFIX = 24
VETH_BRIDGE_END = "labgw-br"
VETH_NS_END = "labgw-ns"


def guest_address(index: int) -> str:
    """Static guest addresses from .15 up, as /24."""
    return f"192.0.2.{15 + index}/{PREFIX}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _exists_link(name: str) -> bool:
    return _ip("link", "show", name, check=False).returncode == 0


def _exists_netns(name: str) -> bool:
    return name in _ip("netns", "list", check=False).stdout.split()


def up() -> None:
    """Create the bridge, the gateway namespace and the veth between them (idempotent)."""
    if not _exists_link(BRIDGE):
        _ip("link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
    _ip("link", "set", BRIDGE, "up")
    if not _exists_netns(NETNS):
        _ip("netns", "add", NETNS)
    if not _exists_link(VETH_BRIDGE_END):
        _ip("link", "add", VETH_BRIDGE_END, "type", "veth", "peer", "name", VETH_NS_END)
        _ip("link", "set", VETH_NS_END, "netns", NETNS)
    _ip("link", "set", VETH_BRIDGE_END, "master", BRIDGE, "up")
    _ip("-n", NETNS, "link", "set", "lo", "up")
    addrs = _ip("-n", NETNS, "-o", "addr", "show", "dev", VETH_NS_END).stdout
    if f"{GATEWAY}/{PREFIX}" not in addrs:
        _ip("-n", NETNS, "addr", "add", f"{GATEWAY}/{PREFIX}", "dev", VETH_NS_END)
    _ip("-n", NETNS, "link", "set", VETH_NS_END, "up")


def down() -> None:
    if _exists_link(VETH_BRIDGE_END):
        _ip("link", "del", VETH_BRIDGE_END, check=False)
    if _exists_netns(NETNS):
        _ip("netns", "del", NETNS, check=False)
    if _exists_link(BRIDGE):
        _ip("link", "del", BRIDGE, check=False)


def available() -> bool:
    """Whether the bridge network is up and usable."""
    return _exists_link(BRIDGE) and _exists_netns(NETNS)
