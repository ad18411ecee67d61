"""Structured logs: one JSON object a line on stdout, in Cloud Logging's shape.

Cloud Logging reads `severity` and `message` from each line and keeps the
other fields as the entry's payload, so `event="nix-build"` lines can be
counted and filtered there (and in tests).
"""
from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

_write_lock = threading.Lock()  # keeps lines from concurrent requests whole


def event(event: str, message: str, severity: str = "INFO", **fields: Any) -> None:
    entry = {"severity": severity, "message": message, "event": event, "time": time.time(), **fields}
    line = json.dumps(entry, default=str, separators=(",", ":")) + "\n"
    with _write_lock:
        sys.stdout.write(line)
        sys.stdout.flush()
