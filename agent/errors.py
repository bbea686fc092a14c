"""The agent's error tree: one root, families that mirror the bus error codes."""

from __future__ import annotations

import re
from typing import Any, ClassVar

_USERINFO = re.compile(r"(//[^/@\s:]+):[^/@\s]*@")


def redact(value: Any) -> Any:
    """A URL (or a list of them) with any password replaced by ***: for logs and messages."""
    if isinstance(value, str):
        return _USERINFO.sub(r"\1:***@", value)
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidRequest(AgentError):
    code = "invalid_request"


class NotFound(AgentError):
    code = "not_found"


class Conflict(AgentError):
    code = "conflict"


class Unsupported(AgentError):
    code = "unsupported"


class Forbidden(AgentError):
    code = "forbidden"


class LibvirtFailure(AgentError):
    code = "libvirt_error"


class Timeout(AgentError):
    code = "timeout"


class Unavailable(AgentError):
    code = "unavailable"


class SettingsError(AgentError):
    """A setting failed validation; names the key, the value and where it came from."""

    code = "invalid_request"

    def __init__(self, key: str, value: Any, reason: str, source: str | None = None) -> None:
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid setting {key} = {redact(value)!r}{where}: {reason}")
        self.key = key
        self.value = redact(value)
        self.source = source


def from_reply(data: bytes, peer: str) -> Any:
    """A contract reply's `result`, or its error raised as the same AgentError family (a
    peer's `not_found` handled like one of this agent's own)."""
    import msgspec  # noqa: PLC0415

    reply = msgspec.json.decode(data)
    if not isinstance(reply, dict):
        raise AgentError(f"{peer}: a reply that is not a JSON object", peer=peer)
    if reply.get("ok"):
        return reply.get("result")
    err = reply.get("error") or {}
    family = REPLY_FAMILIES.get(err.get("code", ""), AgentError)
    raise family(f"{peer}: {err.get('message', 'unknown error')}", peer=peer,
                 **(err.get("details") or {}))  # fmt: skip


# A reply's error code -> the error this agent raises for it.
REPLY_FAMILIES: dict[str, type[AgentError]] = {
    cls.code: cls
    for cls in (InvalidRequest, NotFound, Conflict, Unsupported, Forbidden, LibvirtFailure,
                Timeout, Unavailable)
}  # fmt: skip
