"""What the daemon benchmarks share: starting governord as systemd would (notify socket, READY
only once it listens), talking to its admin socket, and reading its process from /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from lab.stack import REPO_ROOT, Governord

#: The daemon the API and memory benchmarks run: the in-process memory provider and registrar
#: (bench.daemon --memory-plugin), so what is measured is governord, not a peer.
DAEMON_CONFIG = """\
[daemon]
state_dir = "{home}/state"
log_level = "{log_level}"

[api]
listen = "127.0.0.1"
port = 0
server_names = ["localhost", "127.0.0.1"]
admin_socket = "{home}/admin.sock"

[engine]
workers = {workers}

[providers.mem]
type = "memory"

[registrars.cmdb]
type = "memory"

[tags.node]
cmdb = {{ group = "nodes", classes = ["openshift::node"] }}

[applications.bench]
max_hosts = {max_hosts}

# the benchmark measures the API's throughput, not the application's rate limit
[applications.bench.rate_limit]
requests_per_second = 100000.0
burst = 100000

[applications.bench.roles.node]
tags = ["node"]
provider = "mem"
name_pattern = "bench-{{seq:07d}}"
domain = "bench.example"
profile = {{ size = "small" }}
"""
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def start_daemon(config: Path, *, module: str = "governord", args: list[str] | None = None,
                 env: dict[str, str] | None = None, timeout: float = 120.0) -> Governord:
    """Start ``python -m MODULE --config CONFIG ARGS`` (``governord`` itself, or
    ``bench.daemon`` for the memory plugin and tracing) and wait for its READY=1."""
    home = config.parent
    notify_path = home / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log = home / "governord.log"
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), **(env or {})}
    with open(log, "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", module, "--config", str(config), *(args or [])],
                                   stdout=log_file, stderr=log_file, env=full_env, cwd=REPO_ROOT,
                                   start_new_session=True)
    daemon = Governord(process, config, home / "admin.sock", home / "state", log, notify, full_env)
    try:
        daemon.wait_notification("READY=1", timeout=timeout)
    except Exception:
        daemon.kill()
        raise
    return daemon


async def admin(daemon: Governord, method: str, path: str, body: Any = None) -> Any:
    """One call to the admin API over its Unix socket; raises unless it answered 2xx."""
    connector = aiohttp.UnixConnector(path=str(daemon.socket))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, f"http://governord{path}", json=body) as resp:
            data = await resp.json()
            if resp.status >= 300:
                raise RuntimeError(f"{method} {path}: {resp.status} {data}")
            return data


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process in MiB, from /proc/PID/status."""
    now = peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return now, peak
