"""config/virt-agent.service as systemd reads it: `systemd-analyze verify` reports every unknown
directive, bad value or missing executable (the binary path pointed at this venv's virt-agent).
The hardening itself needs systemd as PID 1, which this machine does not run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

UNIT = ROOT / "config" / "virt-agent.service"


def test_the_unit_file_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    binary = Path(sys.executable).parent / "virt-agent"
    text = UNIT.read_text()
    assert text.count("/usr/local/bin/virt-agent ") == 2, "ExecStartPre and ExecStart"
    unit = tmp_path / "virt-agent.service"
    unit.write_text(text.replace("/usr/local/bin/virt-agent", str(binary)))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.strip() == "", out.stderr
