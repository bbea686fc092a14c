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
from collections import OrderedDict
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from agent.bus import subscribed
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
from agent.operations import Journal
from agent.settings import CommandSettings
from handlers import CALLER, Context, Verb

log = structlog.get_logger("agent.commands")

_encoder = msgspec.json.Encoder()


Key = tuple[str, str, str]  # (caller or "", verb, request_id)


class _Outcomes:
    """Replies of requests that carried a request_id, kept for the idempotency window: in
    memory, and in the journal (`store`, once the agent has one) so that a request repeated
    after a restart is answered, not acted on again. Each keeps the digest of its request:
    the same id with another request is a conflict."""

    def __init__(self, window_s: float, limit: int = 100_000) -> None:
        self.window_s = window_s
        self.limit = limit
        self.store: Journal | None = None
        self._done: OrderedDict[Key, tuple[float, str, bytes]] = OrderedDict()
        self._running: dict[Key, tuple[str, asyncio.Future[bytes]]] = {}
        self._pruned = 0.0

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.window_s
        done = self._done
        while done and (next(iter(done.values()))[0] < cutoff or len(done) > self.limit):
            done.popitem(last=False)
        now = time.time()
        if self.store is not None and now - self._pruned > 60:
            self._pruned = now
            self.store.prune_outcomes(now - self.window_s)

    def get(self, key: Key) -> tuple[str, bytes | asyncio.Future[bytes]] | None:
        self._expire()
        done = self._done.get(key)
        if done is not None:
            return done[1], done[2]
        running = self._running.get(key)
        if running is not None:
            return running
        if self.store is not None:
            return self.store.request_outcome(key, time.time() - self.window_s)
        return None

    def start(self, key: Key, digest: str) -> None:
        self._running[key] = (digest, asyncio.get_running_loop().create_future())

    def finish(self, key: Key, digest: str, reply: bytes) -> None:
        _, fut = self._running.pop(key, ("", None))
        if fut is not None and not fut.done():
            fut.set_result(reply)
        self._done[key] = (time.monotonic(), digest, reply)
        if self.store is not None:
            self.store.record_outcome(key, digest, reply)


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
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._accepting = True
        self.handled = 0
        self.listening = asyncio.Event()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def run(self, nc: NATS) -> None:
        """Serve requests until cancelled; in-flight ones finish or are cancelled with it."""
        sub = await nc.subscribe(self.prefix + ">", pending_msgs_limit=self.settings.max_pending)
        try:
            await subscribed(nc)  # the server has it: commands sent from now on reach this agent
        except (NatsError, TimeoutError) as exc:
            # NATS went away meanwhile: the client sends the subscription again on reconnect.
            log.warning("command subscription not confirmed yet", error=str(exc))
        self.listening.set()
        try:
            async with asyncio.TaskGroup() as tg:
                async for msg in sub.messages:
                    if not msg.reply:
                        continue  # a command without a reply inbox cannot be answered
                    if not self._accepting:
                        await self._respond(msg, error_reply(Unavailable("agent is stopping")))
                        continue
                    await self._slots.acquire()
                    tg.create_task(self._serve(msg))
        finally:
            await sub.unsubscribe()

    def _verb_and_caller(self, name: str) -> tuple[str, str | None]:
        """`failover.reserve.hv01` -> (`failover.reserve`, `hv01`) for an agent-to-agent verb."""
        head, _, caller = name.rpartition(".")
        verb = self.verbs.get(head)
        if verb is not None and verb.peer and caller:
            return head, caller
        return name, None

    async def _serve(self, msg: Msg) -> None:
        verb, caller = self._verb_and_caller(msg.subject[len(self.prefix) :])
        CALLER.set(caller)
        started = time.monotonic()
        outcome = "error"
        try:
            reply = await self._dispatch(verb, msg.data, caller)
            outcome = "ok" if reply.startswith(b'{"ok":true') else "error"
        except Exception:
            log.exception("command handler failed", verb=verb)
            reply = error_reply(AgentError("internal error; see the agent's log", verb=verb))
        finally:
            self._slots.release()
        self.handled += 1
        self.ctx.metrics.commands.labels(verb if verb in self.verbs else "unknown", outcome).inc()
        ms = round((time.monotonic() - started) * 1000, 2)
        log.debug("command", verb=verb, outcome=outcome, ms=ms)
        await self._respond(msg, reply)

    async def _respond(self, msg: Msg, reply: bytes) -> None:
        try:
            await msg.respond(reply)
        except NatsError as exc:
            log.warning("could not reply", subject=msg.subject, error=str(exc))

    async def _dispatch(self, verb_name: str, data: bytes, caller: str | None) -> bytes:
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
            return error_reply(exc)

        request_id = getattr(request, "request_id", None)
        if request_id is None:
            return await self._call(verb, request)
        key = (caller or "", verb_name, request_id)
        digest = hashlib.sha256(msgspec.json.encode(
            {k: v for k, v in raw.items() if k != "request_id"}, order="sorted"
        )).hexdigest()  # fmt: skip
        seen = self.outcomes.get(key)
        if seen is not None:
            first, outcome = seen
            if first != digest:
                return error_reply(Conflict(
                    f"request_id {request_id!r} was used for another {verb_name} request",
                    request_id=request_id,
                ))  # fmt: skip
            return outcome if isinstance(outcome, bytes) else await asyncio.shield(outcome)
        self.outcomes.start(key, digest)
        reply = b""
        try:
            reply = await self._call(verb, request)
        finally:
            self.outcomes.finish(key, digest, reply or error_reply(AgentError("cancelled")))
        return reply

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

    async def _call(self, verb: Verb, request: Any) -> bytes:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                result = await verb.handler(self.ctx, request)
        except AgentError as exc:
            return error_reply(exc)
        except TimeoutError:
            limit = self.settings.timeout_s
            return error_reply(Timeout(f"{verb.name} did not finish within {limit}s"))
        return _encoder.encode(Reply(ok=True, result=result))
