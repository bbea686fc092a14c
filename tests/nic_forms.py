"""The failover NIC forms libvirt really produces, written for this project from what libvirt's
own sources say (libvirt 9.0.0, Debian 12's): the device definitions of its test suite
(tests/qemuxml2argvdata/net-virtio-teaming*.xml, net-hostdev*.xml, hostdev-pci*.xml), its
formatter (src/conf/domain_conf.c, virDomainNetDefFormat: the "public actual" form of a
network interface whose port is a VF) and its schema (src/conf/schemas/domaincommon.rng).

Each form is one primary; `domain_xml()` puts it into a domain beside its virtio standby.
Where libvirt itself can produce a form (the lab's qemu driver defines all of them), the tests
take the inactive and live XML from libvirt; only the live form of a hostdev network needs a
VF to exist and is written here from the formatter.
"""

from __future__ import annotations

from dataclasses import dataclass

MAC = "52:54:00:6e:69:63"
STANDBY_ALIAS = "ua-standby0"
PRIMARY_ALIAS = "ua-vf0"
VF = ("0x0000", "0x3b", "0x02", "0x1")  # domain, bus, slot, function of the source host's VF
NETWORK = "sriov-net"

# The virtio standby: persistent teaming needs model virtio (qemu_validate.c).
STANDBY = f"""<interface type='bridge'>
  <mac address='{MAC}'/>
  <source bridge='labbr0'/>
  <model type='virtio'/>
  <teaming type='persistent'/>
  <alias name='{STANDBY_ALIAS}'/>
</interface>"""

# The lab's stand-in for a VF (an emulated e1000e on the standby's bridge, same MAC): no
# teaming element, found as the interface that shares its MAC with the standby.
E1000E_PRIMARY = f"""<interface type='bridge'>
  <mac address='{MAC}'/>
  <source bridge='labbr0'/>
  <model type='e1000e'/>
  <alias name='ua-primary0'/>
</interface>"""

# What a real fleet configures beside the VF and the agent must carry to the destination:
# the VLAN (or, instead, an 802.1Qbh port profile: libvirt refuses the two together on a
# hostdev interface), the VFIO driver, no option ROM, the link state.
_CARRIED_TAIL = """
  <driver name='vfio'/>
  <rom bar='off'/>
  <link state='up'/>"""
_CARRIED = "\n  <vlan><tag id='42'/></vlan>" + _CARRIED_TAIL
_CARRIED_QBH = (
    "\n  <virtualport type='802.1Qbh'><parameters profileid='finance'/></virtualport>"
    + _CARRIED_TAIL
)

_TEAMING = f"<teaming type='transient' persistent='{STANDBY_ALIAS}'/>"
_PCI = "domain='{}' bus='{}' slot='{}' function='{}'".format(*VF)


@dataclass(frozen=True)
class Form:
    name: str
    libvirt_form: str  # which of libvirt's forms this stands for
    inactive: str  # the primary as the persistent definition has it (what is recorded)
    live: str  # the primary as the running domain's XML shows it
    needs_pool: bool  # whether the destination must have a pool to give an equivalent


# Form A (net-virtio-teaming.xml): a VF by PCI address; `type='pci'` on the source address.
HOSTDEV_INTERFACE = f"""<interface type='hostdev' managed='yes'>
  <mac address='{MAC}'/>
  <source><address type='pci' {_PCI}/></source>{_CARRIED}
  {_TEAMING}
  <alias name='{PRIMARY_ALIAS}'/>
</interface>"""

# Form A with a port profile (net-hostdev-vfio.xml's 802.1Qbh virtualport) instead of a VLAN.
HOSTDEV_INTERFACE_QBH = HOSTDEV_INTERFACE.replace(_CARRIED, _CARRIED_QBH)

# Form B (net-virtio-teaming-network.xml): a port of a libvirt network with
# <forward mode='hostdev'>; the destination's libvirt picks a VF from its network of that name.
NETWORK_INACTIVE = f"""<interface type='network'>
  <mac address='{MAC}'/>
  <source network='{NETWORK}'/>
  <vlan><tag id='42'/></vlan>
  {_TEAMING}
  <alias name='{PRIMARY_ALIAS}'/>
</interface>"""

# Form B while it runs (virDomainNetDefFormat's public actual: the element takes the actual
# type, `managed` of the network's hostdev, the VF's address with `type='pci'`, the driver the
# qemu driver set; the network's name is gone).
NETWORK_LIVE = f"""<interface type='hostdev' managed='yes'>
  <mac address='{MAC}'/>
  <driver name='vfio'/>
  <source><address type='pci' {_PCI}/></source>
  <vlan><tag id='42'/></vlan>
  {_TEAMING}
  <alias name='{PRIMARY_ALIAS}'/>
</interface>"""

# Form C (net-virtio-teaming-hostdev.xml, libvirt >= 7.1): a plain PCI hostdev with teaming;
# its source address has no `type`, and it has no MAC (the host sets the VF's).
PLAIN_HOSTDEV = f"""<hostdev mode='subsystem' type='pci' managed='yes'>
  <driver name='vfio'/>
  <source><address {_PCI}/></source>
  {_TEAMING}
  <rom bar='off'/>
  <alias name='{PRIMARY_ALIAS}'/>
</hostdev>"""

FORMS = [
    Form("hostdev-interface", "<interface type='hostdev'> with <teaming type='transient'>",
         HOSTDEV_INTERFACE, HOSTDEV_INTERFACE, needs_pool=True),
    Form("hostdev-interface-qbh", "<interface type='hostdev'> with an 802.1Qbh port profile",
         HOSTDEV_INTERFACE_QBH, HOSTDEV_INTERFACE_QBH, needs_pool=True),
    Form("hostdev-network", "<interface type='network'> on a <forward mode='hostdev'> network",
         NETWORK_INACTIVE, NETWORK_LIVE, needs_pool=False),
    Form("plain-hostdev", "<hostdev mode='subsystem' type='pci'> with <teaming>",
         PLAIN_HOSTDEV, PLAIN_HOSTDEV, needs_pool=True),
]  # fmt: skip


def domain_xml(primary: str, name: str = "nicforms", uuid: str = "", kind: str = "kvm") -> str:
    """A minimal domain with the standby and this primary (valid for libvirt's schema)."""
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    return f"""<domain type='{kind}'>
  <name>{name}</name>{uuid_el}
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    {STANDBY}
    {primary}
  </devices>
</domain>"""
