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


class PrivatePostgres:
    """A private PostgreSQL cluster for a benchmark (lab/postgres.py, as the tests' fixture
    starts it), in a directory of its own under the system temp dir (user postgres must be able
    to enter it), removed by :meth:`stop`. :meth:`new_database` makes a fresh database each
    time and returns its URL with the role's password in it, for the benchmark's own reads;
    :meth:`store_sections` turns such a URL into the daemon's ``[store]`` and ``[fleet]``."""

    ROLE = "governord"

    def __init__(self, max_connections: int = 300) -> None:
        import itertools
        import secrets
        import shutil
        import tempfile

        from lab.postgres import start_cluster

        self.directory = Path(tempfile.mkdtemp(prefix="governord-bench-pg-"))
        self.directory.chmod(0o711)
        self._rmtree = shutil.rmtree
        self.password = secrets.token_urlsafe(16)
        self._numbers = itertools.count(1)
        try:
            self.cluster = start_cluster(self.directory / "cluster", max_connections=max_connections)
        except Exception:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def new_database(self) -> str:
        return self.cluster.create_database(f"bench_{os.getpid()}_{next(self._numbers)}", owner=self.ROLE,
                                            password=self.password)

    def stop(self) -> None:
        self.cluster.stop()
        self._rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    #: the daemon's environment variable its config names for the database password
    PASSWORD_ENV = "BENCH_DB_PASSWORD"

    @classmethod
    def store_sections(cls, url: str, instance: str, *, heartbeat: float = 5.0, leader_lease: float = 30.0,
                       pool_size: int = 10) -> tuple[str, dict[str, str]]:
        """``[store]`` on the database of ``url`` and ``[fleet]`` as ``instance``, as TOML, and
        the environment the daemon needs for it (the password, passed by reference)."""
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        bare = parsed._replace(username=None, password=None).render_as_string(hide_password=False)
        text = (f'\n[store]\nurl = "{bare}"\nusername = "{parsed.username}"\n'
                f'password = {{ env = "{cls.PASSWORD_ENV}" }}\npool_size = {pool_size}\n'
                f'\n[fleet]\ninstance = "{instance}"\nheartbeat = {heartbeat}\nleader_lease = {leader_lease}\n')
        return text, {cls.PASSWORD_ENV: parsed.password or ""}


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time so far of a process and its live children (PostgreSQL's postmaster and its
    backends: what the database spent)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def query(database: str | Path, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    """Rows of one read-only query on a daemon's database: a SQLite file (its path) or a
    PostgreSQL URL (with its password). Parameters by name (``:name``) on both."""
    if isinstance(database, Path):
        import sqlite3

        conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, params or {}).fetchall()
        finally:
            conn.close()
    from sqlalchemy import create_engine, text

    engine = _engines.get(database)
    if engine is None:
        engine = _engines[database] = create_engine(database, pool_size=1, max_overflow=2)
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(text(sql), params or {})]


_engines: dict[str, Any] = {}


def drop_state_count_triggers(url: str) -> None:
    """An experiment, never a setting: drop the triggers that keep ``state_counts`` (one row per
    state, changed in the same transaction as every host's change of state), to measure what
    those few rows cost when every writer of every instance updates them. The counts are then
    wrong (the metrics read them); the engine and the decisions do not."""
    from sqlalchemy import create_engine, text

    owner = create_engine(url)
    try:
        with owner.begin() as conn:
            for event in ("insert", "update", "delete"):
                conn.execute(text(f"DROP TRIGGER hosts_state_count_{event} ON hosts"))
    finally:
        owner.dispose()
