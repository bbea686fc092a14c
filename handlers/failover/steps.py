"""migrate-with-failover's journal: each step of the operation as a typed record. The
operation writes them (agent/operations.py keeps them in the journal and publishes them as
the operation's `steps`, each a JSON object named by `step`), and its recovery after a
restart reads them back as the same types - a renamed field fails loudly on both sides."""

from __future__ import annotations

from typing import Any

import msgspec

from agent.envelope import StepName


class Step(msgspec.Struct, kw_only=True, tag_field="step", omit_defaults=True):
    duration_s: float | None = None  # set by the journal when the step ends


class PlanStep(Step, tag=StepName.PLAN.value):
    mode: str
    mode_reason: str
    primary: str
    standby: str | None
    mac: str
    destination: str
    guest: str


class ReserveStep(Step, tag=StepName.RESERVE.value):
    host: str
    reservation: str | None = None
    resource: str | None = None
    skipped: str | None = None  # why no reservation was asked (mode qemu)
    # The destination's admission (contract v1.2), which holds the reservation with it.
    admission: str | None = None


class UnplugStep(Step, tag=StepName.UNPLUG.value):
    alias: str
    mode: str
    reservation: str | None = None


class MigrateStep(Step, tag=StepName.MIGRATE.value):
    destination: str
    persistent_primary: str | None = None  # what the destination's definition lists
    migrated_anyway: bool = False
    note: str | None = None


class ReplugStep(Step, tag=StepName.REPLUG.value):
    host: str
    cancel_ignored: str | None = None


class VerifyStep(Step, tag=StepName.VERIFY.value):
    cancel_ignored: str | None = None


class RollbackStep(Step, tag=StepName.ROLLBACK.value):
    reason: str


class RecoverStep(Step, tag=StepName.RECOVER.value):
    interrupted_at: str


AnyStep = (PlanStep | ReserveStep | UnplugStep | MigrateStep | ReplugStep | VerifyStep
           | RollbackStep | RecoverStep)  # fmt: skip


def read_steps(steps: list[dict[str, Any]]) -> list[AnyStep]:
    """The journal's steps of a migrate_with_failover as their types."""
    return msgspec.convert(steps, list[AnyStep])


def as_record(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(step)
    out.pop("duration_s", None)
    return out
