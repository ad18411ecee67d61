"""A local stand-in for a cloud service, run as a process on a fixed loopback port.

The port stays the same across stop/start, so clients made before a stop
reconnect after it: fault tests stop and start the service under a running
registry.
"""
from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmulatorProcess:
    """Subclasses say what to run (`command`), when it is ready (`ready_path`) and its `name`."""

    name = "emulator"
    ready_path = "/"
    poll_interval = 0.1

    port: int
    log_path: Path | None
    _proc: subprocess.Popen | None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, ready_timeout: float = 60.0) -> None:
        if self.running:
            return
        if self.log_path is None:
            self.log_path = Path(tempfile.gettempdir()) / f"{self.name.replace(' ', '-')}-{self.port}.log"
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(self.poll_interval)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {ready_timeout}s: {self._log_tail()}")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"
