"""Messages JetStream would never accept, set aside so the ones after them go on.

`state_dir/dead-letters.jsonl`: one JSON object per line - time, msg_id, subject, sequence,
reason, attempts, and the payload (the CloudEvent as it would have been stored) while the file
is below its bound; beyond it, only the ids. An operator can inspect, fix and re-publish them
(docs/operations.md)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import structlog

from agent.envelope import rfc3339

log = structlog.get_logger("agent.deadletter")


class DeadLetters:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def add(
        self, msg_id: str, subject: str, sequence: int, payload: bytes, reason: str, attempts: int
    ) -> None:
        """Append one message; never raises (a failed write is logged with the message id)."""
        entry: dict[str, object] = {
            "time": rfc3339(time.time_ns()),
            "msg_id": msg_id,
            "subject": subject,
            "sequence": sequence,
            "reason": reason,
            "attempts": attempts,
            "bytes": len(payload),
        }
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size + len(payload) <= self.max_bytes:
                entry["payload"] = payload.decode("utf-8", errors="replace")
            line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("dead-letter write failed", msg_id=msg_id, error=str(exc))  # noqa: TRY400
