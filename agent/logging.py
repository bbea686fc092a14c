"""structlog set-up: JSON lines when not on a terminal, readable lines on one."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from typing import Any, TextIO

import structlog


class Unbreakable(io.TextIOBase):
    """An output stream that survives its reader: once a write fails (the pipe it was
    closed, the disk full), what follows is dropped instead of raising into the agent, which
    then still shuts down in order. The descriptor is pointed at /dev/null, so nothing else
    in the process (libraries, the interpreter at exit) meets the broken pipe either."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, s: str) -> int:
        if not self.broken:
            try:
                self._stream.write(s)
            except (OSError, ValueError):
                self._break()
        return len(s)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def isatty(self) -> bool:
        return not self.broken and self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def _break(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)


def unbreakable_stdio() -> None:
    """sys.stdout and sys.stderr as Unbreakable streams (the agent's process only)."""
    for name in ("stdout", "stderr"):
        current = getattr(sys, name)
        if not isinstance(current, Unbreakable):
            setattr(sys, name, Unbreakable(current))


class NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that keeps the name it was asked for (`structlog.get_logger("agent.x")`),
    for `add_logger_name` to put in every line as `logger`."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class NamedPrintLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> NamedPrintLogger:
        return NamedPrintLogger(self._file, str(args[0]) if args else "")


def add_logger_name(logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """`logger`: the module that logged (`structlog.get_logger("agent.x")`, or a library's
    stdlib logger name)."""
    record = event.get("_record")
    name = record.name if record is not None else getattr(logger, "name", "")
    if name:
        event.setdefault("logger", name)
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog (and the stdlib loggers of libraries) for the whole process."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    stream = sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_logger_name,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=NamedPrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Libraries (nats, asyncio, libvirtaio) log through stdlib logging: same stream, same format.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
