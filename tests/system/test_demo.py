"""`make demo` (python -m lab.demo) as a new user runs it: the HTTP request the application
sends is shown, every check passes, a --workdir keeps governord's log; on bare metal each host is
shown on the pool machine it got."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)


def _demo(workdir: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "lab.demo", "--workdir", str(workdir), *args], capture_output=True,
                          text=True, timeout=840, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "demo check failed" not in done.stdout
    return done.stdout


def test_the_demo_shows_the_applications_request_and_keeps_its_log(tmp_path: Path) -> None:
    out = _demo(tmp_path / "demo", "--dns", "none")
    assert "the application sends POST https://localhost:" in out and "/v1/scale" in out
    assert '"role": "node", "add": 3' in out
    assert "governord answers 202" in out or "governord answers 200" in out
    assert f"kept in {tmp_path / 'demo'}" in out
    log = tmp_path / "demo" / "governord" / "governord.log"
    assert log.exists() and "governord ready" in log.read_text()


def test_on_bare_metal_each_host_is_shown_on_its_machine(tmp_path: Path) -> None:
    out = _demo(tmp_path / "demo", "--platform", "ipmi", "--dns", "none")
    rows = [line for line in out.splitlines() if "demo-node-0" in line and "lab.example" in line]
    # the hosts' rows name the pool machine each got, powered on with its OS up
    assert any("power on" in row and "ready" in row for row in rows), "\n".join(rows)
