"""How builds share an instance and a fleet: lease heartbeats and build slots.

A build lease is short (BUILD_LEASE_SECONDS) and renewed by its holder while the
build runs, so a holder that dies (kill -9, instance stopped) loses it within one
lease and another instance takes the build over. Build slots bound how many builds
run at once on one instance, across its worker processes, by memory; the rest wait.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from concurrent.futures import Future
from typing import Callable, Generic, Iterator, TypeVar

from . import errors

T = TypeVar("T")

# A cgroup limit this large (or "max") means no limit: read the machine's memory instead.
_NO_LIMIT = 1 << 60


class LeaseKeeper:
    """Renews the leases this process holds, every third of a lease, from one daemon thread.

    `renew(key, holder, expires_at)` returns False when the lease was lost (taken over
    after a stall); the keeper then stops renewing it and calls `lost(key, holder)`.
    """

    def __init__(self, lease_seconds: float, renew: Callable[[str, str, float], bool | None],
                 lost: Callable[[str, str], None] = lambda key, holder: None):
        self.lease_seconds = lease_seconds
        self._renew = renew
        self._lost = lost
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def hold(self, key: str, holder: str) -> None:
        with self._lock:
            self._held[key] = holder
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)
                self._thread.start()

    def release(self, key: str, holder: str) -> None:
        with self._lock:
            if self._held.get(key) == holder:
                del self._held[key]

    def release_all(self) -> list[tuple[str, str]]:
        """Stop renewing every lease; returns them (key, holder) for the caller to give back."""
        with self._lock:
            held, self._held = list(self._held.items()), {}
            return held

    def _run(self) -> None:
        interval = self.lease_seconds / 3
        while True:
            with self._lock:
                self._wake.wait(interval)
                held = list(self._held.items())
            for key, holder in held:
                # None: the cache is unreachable; the lease may lapse, and the build goes on.
                if self._renew(key, holder, time.time() + self.lease_seconds) is False:
                    self.release(key, holder)
                    self._lost(key, holder)


def instance_memory_bytes() -> int:
    """The memory this instance may use: its cgroup's limit, else the machine's memory."""
    for path in _cgroup_memory_limit_files():
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < _NO_LIMIT:
            return int(raw)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot tell this machine's memory")


def _cgroup_memory_limit_files() -> list[str]:
    """The limit files of this process's own cgroup, v2 ("0::/path") or v1 ("N:memory:/path")."""
    files = []
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            files.append(f"/sys/fs/cgroup{path.rstrip('/')}/memory.max")
        elif "memory" in controllers.split(","):
            files.append(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.limit_in_bytes")
    return files


def build_slots_for(memory_bytes: int, build_memory_bytes: int, cpus: int) -> int:
    """Builds that fit: in three quarters of memory (the rest serves requests and /tmp's growth),
    and at most two per CPU: more Nix processes on one store only contend for its locks."""
    by_memory = (memory_bytes * 3 // 4) // max(1, build_memory_bytes)
    return max(1, min(by_memory, 2 * cpus))


class BuildSlots:
    """At most `count` builds at once on this instance, shared by its worker processes.

    A slot is an exclusive lock on one of `count` files: the kernel frees it when its
    process dies, so a killed worker never leaks a slot.
    """

    def __init__(self, directory: str, count: int, poll: float = 0.2):
        self.directory = directory
        self.count = count
        self._poll = poll

    @contextlib.contextmanager
    def slot(self, stopping: threading.Event, deadline: float) -> Iterator[None]:
        os.makedirs(self.directory, exist_ok=True)
        while True:
            for index in range(self.count):
                handle = open(os.path.join(self.directory, f"slot-{index}"), "a")
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                try:
                    yield
                    return
                finally:
                    handle.close()  # releases the lock
            if time.time() > deadline:
                raise errors.Unavailable("this instance is busy with other builds; try again shortly")
            if stopping.wait(self._poll):
                raise errors.Unavailable("this instance is stopping; try again")


class SingleFlight(Generic[T]):
    """One call per key at a time in this process: callers for a key in flight share its outcome."""

    def __init__(self) -> None:
        self._in_flight: dict[str, Future] = {}
        self._lock = threading.Lock()

    def run(self, key: str, call: Callable[[], T], on_lead: Callable[[], None] = lambda: None) -> T:
        """`call()`'s result (or exception), computed once for every caller that comes while it runs.
        `on_lead` runs, under the lock, only for the caller that starts it (and may refuse by raising)."""
        with self._lock:
            future = self._in_flight.get(key)
            leader = future is None
            if leader:
                on_lead()
                future = self._in_flight[key] = Future()
        if not leader:
            return future.result()
        try:
            result = call()
            future.set_result(result)
            return result
        except BaseException as e:
            future.set_exception(e)
            raise
        finally:
            with self._lock:
                del self._in_flight[key]
