"""Long operations: recorded in the journal (agent/journal.py, it survives restarts),
progress and outcome published on `virt.<host>.op.<id>` (stream VIRT_OPS), one running
operation per domain, and a global bound on concurrent operations.

Handlers start an operation with a runner coroutine; the runner reports steps through its
`Progress` and returns a result or raises an AgentError (the operation `failed`), or `Ended`
with the error and another final state. The manager owns the tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import structlog

from agent.envelope import (  # the wire form of an operation
    FINAL,
    Operation,
    OpEvent,
    OpState,
    StepName,
    error_record,
)
from agent.errors import AgentError, Conflict, NotFound, Unavailable
from agent.journal import Journal, decode_operation
from agent.metrics import Metrics

log = structlog.get_logger("agent.operations")

PRUNE_INTERVAL_S = 600.0


Publish = Callable[[str, OpEvent], object]


class Ended(Exception):
    """How a runner ends its operation with an error in a final state other than `failed`:
    `rolled_back` (it had changed things and put them back) or `cancelled`."""

    def __init__(self, state: OpState, error: AgentError) -> None:
        assert state in FINAL, state
        assert state is not OpState.SUCCEEDED, state
        super().__init__(error.message)
        self.state = state
        self.error = error


# Operations an orderly stop of the agent leaves `running` in the journal, for the next start
# to go on with (the migrations they run end, and are started again).
OUTLIVE_STOP = frozenset({"host.drain"})


class DomainLocks:
    """One change to a domain at a time, for commands and operations alike: an asyncio.Lock
    per domain that lives only while someone holds or waits for it, so a host that sees
    10,000 domains come and go keeps none of theirs."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, domain_uuid: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(domain_uuid, (asyncio.Lock(), 0))
        self._locks[domain_uuid] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[domain_uuid]
            if users == 1:
                del self._locks[domain_uuid]
            else:
                self._locks[domain_uuid] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]], timeout: float
) -> set[asyncio.Task[Any]]:
    """Cancel `tasks` and wait up to `timeout` for them to end; those still running."""
    todo = list(tasks)
    for t in todo:
        t.cancel()
    if not todo:
        return set()
    _, pending = await asyncio.wait(todo, timeout=timeout)
    return pending


async def cancel_for_sure(tasks: list[asyncio.Task[Any]], attempts: int = 10) -> None:
    """Cancel the tasks, and again those still running a second later: on Python 3.11 a
    cancellation that arrives just as an awaited reply does is lost inside `asyncio.wait_for`
    (nats-py's requests use it), and such a task would run on and hold the shutdown (seen:
    20 s, the stream check loop). Each one still running is named."""
    pending = [t for t in tasks if not t.done()]
    for _ in range(attempts):
        for t in pending:
            t.cancel()
        _, slow = await asyncio.wait(pending, timeout=1.0) if pending else (set(), set())
        if not slow:
            return
        log.warning("tasks still running after cancellation; cancelled again",
                    tasks=sorted(t.get_name() for t in slow))  # fmt: skip
        pending = list(slow)


class Progress:
    """What a runner uses to report: step boundaries (timed) and progress within a step."""

    def __init__(self, manager: OperationManager, op: Operation) -> None:
        self._m = manager
        self.op = op
        self._step_started = time.monotonic()

    def _close_step(self, now: float) -> None:
        if self.op.steps and "duration_s" not in self.op.steps[-1]:
            seconds = now - self._step_started
            self.op.steps[-1]["duration_s"] = round(seconds, 3)
            if self._m.metrics is not None:
                step = self.op.steps[-1]["step"]
                self._m.metrics.step_seconds.labels(self.op.verb, step).observe(seconds)

    def step(self, name: StepName, **detail: Any) -> None:
        # What the runner logs from here on says in which step (its task's own context).
        structlog.contextvars.bind_contextvars(step=name)
        now = time.monotonic()
        self._close_step(now)
        self._step_started = now
        self.op.step = name
        self.op.steps.append({"step": name, **detail})
        self.op.progress = {}
        self._m.record(self.op)

    def note(self, **detail: Any) -> None:
        """Add to the current step's record (what the step found out)."""
        self.op.steps[-1].update(detail)
        self._m.record(self.op)

    def record(self, step: dict[str, Any]) -> None:
        """Begin a step given as its whole record (`{"step": name, ...}`: a typed step's
        form)."""
        detail = dict(step)
        self.step(StepName(detail.pop("step")), **detail)

    def amend(self, step: dict[str, Any]) -> None:
        """Replace the current step's record (same step; its duration is kept)."""
        duration = self.op.steps[-1].get("duration_s")
        self.op.steps[-1] = {**step, **({"duration_s": duration} if duration is not None else {})}
        self._m.record(self.op)

    def update(self, **progress: Any) -> None:
        self.op.progress = progress
        self._m.record(self.op)


Runner = Callable[[Progress], Awaitable[Any]]


class OperationManager:
    def __init__(
        self,
        journal: Journal,
        host: str,
        publish: Publish,
        max_concurrent: int,
        metrics: Metrics | None = None,
        recoverable: frozenset[str] = frozenset(),
        retention: tuple[int, float, float] = (10_000, 7 * 24 * 3600.0, 600.0),
    ) -> None:
        self.journal = journal
        # (finished operations kept, their retention, the idempotency window) - Journal.prune
        self.retention = retention
        # Pruned once this many operations finished since the last prune as well as by the
        # clock, so the journal stays within a tenth above its bound under any rate.
        self._prune_every = max(1, retention[0] // 10)
        self._finished_since_prune = 0
        self.host = host
        self._publish = publish
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Operations cancelled with the operations they run (operation.cancel cancel_running).
        self.cancel_running: set[str] = set()
        self.stopping = False
        self._by_domain: dict[str, str] = {}
        self._group: asyncio.TaskGroup | None = None
        self._running = asyncio.Event()
        # Set at a shutdown whose time ran out: rollbacks stop protecting themselves.
        self.abandoned = asyncio.Event()
        # Operations of verbs that can be finished after a restart wait here for `adopt`.
        self.orphans: list[Operation] = []
        for op in journal.running():
            if op.verb in recoverable:
                self.orphans.append(op)
                continue
            # The agent stopped while this ran: its outcome is unknown to this process.
            op.state = OpState.FAILED
            op.error = {
                "code": "internal",
                "message": "the agent restarted while this ran",
                "details": {},
            }
            op.updated = time.time()
            journal.save(op)

    def record(self, op: Operation) -> None:
        """Journal `op` and publish it as it is now: the event carries a copy (the runner goes
        on changing `op` before the publisher sends it)."""
        op.updated = time.time()
        snapshot = decode_operation(self.journal.save(op))
        self._publish(op.state, OpEvent(host=self.host, operation=snapshot))
        if op.state in FINAL:
            self._finished_since_prune += 1
            if self._finished_since_prune >= self._prune_every:
                self.prune()

    async def run(self) -> None:
        """Own the operation tasks until cancelled (which cancels the running ones); keep
        the journal within its bounds meanwhile."""
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            self._running.set()
            while True:
                self.prune()
                # Idempotency outcomes expire by the clock: looked at within their window.
                await asyncio.sleep(min(PRUNE_INTERVAL_S, self.retention[2]))

    def prune(self) -> None:
        self._finished_since_prune = 0
        pruned = self.journal.prune(*self.retention)
        if any(pruned.values()):
            log.debug("journal pruned", **pruned)
        if self.metrics is not None:
            for table, rows in self.journal.sizes().items():
                self.metrics.journal_rows.labels(table).set(rows)

    async def stop(self, timeout: float) -> None:
        """Cancel every running operation and wait up to `timeout` for them to end (a rollback
        under way is given that time). Those still running then are abandoned: their journal
        entries stay `running`, so the next start recovers them; so do operations that outlive
        an orderly stop (`OUTLIVE_STOP`: a drain goes on after the restart)."""
        self.stopping = True
        pending = await cancel_and_wait(self._tasks.values(), timeout)
        if pending:
            log.warning("operations still ending at shutdown; the next start recovers them",
                        count=len(pending))  # fmt: skip
            self.abandoned.set()
            await cancel_and_wait(pending, 1.0)

    def holder(self, domain_uuid: str) -> str | None:
        """The id of the operation running on this domain, if any."""
        return self._by_domain.get(domain_uuid)

    def entries(self) -> int:
        """Domains with an operation running."""
        return len(self._by_domain)

    def adopt(self, op: Operation, runner: Runner) -> None:
        """Finish an operation that a previous process of this agent left running."""
        if self._group is None:
            raise Unavailable("operations are not being accepted")
        self.orphans = [o for o in self.orphans if o.id != op.id]
        log.info("adopting interrupted operation", operation_id=op.id, verb=op.verb, step=op.step)
        self._by_domain[op.domain] = op.id
        self._tasks[op.id] = self._group.create_task(self._drive(op, runner))

    async def started(self) -> None:
        """Wait until operations are accepted (the task group runs)."""
        await self._running.wait()

    def start(self, verb: str, domain_uuid: str, runner: Runner) -> Operation:
        if domain_uuid in self._by_domain:
            running = self._by_domain[domain_uuid]
            raise Conflict(
                f"domain {domain_uuid} already has operation {running} running",
                operation_id=running,
            )
        if len(self._tasks) >= self.max_concurrent:
            raise Unavailable(
                f"{len(self._tasks)} operations are running, the bound is {self.max_concurrent} "
                "(commands.max_operations)",
                running=len(self._tasks), reason="max_operations",
            )  # fmt: skip
        if self._group is None:
            raise Unavailable("operations are not being accepted")
        now = time.time()
        op = Operation(
            id=uuid.uuid4().hex, verb=verb, domain=domain_uuid, state=OpState.RUNNING, step="",
            created=now, updated=now,
        )  # fmt: skip
        self.record(op)
        self._by_domain[domain_uuid] = op.id
        self._tasks[op.id] = self._group.create_task(self._drive(op, runner))
        return op

    async def _drive(self, op: Operation, runner: Runner) -> None:
        progress = Progress(self, op)
        abandoned = False
        with structlog.contextvars.bound_contextvars(operation_id=op.id, operation=op.verb,
                                                     domain=op.domain):  # fmt: skip
            try:
                op.result = await runner(progress)
                op.state = OpState.SUCCEEDED
            except asyncio.CancelledError:
                if self.abandoned.is_set() or (self.stopping and op.verb in OUTLIVE_STOP):
                    abandoned = True  # left `running` in the journal for the next start
                    raise
                op.state = OpState.CANCELLED
                op.error = {"code": "cancelled", "message": "operation cancelled", "details": {}}
            except Ended as end:
                op.state = end.state
                op.error = error_record(end.error)
            except AgentError as exc:
                op.state = OpState.FAILED
                op.error = error_record(exc)
            except Exception as exc:
                log.exception("operation failed unexpectedly")
                op.state = OpState.FAILED
                op.error = {"code": "internal", "message": str(exc), "details": {}}
            finally:
                self._tasks.pop(op.id, None)
                self._by_domain.pop(op.domain, None)
                if not abandoned:
                    progress._close_step(time.monotonic())
                    op.progress = {}
                    self.record(op)
                    if self.metrics is not None:
                        self.metrics.operations.labels(op.verb, op.state).inc()
                    log.info("operation finished", state=op.state, verb=op.verb)

    def get(self, op_id: str) -> Operation:
        op = self.journal.get(op_id)
        if op is None:
            raise NotFound(f"operation {op_id!r} not found", operation_id=op_id)
        return op

    def cancel(self, op_id: str, running: bool = False) -> Operation:
        """Cancel a running operation; `running`: an operation that runs others (a drain)
        cancels those too, with their rollback."""
        op = self.get(op_id)
        task = self._tasks.get(op_id)
        if task is None:
            raise Conflict(f"operation {op_id!r} is {op.state}, not running", state=op.state)
        if running:
            self.cancel_running.add(op_id)
        task.cancel()
        return op

    def running(self, op_id: str) -> bool:
        return op_id in self._tasks


async def uninterruptible(coro: Any, abandoned: asyncio.Event) -> Any:
    """Await `coro` to its end even if the caller is cancelled meanwhile (again and again),
    unless `abandoned` is set (a shutdown out of time: the next start recovers); the caller's
    cancellation is then up to the caller to re-raise."""
    task = asyncio.ensure_future(coro)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            if abandoned.is_set():
                task.cancel()
                raise
