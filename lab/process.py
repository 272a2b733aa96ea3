"""Start a peer as a child process and wait until it says where it listens.

Every lab peer prints one line ``LISTENING <url>`` on stdout once it accepts connections
(vcsim's own ``export GOVC_URL=...`` line is translated by its launcher). Children run in their
own session so that stopping one also stops anything it started.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(r"LISTENING (\S+)")


def stop_group(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a child started in its own session, and whatever it started: ``sig`` to its process
    group, then SIGKILL if it has not ended within ``timeout`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


@dataclass
class PeerProcess:
    """A running peer: its URL, its process, and where its output goes."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        stop_group(self.process, signal.SIGTERM, timeout)

    def __enter__(self) -> PeerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_peer(
    name: str,
    argv: Sequence[str],
    *,
    pattern: re.Pattern[str] = LISTENING,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log_path: Path | None = None,
) -> tuple[PeerProcess, re.Match[str]]:
    """Spawn ``argv`` and wait for a stdout line matching ``pattern`` (group 1 is the URL).

    stderr goes to ``log_path`` (or is discarded). Raises RuntimeError with the output seen so
    far if the process exits or stays silent for ``timeout`` seconds.
    """
    stderr = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=stderr,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                seen.append(line)
                match = pattern.search(line)
                if match:
                    return PeerProcess(name, match.group(1), proc, log_path), match
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name} did not start ({' '.join(argv)}); output: {' | '.join(seen)[-2000:]}")
