"""A registry started the way Cloud Functions starts it: functions-framework, entry point `registry`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
FUNCTIONS_FRAMEWORK = Path(sys.executable).parent / "functions-framework"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryProcess:
    kind = "registry"  # how errors name it

    def __init__(self, state_dir: Path, env: dict[str, str] | None = None, port: int | None = None):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.log_path = self.state_dir / f"registry-{self.port}.log"
        base = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("NIXERY_", "GCS_", "FIRESTORE_", "STORAGE_", "NIX_", "CACHE_"))
        }
        base.update({
            "NIXERY_PKGS_PATH": str(REPO / "nix" / "demo"),
            "STORAGE_PATH": str(self.state_dir / "storage"),
            "CACHE_PATH": str(self.state_dir / "cache.sqlite"),
            "WORK_DIR": str(self.state_dir / "work"),
            "NIX_TIMEOUT": "60",
            # The demo set's aarch64-linux packages are built by the host's busybox.
            "NIX_EXTRA_PLATFORMS": "aarch64-linux",
            "PYTHONUNBUFFERED": "1",
        })
        base.update(env or {})
        self.env = base
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "RegistryProcess":
        with open(self.log_path, "ab") as log:  # the process holds its own copy
            self.process = subprocess.Popen(
                [str(FUNCTIONS_FRAMEWORK), "--target=registry", "--source=main.py", "--host=127.0.0.1",
                 f"--port={self.port}"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self._wait_ready(timeout)

    def _wait_ready(self, timeout: float):
        """Returns self once /v2/ answers; raises with the log's tail if the process dies or is late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.process.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if requests.get(self.url + "/v2/", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # a loaded machine may answer late
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not start:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def events(self, name: str | None = None) -> list[dict]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if name is None or entry.get("event") == name:
                    found.append(entry)
        return found

    def builds(self) -> list[dict]:
        """Nix builds this process ran (successful or not), read from its structured logs."""
        return self.events("nix-build")

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)

    def head(self, path: str, **kwargs) -> requests.Response:
        return requests.head(self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)
