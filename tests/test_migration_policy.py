"""The migration convergence policy (handlers/migration.py): pure logic over the remaining
bytes seen at each poll; the lab test of a migration that does not converge is in
tests/test_lab.py."""

from __future__ import annotations

from handlers.migration import STALL_ITERATIONS, Convergence


def run(policy: Convergence, remaining: list[int]) -> list[str | None]:
    return [policy.observe(r) for r in remaining]


def test_a_converging_migration_changes_nothing() -> None:
    policy = Convergence(300, 2400, postcopy=True)
    assert run(policy, [900, 700, 500, 300, 100]) == [None] * 5
    assert policy.state() == {"max_downtime_ms": 300, "downtime_steps": 0, "postcopy": False}


def test_a_stall_doubles_the_downtime_up_to_the_ceiling_then_post_copy() -> None:
    policy = Convergence(300, 1000, postcopy=True)
    stall = [500] * (STALL_ITERATIONS + 1)
    actions = run(policy, stall) + run(policy, stall) + run(policy, stall)
    assert [a for a in actions if a] == ["downtime", "downtime", "postcopy"]
    assert policy.state() == {"max_downtime_ms": 1000, "downtime_steps": 2, "postcopy": True}
    assert run(policy, stall) == [None] * len(stall), "post-copy is final"


def test_without_post_copy_a_stall_at_the_ceiling_is_left_to_the_timeout() -> None:
    policy = Convergence(300, 300, postcopy=False)
    assert [a for a in run(policy, [500] * 20) if a] == []
    assert policy.state()["postcopy"] is False


def test_progress_between_polls_resets_the_stall_count() -> None:
    policy = Convergence(300, 600, postcopy=False)
    remaining = [500, 500, 500, 400, 400, 400, 400] + [300] * (STALL_ITERATIONS - 1)
    assert [a for a in run(policy, remaining) if a] == []
