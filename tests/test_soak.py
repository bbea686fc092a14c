"""The agent's own state stays bounded with uptime: bench/soak.py at a size the suite can
afford (`make bench` runs 100,000 operations over 10,000 domains and reports the memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import OPERATIONS_MAX, soak

pytestmark = [pytest.mark.daemon, pytest.mark.timeout(600)]


async def test_many_short_operations_and_domains_leave_the_journal_and_tables_bounded(
    tmp_path: Path,
) -> None:
    """3,000 short `migrate` operations (each with a request_id) over 300 domains created
    and removed, against an agent process whose journal keeps 1,000 finished operations: the
    journal never holds much more than that (it was only pruned every 10 minutes: 3,000
    rows), and once every domain is gone the agent holds nothing for any of them."""
    result = await soak(tmp_path, ops=3000, domains=300)
    assert result["agent_alive"], result
    assert result["operations"] == 3000
    assert result["states"] == {"failed": 3000}, result["states"]  # the destination refuses
    slack = OPERATIONS_MAX // 10 + 16  # one prune step, and the operations in flight
    assert result["max_operation_rows"] <= OPERATIONS_MAX + slack, result["samples"]
    assert result["max_request_rows"] < 3000, result["samples"]  # the 5 s window is pruned
    assert result["domain_entries_end"] == result["domain_entries_start"], result
