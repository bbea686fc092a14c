"""Where a NATS request becomes a handler call: subscribe, decode, validate, authorize,
de-duplicate by request_id, bound concurrency, reply.

Every request gets exactly one reply, `{"ok": true, "result": ...}` or `{"ok": false,
"error": {"code", "message", "details"}}` with a code from the contract; nothing a client
sends can crash the service.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from agent import crashpoints
from agent.bus import subscribed
from agent.context import CALLER, Context, Verb
from agent.envelope import Reply, error_reply
from agent.errors import (
    AgentError,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    Timeout,
    Unavailable,
)
from agent.journal import Journal
from agent.settings import CommandSettings

log = structlog.get_logger("agent.commands")

_encoder = msgspec.json.Encoder()


Key = tuple[str, str, str]  # (caller or "", "", request_id); the middle once held the verb
# The outcome a journal row holds from the intent until the reply: found by a later process,
# the earlier one stopped while acting.
INTERRUPTED = b""


class _Ok(msgspec.Struct):
    ok: bool


_read_ok = msgspec.json.Decoder(_Ok)


@dataclass(frozen=True, slots=True)
class Answer:
    """A command's reply as it is sent, and whether it is a success."""

    ok: bool
    body: bytes

    @classmethod
    def error(cls, exc: AgentError) -> Answer:
        return cls(False, error_reply(exc))

    @classmethod
    def result(cls, result: Any) -> Answer:
        return cls(True, _encoder.encode(Reply(ok=True, result=result)))

    @classmethod
    def kept(cls, body: bytes) -> Answer:
        """A reply kept for the idempotency window (the journal keeps its bytes)."""
        return cls(_read_ok.decode(body).ok, body)


# The command subscription's client-side buffer: the intake never waits, so it stays short;
# generous against a burst. Beyond it nats-py drops (a slow consumer, counted by agent/bus.py).
SUB_PENDING_MSGS = 65_536
SUB_PENDING_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Request:
    msg: Msg
    verb: str
    caller: str | None  # the calling host of an agent-to-agent verb
    who: str  # whose turn it is: the calling host, or the reply prefix of an operator


class _Outcomes:
    """Replies of requests that carried a request_id, kept for the idempotency window: in
    memory, and in the journal (`store`, once the agent has one) so that a request repeated
    after a restart is answered, not acted on again. Each keeps the digest of its request:
    the same id with another request is a conflict."""

    def __init__(self, window_s: float, limit: int = 100_000) -> None:
        self.window_s = window_s
        self.limit = limit
        self.store: Journal | None = None
        self._done: OrderedDict[Key, tuple[float, str, Answer]] = OrderedDict()
        self._running: dict[Key, tuple[str, asyncio.Future[Answer]]] = {}
        self._pruned = 0.0

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.window_s
        done = self._done
        while done and (next(iter(done.values()))[0] < cutoff or len(done) > self.limit):
            done.popitem(last=False)
        now = time.time()
        if self.store is not None and now - self._pruned > 60:
            self._pruned = now
            self.store.prune_outcomes(now - self.window_s, self.limit)

    def get(self, key: Key) -> tuple[str, Answer | asyncio.Future[Answer] | None] | None:
        """(digest, outcome) of a request seen within the window; outcome None: an earlier
        process stopped while it acted."""
        self._expire()
        done = self._done.get(key)
        if done is not None:
            return done[1], done[2]
        running = self._running.get(key)
        if running is not None:
            return running
        if self.store is not None:
            kept = self.store.request_outcome(key, time.time() - self.window_s)
            if kept is not None:
                digest, body = kept
                return digest, None if body == INTERRUPTED else Answer.kept(body)
        return None

    def start(self, key: Key, digest: str) -> None:
        self._running[key] = (digest, asyncio.get_running_loop().create_future())
        if self.store is not None:
            self.store.record_outcome(key, digest, INTERRUPTED)

    def finish(self, key: Key, digest: str, answer: Answer) -> None:
        _, fut = self._running.pop(key, ("", None))
        if fut is not None and not fut.done():
            fut.set_result(answer)
        self._done[key] = (time.monotonic(), digest, answer)
        if self.store is not None:
            self.store.record_outcome(key, digest, answer.body)


class CommandService:
    def __init__(
        self, settings: CommandSettings, ctx: Context, verbs: dict[str, Verb],
        store: Journal | None = None,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.ctx = ctx
        self.verbs = verbs
        self.prefix = ctx.subjects.cmd("")  # virt.<host>.cmd.
        self.outcomes = _Outcomes(settings.idempotency_window_s)
        self.outcomes.store = store
        self._running = 0
        self._waiting: dict[str, deque[_Request]] = {}
        self._running_by: Counter[str] = Counter()
        self._queued = 0
        self._tg: asyncio.TaskGroup | None = None
        self.refused: dict[str, int] = {}
        # Requests taken in, and replies sent: equal whenever nothing is in flight.
        self.taken = 0
        self.replied = 0
        self._accepting = True
        self.handled = 0
        self.listening = asyncio.Event()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def run(self, nc: NATS) -> None:
        """Serve requests until cancelled; in-flight ones finish or are cancelled with it.

        The intake never waits: a request is started when a slot is free, else it waits in its
        caller's queue (served round-robin, so one host's flood cannot starve the controller),
        else - that queue full - it is answered `unavailable` at once. Every request taken in
        is answered exactly once; one with a reply subject its caller may not use is answered
        never, and counted (contract v1.2, "Contained hosts")."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            # A callback, not an iterator: nats-py hands it every buffered message without a
            # pass of the event loop between them, so the intake runs ahead of the handlers and
            # a request waits in its caller's queue - not behind another caller's in NATS's.
            sub = await nc.subscribe(self.prefix + ">", cb=self._on_msg,
                                     pending_msgs_limit=SUB_PENDING_MSGS,
                                     pending_bytes_limit=SUB_PENDING_BYTES)  # fmt: skip
            try:
                try:
                    await subscribed(nc)  # the server has it: commands from now on reach us
                except (NatsError, TimeoutError) as exc:
                    # NATS went away meanwhile: the client subscribes again on reconnect.
                    log.warning("command subscription not confirmed yet", error=str(exc))
                self.listening.set()
                await asyncio.get_running_loop().create_future()  # until cancelled
            finally:
                self._tg = None
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        request = self._intake(msg)
        if request is None:
            return
        self.taken += 1
        if not self._accepting or self._tg is None:
            await self._respond(msg, error_reply(Unavailable("agent is stopping")))
            return
        waiting = self._waiting.setdefault(request.who, deque())
        if not waiting and self._may_start(request.who):
            del self._waiting[request.who]
            self._start(request)
            return
        if (len(waiting) >= self.settings.max_pending_per_caller
                or self._queued >= self.settings.max_pending):  # fmt: skip
            self._refused("busy")
            await self._respond(msg, error_reply(Unavailable(
                "busy: too many requests waiting; try again later",
                waiting=len(waiting), retry_after_s=1.0,
            )))  # fmt: skip
            return
        waiting.append(request)
        self._queued += 1

    def _intake(self, msg: Msg) -> _Request | None:
        """The request in `msg`, or None (counted) when it is not one this agent answers: a
        subject outside this host's command prefix (a push consumer's delivery carries the
        stored subject), or a reply subject its caller may not receive on."""
        if not msg.subject.startswith(self.prefix):
            self._refused("subject")
            return None
        if not msg.reply:
            self._refused("no_reply")
            return None  # a command without a reply inbox cannot be answered
        verb, caller = self._verb_and_caller(msg.subject[len(self.prefix) :])
        allowed = (f"_INBOX_{caller}.",) if caller else self.settings.reply_prefixes
        if not msg.reply.startswith(tuple(allowed)):
            self._refused("reply_subject")
            log.warning("request refused: reply subject not allowed for its caller",
                        verb=verb[:80], caller=caller, reply=msg.reply[:120])  # fmt: skip
            return None
        who = caller or next(p for p in allowed if msg.reply.startswith(p))
        return _Request(msg, verb, caller, who)

    def _refused(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.ctx.metrics.commands_refused.labels(reason).inc()

    def _may_start(self, who: str) -> bool:
        return (self._running < self.settings.max_concurrent
                and self._running_by[who] < self.settings.max_concurrent_per_caller)  # fmt: skip

    def _start(self, request: _Request) -> None:
        assert self._tg is not None
        self._running += 1
        self._running_by[request.who] += 1
        self._tg.create_task(self._serve(request))

    def _next(self) -> None:
        """A slot is free: the next waiting request, taking callers in turn (a caller at its
        own limit is passed over)."""
        for who in list(self._waiting):
            if self._running >= self.settings.max_concurrent:
                return
            if not self._may_start(who):
                continue
            waiting = self._waiting.pop(who)
            request = waiting.popleft()
            self._queued -= 1
            if waiting:
                self._waiting[who] = waiting  # to the back of the line
            self._start(request)

    def _verb_and_caller(self, name: str) -> tuple[str, str | None]:
        """`failover.reserve.hv01` -> (`failover.reserve`, `hv01`) for an agent-to-agent verb."""
        head, _, caller = name.rpartition(".")
        verb = self.verbs.get(head)
        if verb is not None and verb.peer and caller:
            return head, caller
        return name, None

    async def _serve(self, request: _Request) -> None:
        msg, verb, caller = request.msg, request.verb, request.caller
        CALLER.set(caller)
        started = time.monotonic()
        outcome = "error"
        # Every log line of the command says which command, and whose (a task of its own:
        # the binding ends with it).
        structlog.contextvars.bind_contextvars(verb=verb[:80], caller=caller or request.who)
        try:
            answer = await self._dispatch(verb, msg.data, caller)
            outcome = "ok" if answer.ok else "error"
        except Exception:
            log.exception("command handler failed")
            answer = Answer.error(AgentError("internal error; see the agent's log", verb=verb))
        finally:
            self._running -= 1
            self._running_by[request.who] -= 1
            if not self._running_by[request.who]:
                del self._running_by[request.who]
            self._next()
        self.handled += 1
        self.ctx.metrics.commands.labels(verb if verb in self.verbs else "unknown", outcome).inc()
        ms = round((time.monotonic() - started) * 1000, 2)
        log.debug("command", outcome=outcome, ms=ms)
        await self._respond(msg, answer.body)

    async def _respond(self, msg: Msg, reply: bytes) -> None:
        self.replied += 1
        try:
            await msg.respond(reply)
        except NatsError as exc:
            log.warning("could not reply", subject=msg.subject, error=str(exc))

    async def _dispatch(self, verb_name: str, data: bytes, caller: str | None) -> Answer:
        try:
            verb = self._authorize(verb_name, data)
            if verb.peer and caller is None and not self.settings.accept_v1_peer_calls:
                raise Forbidden(
                    f"{verb_name} needs the calling host's id as the subject's last token "
                    f"({verb_name}.<host>, contract v1.1); commands.accept_v1_peer_calls is false",
                    verb=verb_name,
                )
            try:
                raw = msgspec.json.decode(data)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"request is not valid JSON (UTF-8): {exc}") from None
            except RecursionError:
                raise InvalidRequest("request is nested too deeply") from None
            if not isinstance(raw, dict):
                raise InvalidRequest(
                    f"request must be a JSON object, got {type(raw).__name__}",
                    got=type(raw).__name__,
                )
            try:
                request = msgspec.convert(raw, verb.request, strict=True)
            except msgspec.ValidationError as exc:
                raise InvalidRequest(
                    f"invalid {verb_name} request: {exc}", verb=verb_name
                ) from None
        except AgentError as exc:
            return Answer.error(exc)

        request_id = getattr(request, "request_id", None)
        if request_id is None:
            return await self._call(verb, request)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        # Keyed by caller and id: the same id with another verb is another request, a conflict
        # (contract: "the same id with a different request is conflict").
        key = (caller or "", "", request_id)
        digest = hashlib.sha256(msgspec.json.encode(
            {"verb": verb_name, **{k: v for k, v in raw.items() if k != "request_id"}},
            order="sorted",
        )).hexdigest()  # fmt: skip
        seen = self.outcomes.get(key)
        if seen is not None:
            first, outcome = seen
            if first != digest:
                return Answer.error(Conflict(
                    f"request_id {request_id!r} was used for another request",
                    request_id=request_id,
                ))  # fmt: skip
            if outcome is None:
                return Answer.error(Conflict(
                    f"request_id {request_id!r}: an earlier attempt was cut off (the agent "
                    "stopped) while it acted; its outcome is unknown and it is not acted on "
                    "again - look at the domain's state, and send a new request_id to act",
                    request_id=request_id, outcome="unknown",
                ))  # fmt: skip
            return outcome if isinstance(outcome, Answer) else await asyncio.shield(outcome)
        # The intent is written before acting: a kill -9 between the act and its outcome
        # leaves it, and a repeat is answered `conflict` (outcome unknown), never acted twice.
        self.outcomes.start(key, digest)
        crashpoints.reached("command.intent")
        answer: Answer | None = None
        try:
            answer = await self._call(verb, request)
            crashpoints.reached("command.acted")
        finally:
            self.outcomes.finish(key, digest, answer or Answer.error(AgentError("cancelled")))
        return answer

    def _authorize(self, verb_name: str, data: bytes) -> Verb:
        if len(data) > self.settings.max_payload_bytes:
            raise InvalidRequest(
                f"request of {len(data)} bytes exceeds the limit of "
                f"{self.settings.max_payload_bytes}",
                size=len(data),
                limit=self.settings.max_payload_bytes,
            )
        verb = self.verbs.get(verb_name)
        if verb is None:
            raise NotFound(f"unknown verb {verb_name!r}", verb=verb_name, verbs=sorted(self.verbs))
        allowed = self.settings.allowed_verbs
        if verb_name in self.settings.denied_verbs or (allowed and verb_name not in allowed):
            raise Forbidden(f"verb {verb_name!r} is not allowed on this host", verb=verb_name)
        return verb

    async def _call(self, verb: Verb, request: Any) -> Answer:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                result = await verb.handler(self.ctx, request)
        except AgentError as exc:
            return Answer.error(exc)
        except TimeoutError:
            limit = self.settings.timeout_s
            return Answer.error(Timeout(f"{verb.name} did not finish within {limit}s"))
        return Answer.result(result)
