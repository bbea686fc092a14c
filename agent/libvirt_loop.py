"""libvirt's event loop on asyncio (libvirtaio), safe to drive from executor threads.

libvirtaio touches the asyncio loop (add_reader, ensure_future) directly from whichever thread
libvirt calls it on. libvirt calls it from the thread doing an RPC - which, in this agent, is
often a thread of the bounded executor - and asyncio loops are not thread-safe. This subclass
keeps libvirtaio's file-handle dispatching, runs timers as plain loop callbacks, and applies
every handle and timer change on the loop thread:
calls made on the loop thread apply at once (after any queued ones, so order is kept); calls
from other threads are queued in order and applied by the loop. libvirt tolerates a watch
change that lands a moment late: its client takes its own lock before touching a socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio


class LoopSafeEventImpl(libvirtaio.virEventAsyncIOImpl):  # type: ignore[misc]
    def __init__(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        super().__init__(loop=loop)
        self._loop_thread = loop_thread
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._ops_lock = threading.Lock()
        self._timers: dict[int, _Timer] = {}

    # ------------------------------------------------------------ ordering

    def _apply_queued(self) -> None:
        while True:
            with self._ops_lock:
                if not self._ops:
                    return
                op = self._ops.popleft()
            try:
                op()
            except Exception as exc:  # noqa: BLE001 - reported; the queue must drain
                # One change that fails (a handle for a descriptor closed meanwhile) must not
                # leave the ones queued behind it waiting: there is one wake-up per batch.
                self.loop.call_exception_handler(
                    {"message": "libvirt event-loop change failed", "exception": exc}
                )

    def _run(self, op: Callable[[], None]) -> None:
        if self.loop.is_closed():
            # Connections closed after the loop (interpreter exit): nothing left to watch.
            with contextlib.suppress(RuntimeError):
                op()
            return
        if threading.get_ident() == self._loop_thread:
            if self._ops:  # a cheap look first: the lock only when something is queued
                self._apply_queued()
            op()
            return
        with self._ops_lock:
            wake = not self._ops
            self._ops.append(op)
        # One wake-up per batch, not per change: every call_soon_threadsafe writes a byte to the
        # loop's self-pipe, and a pipe filled by a burst of libvirt RPCs from executor threads
        # makes asyncio drop what else it carries (signal numbers among them).
        if wake:
            self.loop.call_soon_threadsafe(self._apply_queued)

    def schedule_ff_callback(self, iden: int, opaque: Any) -> None:
        if self.loop.is_closed():
            # No loop left to run libvirt's free callback later, and running it here, inside
            # the libvirt call that removes the handle, would deadlock on libvirt's own lock.
            # Only happens at interpreter exit; the memory goes with the process.
            return
        super().schedule_ff_callback(iden, opaque)

    @staticmethod
    def _next_iden() -> int:
        return int(next(libvirtaio.Callback._iden_counter))

    # ------------------------------------------------------------ handles

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        iden = self._next_iden()

        def op() -> None:
            callback = libvirtaio.FDCallback(
                self, cb, opaque, descriptor=self.descriptors[fd], event=event
            )
            callback.iden = iden
            self.callbacks[iden] = callback
            self.descriptors[fd].add_handle(callback)
            self._pending_inc()

        self._run(op)
        return iden

    def _update_handle(self, watch: int, event: int) -> None:
        def op() -> None:
            callback = self.callbacks.get(watch)
            # Unchanged: nothing to do (libvirtaio would register the same mask again, one
            # epoll_ctl each time; libvirt repeats itself on every message).
            if isinstance(callback, libvirtaio.FDCallback) and callback.event != event:
                callback.update(event=event)

        self._run(op)

    def _remove_handle(self, watch: int) -> int:
        def op() -> None:
            callback = self.callbacks.pop(watch, None)
            if not isinstance(callback, libvirtaio.FDCallback):
                return
            descriptor = callback.descriptor
            descriptor.remove_handle(watch)
            if not descriptor.callbacks and self.descriptors.get(descriptor.fd) is descriptor:
                del self.descriptors[descriptor.fd]
            callback.close()

        self._run(op)
        return 0

    # ------------------------------------------------------------ timers
    #
    # libvirtaio runs each timer as an asyncio Task, created and cancelled every time libvirt
    # arms and disarms it - and libvirt arms a 0 ms timer to dispatch every queued event.
    # Plain loop callbacks do the same job without a Task per event.

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        timer = _Timer(self._next_iden(), cb, opaque)

        def op() -> None:
            self._timers[timer.iden] = timer
            self._arm(timer, timeout)

        self._run(op)
        return timer.iden

    def _update_timeout(self, timer: int, timeout: int) -> None:
        def op() -> None:
            t = self._timers.get(timer)
            if t is not None:
                self._arm(t, timeout)

        self._run(op)

    def _remove_timeout(self, timer: int) -> int:
        def op() -> None:
            t = self._timers.pop(timer, None)
            if t is None:
                return
            self._arm(t, -1)
            # libvirt frees the opaque later, never inside the call that removed the timer.
            self.loop.call_soon(libvirt.virEventInvokeFreeCallback, t.opaque)

        self._run(op)
        return 0

    def _arm(self, t: _Timer, timeout: int) -> None:
        if timeout == t.timeout and (timeout == 0) == (t.handle is not None) and timeout <= 0:
            return  # already due at once, or already off: libvirt repeats itself per event
        t.timeout = timeout
        if t.handle is not None:
            t.handle.cancel()
            t.handle = None
        if timeout == 0:
            t.handle = self.loop.call_soon(self._fire, t)
        elif timeout > 0:
            t.handle = self.loop.call_later(timeout / 1000, self._fire, t)

    def _fire(self, t: _Timer) -> None:
        t.handle = None
        t.cb(t.iden, t.opaque)
        # A libvirt timer repeats until it is updated or removed (the callback may do either).
        if t.handle is None and t.timeout >= 0 and self._timers.get(t.iden) is t:
            self._arm(t, t.timeout)


class _Timer:
    __slots__ = ("cb", "handle", "iden", "opaque", "timeout")

    def __init__(self, iden: int, cb: Any, opaque: Any) -> None:
        self.iden = iden
        self.cb = cb
        self.opaque = opaque
        self.timeout = -1
        self.handle: asyncio.Handle | None = None


_impl: LoopSafeEventImpl | None = None


def ensure_registered(loop: asyncio.AbstractEventLoop) -> LoopSafeEventImpl:
    """Register the implementation once per process, from the loop's own thread."""
    global _impl
    if _impl is None:
        # libvirt prints every error to stderr by default; they reach us as exceptions.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        impl = LoopSafeEventImpl(loop, threading.get_ident())
        impl.register()
        _impl = impl
    elif _impl.loop is not loop:
        raise RuntimeError("libvirt's event loop is already bound to another asyncio loop")
    return _impl
