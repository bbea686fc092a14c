"""The seeded, randomized fault campaign (tests/campaign.py) in the suite: a few fixed seeds -
each one a schedule that once found a defect, kept so it stays fixed - and one fresh seed per
run, printed so a failure replays with `python -m tests.campaign run --seed N`.

`make bench` runs a longer campaign (VIRT_AGENT_CAMPAIGN_SEEDS, VIRT_AGENT_CAMPAIGN_FAULTS)
and writes its table from VIRT_AGENT_CAMPAIGN_REPORT."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.campaign import Campaign, schedule

pytestmark = [pytest.mark.faults, pytest.mark.daemon, pytest.mark.timeout(900)]

# Seed -> what it found (fixed since).
FIXED = {
    3: "a recovering cluster's leaderless stream answered no-responders: events set aside",
    4: "the same, after libvirtd restarts",
    1962951971: "an agent restarted while JetStream had no leaders yet exited on a timeout",
}
FRESH = random.SystemRandom().randrange(1 << 31)
SEEDS = [int(s) for s in os.environ.get("VIRT_AGENT_CAMPAIGN_SEEDS", "").split(",") if s] or [
    *FIXED,
    FRESH,
]
FAULTS = int(os.environ.get("VIRT_AGENT_CAMPAIGN_FAULTS", "6"))
REPORT = os.environ.get("VIRT_AGENT_CAMPAIGN_REPORT", "")


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_seeded_fault_schedule_loses_and_doubles_nothing(seed: int, tmp_path: Path) -> None:
    print(f"campaign seed {seed}: {[s.fault for s in schedule(seed, FAULTS)]}")
    report = await Campaign(tmp_path / "campaign", seed, FAULTS).run()
    if REPORT:
        with open(REPORT, "a") as f:  # noqa: ASYNC230 - one line, after the campaign
            f.write(json.dumps(report.row()) + "\n")
    assert report.problems == [], f"seed {seed} ({FIXED.get(seed, 'fresh')}): {report.problems}"
    assert report.events > 0
    assert report.stored == report.events
    assert report.current_state_s >= 0, "virt_domains equal to libvirt's listing at the end"
