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
