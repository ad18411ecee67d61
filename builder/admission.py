"""Per-client build admission: at most BUILDS_PER_CLIENT_PER_HOUR image builds per client per hour.

Counted per instance, in memory (nothing shared on the request path); over it, a cache miss gets
429 TOOMANYREQUESTS with Retry-After, while cached images are always served. The client is the
address `http.py` puts in CLIENT: the last X-Forwarded-For entry (Google's front end appends it).
"""
from __future__ import annotations

import contextvars
import math
import threading
import time
from collections import deque
from typing import Callable

from .errors import TooManyRequests

WINDOW = 3600.0  # seconds
MAX_CLIENTS = 100_000  # clients remembered; beyond it the quietest are forgotten

CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("client", default=None)


def client_of(forwarded_for: str | None, peer: str | None) -> str:
    """Who a request comes from: the last X-Forwarded-For hop (earlier ones are the client's own words)."""
    hops = [hop.strip() for hop in (forwarded_for or "").split(",") if hop.strip()]
    return hops[-1] if hops else (peer or "unknown")


class BuildAdmission:
    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic):
        self.per_hour = per_hour
        self.clock = clock
        self._lock = threading.Lock()
        self._started: dict[str, deque[float]] = {}

    def admit(self, client: str | None) -> None:
        """Count a build for `client`, or raise TooManyRequests when it has used its hour's share."""
        if self.per_hour <= 0 or client is None:
            return
        now = self.clock()
        with self._lock:
            started = self._started.setdefault(client, deque())
            while started and started[0] <= now - WINDOW:
                started.popleft()
            if len(started) >= self.per_hour:
                retry_after = math.ceil(started[0] + WINDOW - now)
                raise TooManyRequests(
                    f"this client started {len(started)} image builds in the last hour, the limit "
                    f"(BUILDS_PER_CLIENT_PER_HOUR); images already built are still served. Try again in "
                    f"{retry_after} s", {"retry_after": retry_after}, retry_after=retry_after)
            started.append(now)
            if len(self._started) > MAX_CLIENTS:
                self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        for client in [c for c, times in self._started.items() if not times or times[-1] <= now - WINDOW]:
            del self._started[client]
