"""A private PostgreSQL cluster (Debian's server binaries), without systemd.

:func:`start_cluster` runs ``initdb`` in a directory of its own and starts ``postgres`` on a free
127.0.0.1 port (no Unix socket, ``fsync=off``: a throw-away lab database), as user ``postgres``
when started by root (PostgreSQL refuses to run as root). :class:`PostgresCluster` is the handle:
:meth:`PostgresCluster.create_database` makes a role and a database and returns their URL,
:meth:`PostgresCluster.stop` shuts the server down and :meth:`PostgresCluster.start` starts it
again on the same data and port (an outage, for the store's tests). The Puppet lab (lab/puppet) runs PuppetDB's
database on one; the store's tests run governord on one (tests/fixtures/postgres.py).

The packages come from ``lab/puppet/install.sh`` (``postgresql``), which ``make deps`` runs.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .process import stop_group

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(RuntimeError):
    """The cluster could not be set up or started; the message ends with the relevant output."""


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise PostgresError("PostgreSQL is not installed: run lab/puppet/install.sh")
    return versions[-1].parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def postgres_user(directory: Path) -> str | None:
    """The user PostgreSQL runs as: ``postgres`` when we are root (it refuses root), else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError("user postgres does not exist: run lab/puppet/install.sh") from None
    probe = subprocess.run(["test", "-x", str(directory)], user="postgres", group="postgres", extra_groups=[],
                           check=False)
    if probe.returncode != 0:
        raise PostgresError(
            f"user postgres cannot reach {directory}: the directory and its parents must be "
            "searchable by others (e.g. a directory made with tempfile.mkdtemp() and chmod 0711)"
        )
    return "postgres"


def _run(argv: list[str], what: str, *, env: Mapping[str, str] | None = None, user: str | None = None,
         timeout: float = 120.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, **(env or {})}, user=user, group=user,
                            extra_groups=[] if user else None)
    if result.returncode != 0:
        raise PostgresError(f"{what} failed ({result.returncode}): {(result.stdout + result.stderr).strip()[-3000:]}")
    return result.stdout


@dataclass
class PostgresCluster:
    """A running private cluster: superuser ``postgres`` (password auth, scram-sha-256)."""

    directory: Path
    port: int
    superuser_password: str
    process: subprocess.Popen[bytes]
    log: Path
    bindir: Path = field(default_factory=postgres_bin)
    max_connections: int = 40
    #: the user the server runs as (see :func:`postgres_user`)
    user: str | None = None

    def url(self, database: str, user: str, password: str, *, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def psql(self, database: str, *commands: str) -> str:
        """Run SQL commands as the superuser; their output (unaligned, tuples only)."""
        argv = [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
                "-v", "ON_ERROR_STOP=1", "-qAt"]
        for command in commands:
            argv += ["-c", command]
        return _run(argv, f"psql on {database}", env={"PGPASSWORD": self.superuser_password, "PGCONNECT_TIMEOUT": "2"})

    def create_database(self, name: str, *, owner: str, password: str, extensions: Sequence[str] = ()) -> str:
        """Make role ``owner`` (LOGIN, ``password``) unless it exists, and database ``name`` it
        owns (with ``extensions``, which only a superuser may create); returns the database's
        URL for SQLAlchemy with psycopg."""
        for identifier in (name, owner, *extensions):
            if not _NAME.fullmatch(identifier):
                raise PostgresError(f"not a plain lower-case SQL name: {identifier!r}")
        quoted = password.replace("'", "''")
        if not self.psql("postgres", f"SELECT 1 FROM pg_roles WHERE rolname = '{owner}'").strip():
            self.psql("postgres", f"CREATE ROLE {owner} LOGIN PASSWORD '{quoted}'")
        self.psql("postgres", f"CREATE DATABASE {name} OWNER {owner} TEMPLATE template0")
        for extension in extensions:
            self.psql(name, f"CREATE EXTENSION {extension}")
        return self.url(name, owner, password)

    def drop_database(self, name: str) -> None:
        if not _NAME.fullmatch(name):
            raise PostgresError(f"not a plain lower-case SQL name: {name!r}")
        self.psql("postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> None:
        """Shut the server down (SIGINT: PostgreSQL's fast shutdown, clients are disconnected)."""
        stop_group(self.process, sig, timeout)

    def start(self, timeout: float = 30.0) -> None:
        """Start the stopped server again, on the same data directory and port; returns once it
        accepts connections. Its databases, roles and passwords are as they were."""
        if self.running():
            raise PostgresError(f"postgres is still running (pid {self.process.pid})")
        self.process = _launch(self.bindir, self.directory / "data", self.port, self.log, self.max_connections,
                               self.user)
        self._wait_accepting(timeout)

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise PostgresError(f"postgres exited ({self.process.returncode}):\n{_tail(self.log)}")
            try:
                self.psql("postgres", "select 1")
                return
            except PostgresError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise PostgresError(f"postgres did not accept connections:\n{_tail(self.log)}") from None
            time.sleep(0.2)

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cluster(directory: str | os.PathLike[str], *, port: int | None = None, log: Path | None = None,
                  max_connections: int = 40, timeout: float = 30.0) -> PostgresCluster:
    """Make a new cluster in ``directory`` (created; its ``data`` must not exist yet) and start it
    on ``port`` (default: a free one) of 127.0.0.1. ``log``: the server's log (default
    ``directory/postgres.log``). Returns once it accepts connections."""
    bindir = postgres_bin()
    pg = Path(directory).resolve()
    pg.mkdir(parents=True, exist_ok=True)
    user = postgres_user(pg)
    superuser_password = secrets.token_urlsafe(16)
    pwfile = pg / "pwfile"
    pwfile.write_text(superuser_password + "\n", encoding="utf-8")
    pwfile.chmod(0o600)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(pg, entry.pw_uid, entry.pw_gid)
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    data = pg / "data"
    try:
        _run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
              f"--pwfile={pwfile}", "-E", "UTF8", "--no-locale", "--no-sync"], "initdb", user=user)
    finally:
        pwfile.unlink(missing_ok=True)
    log = log or pg / "postgres.log"
    port = port or free_port()
    process = _launch(bindir, data, port, log, max_connections, user)
    cluster = PostgresCluster(pg, port, superuser_password, process, log, bindir, max_connections, user)
    cluster._wait_accepting(timeout)
    return cluster


def _launch(bindir: Path, data: Path, port: int, log: Path, max_connections: int,
            user: str | None) -> subprocess.Popen[bytes]:
    """Start ``postgres`` on ``data``, listening on ``port`` of 127.0.0.1, its output appended to ``log``."""
    with open(log, "ab") as out:
        # its own session, so stop() signals the server and nothing else
        return subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
             # a throw-away lab database: durability only costs time
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", f"max_connections={max_connections}", "-c", "shared_buffers=32MB"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            user=user, group=user, extra_groups=[] if user else None,
        )


__all__ = ["PostgresCluster", "PostgresError", "free_port", "postgres_bin", "postgres_user", "start_cluster"]
