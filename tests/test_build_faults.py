"""Faults a serverless platform produces, mid-build, with real server processes and real Nix:
an instance killed with SIGKILL or stopped with SIGTERM while it builds, cold builds filling an
instance, and builds bounded by the instance's memory (a real cgroup limit).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from builder.manifest import OCI_MANIFEST
from tests.demo_variants import gated_demo

OCI = {"Accept": OCI_MANIFEST}


def shared_state(tmp_path: Path, demo: Path, **env: str) -> dict[str, str]:
    """Settings for instances that share one storage and one cache, like a deployment's instances."""
    return {"NIXERY_PKGS_PATH": str(demo), "STORAGE_PATH": str(tmp_path / "storage"),
            "CACHE_PATH": str(tmp_path / "cache.sqlite"), **env}


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def in_background(call, *args, **kwargs) -> dict:
    """Runs `call` in a thread; the dict gets its response or exception."""
    outcome: dict = {}

    def run():
        try:
            outcome["response"] = call(*args, **kwargs)
        except requests.RequestException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_a_killed_build_holder_is_taken_over_by_a_fresh_instance_within_the_lease(start_registry, tmp_path):
    demo = gated_demo(tmp_path)
    env = shared_state(tmp_path, demo.path, BUILD_LEASE_SECONDS="3")
    holder = start_registry(env)
    in_background(holder.get, "/v2/hello/manifests/latest", headers=OCI)
    wait_for(demo.builders_running)
    holder.kill()  # SIGKILL to the whole server: its lease is left behind, never released
    demo.gate.unlink()
    fresh = start_registry(env)
    response = fresh.get("/v2/hello/manifests/latest", headers=OCI, timeout=120)
    assert response.status_code == 200, response.text
    assert [b["result"] for b in fresh.builds()] == ["built"]


def test_sigterm_mid_build_ends_nix_and_hands_the_build_over_at_once(start_registry, tmp_path):
    demo = gated_demo(tmp_path)
    # A lease far longer than the test may wait: the other instance can only build in time
    # if the stopping instance gave its lease back.
    env = shared_state(tmp_path, demo.path, BUILD_LEASE_SECONDS="300")
    stopping, other = start_registry(env), start_registry(env)
    pending = in_background(stopping.get, "/v2/hello/manifests/latest", headers=OCI)
    wait_for(demo.builders_running)
    stopping.stop()  # SIGTERM, as Cloud Run stops an instance
    assert not demo.builders_running(), "a builder outlived its instance"
    pending["thread"].join(30)
    if "response" in pending:  # the request in flight ends with a retryable 503, never a remembered failure
        assert pending["response"].status_code == 503, pending["response"].text
    [shutdown] = stopping.events("shutdown")
    assert shutdown["nix_processes"] >= 1 and shutdown["leases"] == 1
    demo.gate.unlink()
    response = other.get("/v2/hello/manifests/latest", headers=OCI, timeout=60)
    assert response.status_code == 200, response.text


# Distinct images that all need the gated `hello`, plus the other demo packages they pair with.
PARTNERS = ["goodbye", "tools", "coreutils", "nano", "moreutils", "busybox", "libgreeting", "bashinteractive"]
COLD_IMAGES = ["hello"] + [f"hello/{p}" for p in PARTNERS] + [f"hello/goodbye/{p}" for p in PARTNERS[1:]]


def test_cold_builds_filling_an_instance_leave_warm_requests_answering(start_registry, tmp_path):
    # The deployed shape: one worker may be handed all of the instance's 16 concurrent requests.
    demo = gated_demo(tmp_path)
    registry = start_registry(shared_state(tmp_path, demo.path, WORKERS="1", THREADS="16", BUILD_CONCURRENCY="2"))
    demo.gate.unlink()
    warm = registry.get("/v2/goodbye/manifests/latest", headers=OCI)
    assert warm.status_code == 200, warm.text
    layer = warm.json()["layers"][0]["digest"]
    demo.gate.touch()
    cold = COLD_IMAGES[:15]  # with the probe below: 16 requests in flight
    with ThreadPoolExecutor(len(cold)) as pool:
        builds = [pool.submit(registry.get, f"/v2/{name}/manifests/latest", headers=OCI, timeout=300)
                  for name in cold]
        wait_for(demo.builders_running)
        time.sleep(1)  # every cold request is in: building, or waiting for a build slot
        for path in ("/v2/", "/v2/goodbye/manifests/latest", f"/v2/goodbye/blobs/{layer}"):
            started = time.monotonic()
            response = registry.get(path, headers=OCI, timeout=30)
            assert response.status_code == 200, response.text
            # Generous for a loaded machine: a wedged instance answers after the builds, minutes later.
            assert time.monotonic() - started < 5, path
        assert not any(b.done() for b in builds), "the builds should still be waiting on the gate"
        demo.gate.unlink()
        assert [b.result().status_code for b in builds] == [200] * len(cold)


MEMORY_HOG = """#!/bin/sh
# Evaluation that takes HOG_MIB of memory while it runs (nixpkgs' takes hundreds of MB).
exec {python} -c '
import subprocess, sys, time
held = b"x" * ({mib} << 20)
time.sleep(0.5)
sys.exit(subprocess.call(["{real}"] + sys.argv[1:]))
' "$@"
"""


class MemoryGroup:
    """A cgroup v1 memory group (root only); processes started inside it stay in it."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, name: str, limit_bytes: int | None = None):
        if not (self.ROOT / "cgroup.procs").exists():
            raise RuntimeError("cgroup v1 memory controller not mounted at /sys/fs/cgroup/memory")
        self.path = self.ROOT / f"{name}-{os.getpid()}"
        self.path.mkdir()
        if limit_bytes is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))

    @contextlib.contextmanager
    def entered(self):
        """This process inside the group meanwhile: what it starts is born there, and stays."""
        home = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                    if ":memory:" in line)
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (self.ROOT / home.lstrip("/") / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def reset_peak(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (self.ROOT / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # already gone
        self.path.rmdir()


@pytest.fixture
def memory_cgroup():
    """A memory group of 700 MiB (the tests run as root)."""
    group = MemoryGroup("registry-test", 700 << 20)
    yield group
    group.remove()


def test_sixteen_cold_builds_in_a_memory_capped_instance_all_succeed(start_registry, tmp_path, memory_cgroup):
    bin_dir = tmp_path / "nix-bin"
    bin_dir.mkdir()
    for tool in ("nix-build", "nix-store", "nix", "nix-instantiate"):
        real = shutil.which(tool)
        target = bin_dir / tool
        if tool == "nix-instantiate":
            target.write_text(MEMORY_HOG.format(python=sys.executable, mib=160, real=real))
            target.chmod(0o755)
        else:
            target.symlink_to(real)
    demo = gated_demo(tmp_path)
    demo.gate.unlink()
    # 700 MiB and 200 MiB a build: two builds at once. Sixteen at once would need 2.5 GiB.
    # Started inside the group, so the instance sees its limit from the start.
    with memory_cgroup.entered():
        registry = start_registry(shared_state(tmp_path, demo.path, WORKERS="1", THREADS="16",
                                               NIX_BIN_DIR=str(bin_dir), BUILD_MEMORY_BYTES=str(200 << 20)))
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(
            lambda name: registry.get(f"/v2/{name}/manifests/latest", headers=OCI, timeout=300), COLD_IMAGES[:16]))
    assert [r.status_code for r in responses] == [200] * 16
    assert registry.process.poll() is None
    assert len(registry.builds()) == 16
    assert memory_cgroup.peak_bytes() < 700 << 20
