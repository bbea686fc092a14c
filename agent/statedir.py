"""One agent per state directory: an exclusive lock on `<state_dir>/lock`, held for the
process's life. Two agents on one directory would write the same spool segment and delete
each other's unsent records; the second one is refused at start, told which process holds it.
The lock is the kernel's (flock), so it is released whenever its holder dies, even by
SIGKILL; re-entrant within one process (the CLI takes it before an embedded nats-server
starts, the agent again)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.errors import AgentError

_held: dict[Path, tuple[int, int]] = {}  # directory -> (fd, holders in this process)


class StateDirInUse(AgentError):
    code = "state_dir_in_use"


def lock(state_dir: str | Path) -> Path:
    """Take the directory's lock (creating the directory); raises StateDirInUse."""
    path = Path(state_dir).resolve()
    if path in _held:
        fd, n = _held[path]
        _held[path] = (fd, n + 1)
        return path
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirInUse(
            f"the state directory {path} is in use by another agent (pid {holder}); "
            "give each agent its own state_dir",
            state_dir=str(path),
            pid=holder,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = (fd, 1)
    return path


def unlock(path: Path) -> None:
    fd, n = _held.get(path, (-1, 0))
    if n > 1:
        _held[path] = (fd, n - 1)
    elif n == 1:
        del _held[path]
        os.close(fd)  # closing the last descriptor releases the flock
