"""Live server sessions: a bounded LRU store with idle expiry and one worker per session.

Each entry owns a single-thread executor: every call for that session runs on the same thread,
in arrival order (that is the per-session lock; it also keeps per-thread backend caches warm, as
docs/ARCHITECTURE.md asks of front ends). Different sessions run on different threads, so
several clients are served at once. When the store is full the least recently used idle
session is evicted; a session idle for longer than ``idle_timeout`` seconds is dropped on the
next access or sweep. A lookup of a dropped session raises :class:`SessionNotFound`, which the
routes turn into a 404 the client recovers from by uploading the volume again.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fastsam3d.errors import FastSAM3DError

T = TypeVar("T")
R = TypeVar("R")


class SessionNotFound(FastSAM3DError):
    """The session id is unknown: never created, deleted, evicted or expired."""


class StoreFull(FastSAM3DError):
    """Every live session is busy, so none can be evicted to make room."""


@dataclass
class Entry(Generic[T]):
    """One live session, its worker thread and its bookkeeping."""

    value: T
    executor: ThreadPoolExecutor
    last_used: float = field(default_factory=time.monotonic)
    pending: int = 0  # calls queued or running on the executor

    async def run(self, fn: Callable[[T], R]) -> R:
        """Run ``fn(value)`` on this session's worker thread without blocking the event loop."""
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, fn, self.value)
        finally:
            self.pending -= 1
            self.last_used = time.monotonic()


class SessionStore(Generic[T]):
    """Bounded map id -> session with LRU eviction and idle expiry.

    Args:
        max_sessions: most live sessions; creating one more evicts the least recently used idle one.
        idle_timeout: seconds without a request after which a session is dropped (0 = never).
        on_close: called with a session's value when it is dropped (free its memory).
    """

    def __init__(
        self,
        max_sessions: int = 8,
        idle_timeout: float = 1800.0,
        on_close: Callable[[T], None] | None = None,
    ):
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.on_close = on_close
        self._entries: OrderedDict[str, Entry[T]] = OrderedDict()
        self._mutex = threading.Lock()
        self.evicted = 0  # count of sessions dropped for room or idleness (reported by /health)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, value: T) -> str:
        """Store a new session and return its id; evicts the LRU idle session when full."""
        sid = secrets.token_hex(16)
        dropped: list[Entry[T]] = []
        with self._mutex:
            dropped += self._expire_locked()
            while len(self._entries) >= self.max_sessions:
                victim = next((k for k, e in self._entries.items() if e.pending == 0), None)
                if victim is None:
                    raise StoreFull(
                        f"all {self.max_sessions} sessions are busy; try again in a moment"
                    )
                dropped.append(self._entries.pop(victim))
                self.evicted += 1
            name = f"fastsam3d-session-{sid[:8]}"
            self._entries[sid] = Entry(value, ThreadPoolExecutor(1, thread_name_prefix=name))
        self._close(dropped)
        return sid

    def get(self, sid: str, touch: bool = True) -> Entry[T]:
        """The live entry for ``sid``, marked most recently used unless ``touch`` is False;
        raises SessionNotFound."""
        with self._mutex:
            dropped = self._expire_locked()
            entry = self._entries.get(sid)
            if entry is not None and touch:
                self._entries.move_to_end(sid)
                entry.last_used = time.monotonic()
        self._close(dropped)
        if entry is None:
            raise SessionNotFound(
                f"session {sid!r} does not exist: it was deleted, or evicted after "
                f"{self.idle_timeout:g} s idle or to make room for newer sessions; "
                "upload the volume again to start a new session"
            )
        return entry

    def remove(self, sid: str) -> None:
        """Drop a session; raises SessionNotFound if it is not live."""
        self.get(sid)
        with self._mutex:
            entry = self._entries.pop(sid, None)
        self._close([entry] if entry else [])

    def sweep(self) -> int:
        """Drop expired sessions now; returns how many were dropped."""
        with self._mutex:
            dropped = self._expire_locked()
        self._close(dropped)
        return len(dropped)

    def remaining(self, sid: str) -> float:
        """Seconds until ``sid`` expires if left idle (inf without an idle timeout)."""
        entry = self.get(sid, touch=False)
        if self.idle_timeout <= 0:
            return float("inf")
        return max(0.0, self.idle_timeout - (time.monotonic() - entry.last_used))

    def close(self) -> None:
        """Drop every session (server shutdown)."""
        with self._mutex:
            dropped = list(self._entries.values())
            self._entries.clear()
        self._close(dropped)

    def _expire_locked(self) -> list[Entry[T]]:
        if self.idle_timeout <= 0:
            return []
        now = time.monotonic()
        old = [
            k
            for k, e in self._entries.items()
            if e.pending == 0 and now - e.last_used > self.idle_timeout
        ]
        self.evicted += len(old)
        return [self._entries.pop(k) for k in old]

    def _close(self, entries: list[Entry[T]]) -> None:
        for entry in entries:
            entry.executor.shutdown(wait=False)
            if self.on_close is not None:
                self.on_close(entry.value)
