"""The server process around the function: settings functions-framework does not expose.

Set through gunicorn's own configuration before functions-framework starts it: a
`post_worker_init` hook that puts `on_stop` before each worker's SIGTERM handler (Cloud Run
sends SIGKILL 10 s after SIGTERM, while gunicorn would let a build run on for minutes), and
whatever `extra` settings the caller passes.
"""
from __future__ import annotations

import signal
from typing import Any, Callable


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

    def load_config(self: GunicornApplication) -> None:
        original(self)
        self.cfg.set("post_worker_init", post_worker_init)
        for key, value in extra.items():
            self.cfg.set(key, value)

    load_config.__wrapped__ = original  # type: ignore[attr-defined]
    GunicornApplication.load_config = load_config
