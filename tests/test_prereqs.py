"""The suite on a fresh machine: every program the tests run comes from a Debian package that
lab/prereqs.py installs by name - not through another package's Recommends, which a machine
may install without."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from lab.prereqs import DEBIAN_PACKAGES

# Programs the suite runs, directly or through a program it runs (virt-xml-validate runs
# xmllint), beside libvirt's daemons.
PROGRAMS = ["virt-xml-validate", "xmllint", "virsh", "libvirtd", "virtlogd", "qemu-system-x86_64",
            "qemu-img", "busybox", "cpio", "ip", "promtool"]  # fmt: skip


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_program_the_suite_runs_comes_from_a_declared_package(program: str) -> None:
    path = shutil.which(program)
    assert path is not None, f"{program} is not installed (python -m lab.prereqs installs it)"
    packages: set[str] = set()
    # The path dpkg recorded may be another of the usr-merged names of the same file.
    for candidate in (path, f"/bin/{program}", f"/sbin/{program}", f"/usr/sbin/{program}"):
        owner = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True,
                               check=False)  # fmt: skip
        if owner.returncode == 0:
            packages = {p.strip().split(":")[0] for p in owner.stdout.split(": ", 1)[0].split(",")}
            break
    assert packages & set(DEBIAN_PACKAGES), (
        f"{program} comes from {sorted(packages)}, which lab/prereqs.py does not install by name"
    )
