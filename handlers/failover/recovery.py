"""migrate-with-failover after the source's agent restarted: the operation it was running is
adopted and settled - the domain ends on the destination with its primary there, or on this
host with its primary back - from its journaled steps."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent.context import Context
from agent.devices import device_element
from agent.domain import Job
from agent.envelope import Operation, OpState, StepName
from agent.errors import AgentError, Timeout, Unavailable
from agent.failover import Settled
from agent.operations import Ended, Progress
from handlers.failover.source import BEFORE_CHANGE, release_on, replug_on
from handlers.failover.steps import (
    PlanStep,
    RecoverStep,
    ReserveStep,
    RollbackStep,
    UnplugStep,
    as_record,
    read_steps,
)


def recovery(ctx: Context, op: Operation) -> Any:
    """The runner that finishes an operation this agent was running when it died."""

    async def recover(p: Progress) -> dict[str, Any]:
        steps = read_steps(op.steps)
        plan = next((s for s in steps if isinstance(s, PlanStep)), None)
        # The step the first process was in (a crash during an earlier recovery keeps it).
        earlier = [s for s in steps if not isinstance(s, (RecoverStep, RollbackStep))]
        interrupted = StepName(as_record(earlier[-1])["step"]) if earlier else StepName.PLAN
        p.record(as_record(RecoverStep(interrupted_at=interrupted)))
        if plan is None:
            raise AgentError("the agent restarted before the plan was recorded; nothing changed")
        dest, alias = plan.destination, plan.primary
        reservation = next((s.reservation for s in steps
                            if isinstance(s, (ReserveStep, UnplugStep)) and s.reservation),
                           None)  # fmt: skip
        # An unplug the crash interrupted may still complete in the guest: the record says
        # so until unplug_grace_s has passed.
        wait = ctx.failover.replug_timeout_s
        if interrupted is StepName.UNPLUG:
            wait += ctx.failover.unplug_grace_s
        deadline = time.monotonic() + wait
        last = ""
        while True:
            try:
                out = await _recover_once(ctx, op, dest, alias)
            except AgentError as exc:
                out, last = "waiting", exc.message
            if out == "destination":
                return {"recovered": True, "destination": dest, "primary": alias,
                        "interrupted_at": interrupted}  # fmt: skip
            if out == "source":
                if interrupted is not StepName.PLAN:
                    await release_on(ctx, dest, reservation, op.id)
                changed = interrupted not in BEFORE_CHANGE
                raise Ended(OpState.ROLLED_BACK if changed else OpState.FAILED, AgentError(
                    f"the agent restarted during {interrupted}; the domain stays on "
                    f"{ctx.host} with its primary {alias!r}"))  # fmt: skip
            # libvirtd may still be migrating it: no deadline while a job runs here.
            if time.monotonic() >= deadline and not await _job_running(ctx, op.domain):
                break
            await asyncio.sleep(1.0)
        if interrupted is not StepName.PLAN:
            await release_on(ctx, dest, reservation, op.id)
        raise Timeout(f"could not settle the interrupted operation ({last or 'still waiting'}); "
                      "the reconcile loop of the host that runs the domain owes its primary",
                      primary_owed=True)  # fmt: skip

    return recover


async def _job_running(ctx: Context, uuid: str) -> bool:
    try:
        dom = await ctx.hypervisor.find(uuid)
        return dom is not None and await dom.job() is Job.RUNNING
    except Unavailable:
        return True  # libvirt unreachable: it may still be migrating
    except AgentError:
        return False  # gone meanwhile


async def _recover_once(ctx: Context, op: Operation, dest: str, alias: str) -> str:
    # libvirt unreachable (raised) is not evidence that the domain left.
    dom = await ctx.hypervisor.find(op.domain)
    if dom is not None and await dom.is_active():
        out = await ctx.reconciler.settle(dom, owner=op.id)
        if out.settled is Settled.WAITING:
            return "waiting"
        return "source" if device_element(await dom.xml(), alias) is not None else "waiting"
    await replug_on(ctx, dest, op.domain, alias, op.id)
    return "destination"
