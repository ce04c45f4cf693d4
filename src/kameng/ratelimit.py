"""A small per-key sliding-window rate limiter (per process).

Each web process limits on its own; with N processes the effective limit is up to N times the
setting. That is acceptable for lookup brute-force protection (the secret has 80 bits), and a
shared limiter can replace this class without touching its callers.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from kameng.errors import ErrorCode, KamengError


class RateLimiter:
    def __init__(self, *, limit: int, window_s: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Count a hit for `key`, refusing it (429) once the window is full."""
        self._hit(key, record=True)

    def ensure_allowed(self, key: str) -> None:
        """Refuse (429) if `key` already used its window, without counting this call: for
        limits on failures only (a login counts only when it fails)."""
        self._hit(key, record=False)

    def release(self, key: str) -> None:
        """Give back the newest hit of `key` (an attempt claimed with `check` that turned out
        not to count, e.g. a login that succeeded)."""
        with self._lock:
            hits = self._hits.get(key)
            if hits:
                hits.pop()

    def record(self, key: str) -> None:
        with self._lock:
            self._window(key, time.monotonic()).append(time.monotonic())

    def _window(self, key: str, now: float) -> deque[float]:
        hits = self._hits.get(key)
        if hits is None:
            if len(self._hits) >= self.max_keys:
                self._evict(now)
            hits = self._hits[key] = deque()
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        return hits

    def _hit(self, key: str, *, record: bool) -> None:
        now = time.monotonic()
        with self._lock:
            hits = self._window(key, now)
            if len(hits) >= self.limit:
                oldest = hits[0] if hits else now
                retry = max(1, int(oldest + self.window_s - now) + 1)
                raise KamengError(
                    ErrorCode.rate_limited, retry_after=retry, extra={"retry_after": retry}
                )
            if record:
                hits.append(now)

    def _evict(self, now: float) -> None:
        stale = [k for k, v in self._hits.items() if not v or v[-1] <= now - self.window_s]
        for k in stale:
            del self._hits[k]
        if len(self._hits) >= self.max_keys:
            self._hits.clear()
