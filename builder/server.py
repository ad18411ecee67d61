"""The server process around the function: settings functions-framework does not expose.

Set through gunicorn's configuration before functions-framework starts it: a `post_worker_init`
hook that puts `on_stop` before each worker's SIGTERM handler (Cloud Run kills 10 s after
SIGTERM), a worker class that spreads connections evenly over the worker processes, and `extra`
settings. Why the spreading and how it was measured: docs/design.md, "Serving".
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from typing import Any, Callable

from gunicorn.workers.gthread import ThreadWorker

_MAX_WORKERS = 256
_BALANCE_POLL = 0.05  # seconds: how soon a worker holding more than its share looks again


class _Shares:
    """Each worker's open connections, in memory the workers share (made before they are forked)."""

    def __init__(self) -> None:
        self.pids = multiprocessing.RawArray("i", _MAX_WORKERS)
        self.conns = multiprocessing.RawArray("i", _MAX_WORKERS)
        self.lock = multiprocessing.Lock()

    def claim(self, pid: int) -> int | None:
        with self.lock:
            for slot in range(_MAX_WORKERS):
                if self.pids[slot] == 0 or not _alive(self.pids[slot]):
                    self.pids[slot], self.conns[slot] = pid, 0
                    return slot
        return None  # more workers than slots: that worker is simply not balanced

    def release(self, slot: int) -> None:
        with self.lock:
            self.pids[slot], self.conns[slot] = 0, 0

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest connections another live worker holds (None: no other worker)."""
        fewest = None
        for other in range(_MAX_WORKERS):
            pid = self.pids[other]
            if other != slot and pid and (fewest is None or self.conns[other] < fewest) and _alive(pid):
                fewest = self.conns[other]
        return fewest


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class BalancedThreadWorker(ThreadWorker):
    """gunicorn's threaded worker that accepts a connection only while it holds no more than any other.

    All workers share one listening socket, and the kernel wakes whichever polls it: a client's
    few keep-alive connections often all land in one process, which then serves them on one
    core while the other idles. Here a worker holding more connections than the least busy one
    stops polling the socket (and looks again every 50 ms), so the next connection goes to
    another worker: two connections on two workers are one each, eight are four each. Two that
    arrive together may still meet in one worker: it then closes one after its response.
    """

    shares: _Shares | None = None  # set in the server process before the workers are forked
    _slot: int | None = None
    _conns = 0

    @property
    def nr_conns(self) -> int:
        return self._conns

    @nr_conns.setter
    def nr_conns(self, value: int) -> None:
        self._conns = value
        if self.shares is not None and self._slot is not None:
            self.shares.conns[self._slot] = value

    def init_process(self) -> None:
        if self.shares is not None:
            self._slot = self.shares.claim(os.getpid())
        super().init_process()

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.shares is not None and self._slot is not None:
                self.shares.release(self._slot)

    @property
    def max_keepalived(self) -> int:
        # gunicorn closes a connection after its response when this many are kept alive already.
        # A worker holding two or more connections more than another closes one this way: the
        # client reconnects and the connection lands on a worker with fewer.
        if self.shares is not None and self._slot is not None:
            fewest = self.shares.fewest_elsewhere(self._slot)
            if fewest is not None and self._conns >= fewest + 2:
                return 0
        return self._max_keepalived

    @max_keepalived.setter
    def max_keepalived(self, value: int) -> None:
        self._max_keepalived = value

    def _fair(self) -> bool:
        if self.shares is None or self._slot is None:
            return True
        fewest = self.shares.fewest_elsewhere(self._slot)
        return fewest is None or self._conns <= fewest

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        # gunicorn re-enables accepting only when its own limit changes; the fair share changes
        # with the other workers' connections, so it is checked before every wait.
        self.set_accept_enabled(self.alive and self._conns < self.worker_connections)
        super().wait_for_and_dispatch_events(timeout if self._accepting else min(timeout, _BALANCE_POLL))

    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled and self._fair())


def configure(on_stop: Callable[[], None], **extra: Any) -> None:
    """Call before functions-framework builds its server (i.e. when main.py is imported)."""
    from functions_framework._http.gunicorn import GunicornApplication

    original = getattr(GunicornApplication.load_config, "__wrapped__", GunicornApplication.load_config)

    def post_worker_init(worker: Any) -> None:
        # In the worker's main thread, after gunicorn installed its own handlers.
        previous = signal.getsignal(signal.SIGTERM)

        def stop(signum: int, frame: Any) -> None:
            try:
                on_stop()
            finally:
                if callable(previous):
                    previous(signum, frame)

        signal.signal(signal.SIGTERM, stop)

    BalancedThreadWorker.shares = _Shares()

    def load_config(self: GunicornApplication) -> None:
        original(self)
        self.cfg.set("post_worker_init", post_worker_init)
        if self.cfg.workers > 1:
            self.cfg.set("worker_class", f"{__name__}.BalancedThreadWorker")
        for key, value in extra.items():
            self.cfg.set(key, value)

    load_config.__wrapped__ = original  # type: ignore[attr-defined]
    GunicornApplication.load_config = load_config
