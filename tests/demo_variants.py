"""Copies of the demo package set whose `hello` builds slowly or waits on a gate file.

Each copy is new to Nix (a unique marker in every builder), so its packages are built
afresh; the marker also finds the copy's builder processes (`pgrep -f MARKER`).
"""
from __future__ import annotations

import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "nix" / "demo"
_ANCHOR = 'export PATH="$TMPDIR/.bin"'


@dataclass(frozen=True)
class DemoCopy:
    path: Path
    marker: str  # stands in every builder's command line
    gate: Path  # while this file exists, building `hello` waits

    def builders_running(self) -> bool:
        return subprocess.run(["pgrep", "-f", self.marker], capture_output=True).returncode == 0


def _copy(tmp_path: Path, hello_script: str) -> DemoCopy:
    copy = tmp_path / f"demo-{uuid.uuid4().hex[:8]}"
    shutil.copytree(DEMO, copy)
    default = copy / "default.nix"
    text = default.read_text()
    assert _ANCHOR in text
    marker = f"DEMO_{uuid.uuid4().hex}"
    gate = tmp_path / f"gate-{marker}"
    script = hello_script.replace("GATE", str(gate))
    # `name` is hello, or hello-VERSION where the set versions its packages.
    default.write_text(text.replace(
        _ANCHOR, f'{_ANCHOR}; {marker}=1; case "$name" in hello|hello-[0-9]*) {script} ;; esac', 1))
    return DemoCopy(copy, marker, gate)


def slow_demo(tmp_path: Path, seconds: int) -> Path:
    """A copy never built before, whose `hello` takes `seconds` to build."""
    return _copy(tmp_path, f"sleep {seconds}").path


def gated_demo(tmp_path: Path) -> DemoCopy:
    """A copy never built before, whose `hello` builds only once `gate` is removed (it starts closed)."""
    demo = _copy(tmp_path, "while [ -e GATE ]; do sleep 0.1; done")
    demo.gate.touch()
    return demo
