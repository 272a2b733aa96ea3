"""Debian's real Puppet Server + PuppetDB + PostgreSQL as one lab stack, without systemd.

:func:`start_puppet_stack` builds a self-contained stack under one directory: a private
PostgreSQL cluster (run as user ``postgres`` when started by root, ``fsync=off``), an offline CA
(``puppetserver ca setup``) with a ``--ca-client`` certificate for governord (it carries
``pp_cli_auth``, so the stock auth.conf lets it use the CA's admin API), then puppetserver and
PuppetDB JVMs started in parallel with small heaps, each in its own process group. All four
listeners are free loopback ports, so parallel runs never clash. :class:`PuppetStack` is the
handle: URLs, certificate paths, :meth:`PuppetStack.run_agent` (a real ``puppet agent -t`` with
its own ssldir per certname) and :meth:`PuppetStack.stop`.

Helpers for the two policy hooks Puppet runs on the server:

- :func:`write_token_autosign` writes a policy executable that signs a CSR whose
  challengePassword equals ``<workdir>/tokens/<certname>`` (see :func:`challenge_attributes`),
- :func:`write_enc_config` writes the Foreman URL and credentials for :data:`ENC_SCRIPT` (the
  external node classifier that asks Foreman's ``/node/<certname>?format=yml``) and returns the
  ``external_nodes`` command.

Packages come from ``lab/puppet/install.sh``. Measured facts behind the choices are in the
project's reference notes (shared/reference/puppet.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..postgres import PostgresError, postgres_bin, start_cluster
from ..process import stop_group
from .config import (
    JRUBY_LIB,
    PUPPETDB_BOOTSTRAP,
    PUPPETDB_JAR,
    PUPPETSERVER_JAR,
    PUPPETSERVER_SERVICES_D,
    Layout,
    Ports,
    write_agent_conf,
    write_puppet_conf,
    write_puppetdb_conf,
    write_puppetserver_conf,
)

HERE = Path(__file__).resolve().parent
#: the lab's Puppet code (environment ``production``: profile::base, openshift::{node,broker,master})
CODE_DIR = HERE / "code"
#: the external node classifier that asks the Foreman (simulator) for a node's classes
ENC_SCRIPT = HERE / "enc.py"
#: OID of the PKCS#9 challengePassword attribute a CSR carries from csr_attributes.yaml
CHALLENGE_PASSWORD_OID = "1.2.840.113549.1.9.7"
SERVER_CERTNAME = "puppet.lab.example"
GOVERNORD_CERTNAME = "governord.lab.example"
#: names the server certificate must cover: agents connect to 127.0.0.1, people type localhost
SERVER_ALT_NAMES = "DNS:localhost,DNS:puppet,IP:127.0.0.1"
#: JVM options for both services: the C1 compiler only and one GC thread. Measured on a loaded
#: 2-core machine: ready in ~60 s instead of ~130 s; agent runs stay at ~5 s once warm.
JAVA_OPTIONS: tuple[str, ...] = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


class PuppetStackError(RuntimeError):
    """The stack could not be set up or started; the message ends with the relevant log lines."""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _free_ports(count: int) -> list[int]:
    # all sockets stay open until every port is chosen, so the ports are distinct
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def check_installed() -> None:
    """Raise :class:`PuppetStackError` naming what lab/puppet/install.sh must install first."""
    missing = [str(p) for p in (PUPPETSERVER_JAR, PUPPETDB_JAR, PUPPETSERVER_SERVICES_D, PUPPETDB_BOOTSTRAP)
               if not p.exists()]
    missing += [tool for tool in ("java", "puppet", "puppetserver", "openssl") if shutil.which(tool) is None]
    if missing:
        raise PuppetStackError(f"the Puppet lab is not installed (missing {', '.join(missing)}): run lab/puppet/install.sh")
    try:
        postgres_bin()
    except PostgresError as exc:
        raise PuppetStackError(str(exc)) from None


def challenge_attributes(token: str) -> dict[str, Any]:
    """The csr_attributes.yaml content that puts ``token`` into the CSR as its challengePassword."""
    return {"custom_attributes": {CHALLENGE_PASSWORD_OID: token}}


def write_token_autosign(workdir: Path) -> Path:
    """Write a policy-based autosign executable; sign a CSR only if its challengePassword is the token.

    The token for certname ``X`` is the content of ``<workdir>/tokens/X`` (see :func:`add_token`).
    Puppet runs the executable with ``$1`` = certname and the CSR (PEM) on stdin; exit 0 signs.
    """
    tokens = workdir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    tokens.chmod(0o700)
    script = workdir / "bin" / "autosign-token"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/bin/sh\n"
        "# lab autosign policy: $1 = certname, CSR on stdin; sign when the CSR's challengePassword\n"
        "# equals the pre-authorization token stored for that certname\n"
        f"tokens='{tokens}'\n"
        'case "$1" in ""|.*|*/*) exit 1 ;; esac\n'
        'want="$tokens/$1"\n'
        '[ -r "$want" ] || exit 1\n'
        "got=$(openssl req -noout -text 2>/dev/null | sed -n 's/^ *challengePassword *: *//p' | tr -d '\\r')\n"
        '[ -n "$got" ] && [ "$got" = "$(cat "$want")" ]\n',
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def add_token(workdir: Path, certname: str, token: str | None = None) -> str:
    """Pre-authorize ``certname`` for :func:`write_token_autosign`'s policy; returns the token."""
    token = token or secrets.token_urlsafe(16)
    path = workdir / "tokens" / certname
    path.write_text(token, encoding="utf-8")
    path.chmod(0o600)
    return token


def write_enc_config(path: Path, url: str, username: str, password: str, *, python: str | None = None) -> str:
    """Write the ENC's Foreman URL and credentials (mode 0600) and return the ``external_nodes`` command.

    The command names only the config file, never the password: command lines are world-readable.
    Puppet splits ``external_nodes`` on whitespace, so no path in it may contain spaces.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"url": url, "username": username, "password": password}), encoding="utf-8")
    path.chmod(0o600)
    command = f"{python or sys.executable} {ENC_SCRIPT} --config {path}"
    if len(command.split()) != 4:
        raise PuppetStackError(f"paths in the ENC command must not contain spaces: {command!r}")
    return command


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        stop_group(self.process, sig, timeout)


def _spawn(name: str, argv: list[str], log: Path, *, user: str | None = None, cwd: Path | None = None) -> _Child:
    """A child in its own session (not nohup: the JVM must keep its SIGHUP handler for reloads)."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    return _Child(name, process, log)


@dataclass
class PuppetStack:
    """A running puppetserver + PuppetDB + PostgreSQL, and what a client needs to talk to them."""

    workdir: Path
    layout: Layout
    ports: Ports
    server_certname: str
    client_certname: str
    started_in: float
    _children: list[_Child] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def server_url(self) -> str:
        """Puppet Server (master and CA APIs), e.g. ``https://127.0.0.1:PORT``."""
        return f"https://127.0.0.1:{self.ports.puppetserver}"

    @property
    def puppetdb_url(self) -> str:
        """PuppetDB over plain HTTP (no client certificate needed)."""
        return f"http://127.0.0.1:{self.ports.puppetdb_http}"

    @property
    def puppetdb_https_url(self) -> str:
        """PuppetDB over HTTPS; verify with :attr:`ca_bundle`, authenticate with the client cert."""
        return f"https://127.0.0.1:{self.ports.puppetdb_https}"

    @property
    def ca_bundle(self) -> Path:
        """The CA chain (root + intermediate) that signed every certificate of this stack."""
        return self.layout.ca_bundle

    @property
    def crl(self) -> Path:
        return self.layout.crl

    @property
    def client_cert(self) -> Path:
        """governord's certificate: carries ``pp_cli_auth``, so the CA admin API accepts it."""
        return self.layout.cert(self.client_certname)

    @property
    def client_key(self) -> Path:
        return self.layout.key(self.client_certname)

    @property
    def puppet_conf(self) -> Path:
        return self.layout.puppet_conf

    @property
    def codedir(self) -> Path:
        return self.layout.codedir

    @property
    def logs(self) -> dict[str, Path]:
        """Log file of each process, by name (``postgres``, ``puppetserver``, ``puppetdb``)."""
        return {child.name: child.log for child in self._children}

    def ssl_context(self, *, client_cert: bool = True) -> ssl.SSLContext:
        """A stdlib TLS context that trusts this stack's CA (and presents governord's cert)."""
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        if client_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def agent_dir(self, certname: str) -> Path:
        """The directory holding ``certname``'s agent confdir, ssldir and vardir."""
        if not certname or "/" in certname or certname.startswith("."):
            raise ValueError(f"not a usable certname: {certname!r}")
        return self.layout.agents / certname

    def forget_agent(self, certname: str) -> None:
        """Remove the agent's local state (key, cert, cache), as a rebuilt machine would have none."""
        shutil.rmtree(self.agent_dir(certname), ignore_errors=True)

    def run_agent(
        self,
        certname: str,
        *,
        csr_attributes: Mapping[str, Any] | None = None,
        environment: str = "production",
        timeout: float = 120.0,
        extra_args: list[str] | None = None,
    ) -> tuple[int, str]:
        """Run ``puppet agent -t`` once as host ``certname``; return (exit code, combined output).

        Each certname has its own confdir/ssldir/vardir under ``workdir/agents``. ``csr_attributes``
        is written to its csr_attributes.yaml (used when the agent makes its CSR, i.e. on its first
        run). ``--waitforcert 0``: an unsigned agent exits 1 at once. With ``-t``'s detailed exit
        codes, 0 means no changes, 2 changes applied, 1/4/6 failures.
        """
        base = self.agent_dir(certname)
        confdir = base / "etc"
        write_agent_conf(confdir, certname=certname, port=self.ports.puppetserver, base=base)
        attributes = confdir / "csr_attributes.yaml"
        if csr_attributes is not None:
            # JSON is YAML, and needs no YAML library here
            attributes.write_text(json.dumps(csr_attributes), encoding="utf-8")
            attributes.chmod(0o600)
        argv = [
            "puppet", "agent", "--test",
            "--confdir", str(confdir),
            "--certname", certname,
            "--server", "127.0.0.1",
            "--serverport", str(self.ports.puppetserver),
            "--environment", environment,
            "--waitforcert", "0",
            "--http_keepalive_timeout", "0",
            *(extra_args or []),
        ]
        try:
            result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                    timeout=timeout, check=False, start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or "") if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
            raise TimeoutError(f"puppet agent for {certname} ran longer than {timeout}s: {output[-2000:]}") from None
        return result.returncode, result.stdout + result.stderr

    def stop(self) -> None:
        """Stop both JVMs (in parallel), then PostgreSQL. Idempotent."""
        with self._lock:
            jvms = [c for c in self._children if c.name != "postgres"]
            threads = [threading.Thread(target=c.stop) for c in jvms]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for child in self._children:
                if child.name == "postgres":
                    # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients
                    child.stop(signal.SIGINT)

    def describe(self) -> dict[str, Any]:
        """What a client needs, as JSON-able values (``python -m lab.puppet`` writes it to stack.json)."""
        return {
            "server_url": self.server_url,
            "puppetdb_url": self.puppetdb_url,
            "puppetdb_https_url": self.puppetdb_https_url,
            "ca_bundle": str(self.ca_bundle),
            "crl": str(self.crl),
            "client_certname": self.client_certname,
            "client_cert": str(self.client_cert),
            "client_key": str(self.client_key),
            "server_certname": self.server_certname,
            "puppet_conf": str(self.puppet_conf),
            "logs": {name: str(path) for name, path in self.logs.items()},
            "pids": self.pids(),
        }

    def pids(self) -> dict[str, int]:
        """Process id of each running process, by name."""
        return {c.name: c.process.pid for c in self._children if c.process.poll() is None}

    def __enter__(self) -> PuppetStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(argv: list[str], what: str, *, env: Mapping[str, str] | None = None, user: str | None = None,
         timeout: float = 120.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                            env={**os.environ, **(env or {})}, user=user, group=user,
                            extra_groups=[] if user else None)
    if result.returncode != 0:
        raise PuppetStackError(f"{what} failed ({result.returncode}): {(result.stdout + result.stderr).strip()[-3000:]}")
    return result.stdout


def _start_postgres(layout: Layout, ports: Ports, db_password: str) -> _Child:
    """PuppetDB's database, on a private cluster of its own (lab/postgres.py)."""
    try:
        cluster = start_cluster(layout.postgres_dir, port=ports.postgres, log=layout.logs / "postgres.log")
    except PostgresError as exc:
        raise PuppetStackError(str(exc)) from None
    try:
        # PuppetDB's schema needs pg_trgm, and only a superuser may create it
        cluster.create_database("puppetdb", owner="puppetdb", password=db_password, extensions=["pg_trgm"])
    except PostgresError as exc:
        cluster.stop()
        raise PuppetStackError(str(exc)) from None
    return _Child("postgres", cluster.process, cluster.log)


def _setup_ca(layout: Layout, server_certname: str, client_certname: str) -> None:
    conf = str(layout.puppet_conf)
    _run(["puppetserver", "ca", "setup", "--config", conf, "--certname", server_certname,
          "--subject-alt-names", SERVER_ALT_NAMES], "puppetserver ca setup")
    # offline, before the server runs: a cert with pp_cli_auth, which the stock auth.conf lets
    # use certificate_status, certificate_statuses and clean
    _run(["puppetserver", "ca", "generate", "--config", conf, "--certname", client_certname, "--ca-client"],
         "puppetserver ca generate --ca-client")
    for path in (layout.cert(server_certname), layout.key(server_certname), layout.ca_bundle,
                 layout.cert(client_certname), layout.key(client_certname)):
        if not path.exists():
            raise PuppetStackError(f"the offline CA setup did not write {path}")


def _java_args(layout: Layout, name: str, heap: str, options: Sequence[str]) -> list[str]:
    return ["java", f"-Xmx{heap}", "-Djava.security.egd=file:/dev/urandom", "-XX:+CrashOnOutOfMemoryError",
            f"-XX:ErrorFile={layout.logs / (name + '_err_pid%p.log')}", *options]


def _get(url: str, context: ssl.SSLContext | None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:  # noqa: S310 - loopback only
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(children: list[tuple[_Child, str, ssl.SSLContext | None]], deadline: float) -> None:
    """Poll each child's status URL until it says running; fail fast if a process exits."""
    pending = list(children)
    while pending:
        for item in list(pending):
            child, url, context = item
            if child.process.poll() is not None:
                raise PuppetStackError(f"{child.name} exited ({child.process.returncode}):\n{_tail(child.log)}")
            try:
                status, body = _get(url, context)
            except (OSError, urllib.error.URLError):
                continue
            text = body.decode(errors="replace")
            if status == 200 and ("running" in text):
                pending.remove(item)
        if pending and time.monotonic() > deadline:
            names = ", ".join(c.name for c, _, _ in pending)
            raise PuppetStackError(f"{names} not ready in time:\n" + "\n".join(_tail(c.log) for c, _, _ in pending))
        if pending:
            time.sleep(0.5)


def start_puppet_stack(
    workdir: str | os.PathLike[str],
    *,
    autosign_command: str | None,
    enc_command: str | None,
    code_dir: Path = CODE_DIR,
    server_certname: str = SERVER_CERTNAME,
    client_certname: str = GOVERNORD_CERTNAME,
    server_heap: str = "512m",
    puppetdb_heap: str = "512m",
    java_options: Sequence[str] = JAVA_OPTIONS,
    timeout: float = 240.0,
) -> PuppetStack:
    """Set up and start a whole stack under ``workdir`` (empty or new) and return it once both answer.

    ``autosign_command``: the server's ``autosign`` setting (a policy executable such as
    :func:`write_token_autosign`'s, or an autosign.conf path); None disables autosigning.
    ``enc_command``: the ``external_nodes`` command (with ``node_terminus = exec``), e.g. from
    :func:`write_enc_config`; None keeps the plain node terminus (site.pp only).
    Takes about a minute. On failure everything started is stopped and :class:`PuppetStackError`
    carries the log tail.
    """
    check_installed()
    started = time.monotonic()
    layout = Layout(Path(workdir).resolve())
    if layout.puppet_conf.exists():
        raise PuppetStackError(f"{layout.root} already holds a stack; use a fresh directory")
    layout.make_dirs()
    shutil.copytree(code_dir, layout.codedir)
    ports = Ports(*_free_ports(4))
    db_password = secrets.token_urlsafe(16)
    write_puppet_conf(layout, ports, server_certname=server_certname, autosign=autosign_command, enc_command=enc_command)
    ps_conf = write_puppetserver_conf(layout, ports)
    pdb_conf = write_puppetdb_conf(layout, ports, server_certname=server_certname, db_password=db_password)

    stack = PuppetStack(layout.root, layout, ports, server_certname, client_certname, 0.0)
    pg_result: list[_Child | BaseException] = []

    def postgres() -> None:
        try:
            pg_result.append(_start_postgres(layout, ports, db_password))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            pg_result.append(exc)

    pg_thread = threading.Thread(target=postgres, name="lab-postgres")
    pg_thread.start()
    try:
        _setup_ca(layout, server_certname, client_certname)
        stack._children.append(_spawn(
            "puppetserver",
            [*_java_args(layout, "puppetserver", server_heap, java_options), "-Xms256m",
             "-Djruby.logger.class=com.puppetlabs.jruby_utils.jruby.Slf4jLogger", f"-Djruby.lib={JRUBY_LIB}",
             "-jar", str(PUPPETSERVER_JAR), "--config", str(ps_conf),
             "--bootstrap-config", str(PUPPETSERVER_SERVICES_D),
             "--restart-file", str(layout.rundir / "puppetserver.restart")],
            layout.logs / "puppetserver.log",
            cwd=layout.root,
        ))
        pg_thread.join()
        outcome = pg_result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        stack._children.insert(0, outcome)
        stack._children.append(_spawn(
            "puppetdb",
            [*_java_args(layout, "puppetdb", puppetdb_heap, java_options),
             "-cp", str(PUPPETDB_JAR), "clojure.main", "-m", "puppetlabs.puppetdb.core", "services",
             "--config", str(pdb_conf), "--bootstrap-config", str(PUPPETDB_BOOTSTRAP),
             "--restart-file", str(layout.rundir / "puppetdb.restart")],
            layout.logs / "puppetdb.log",
            cwd=layout.root,
        ))
        server_context = ssl.create_default_context(cafile=str(layout.ca_bundle))
        by_name = {c.name: c for c in stack._children}
        _wait_ready(
            [(by_name["puppetserver"], f"{stack.server_url}/status/v1/simple", server_context),
             (by_name["puppetdb"], f"{stack.puppetdb_url}/status/v1/services/puppetdb-status", None)],
            started + timeout,
        )
    except BaseException:
        pg_thread.join()
        for outcome in pg_result:
            if isinstance(outcome, _Child) and outcome not in stack._children:
                stack._children.insert(0, outcome)
        stack.stop()
        raise
    stack.started_in = time.monotonic() - started
    return stack


__all__ = [
    "CHALLENGE_PASSWORD_OID",
    "CODE_DIR",
    "ENC_SCRIPT",
    "GOVERNORD_CERTNAME",
    "SERVER_CERTNAME",
    "PuppetStack",
    "PuppetStackError",
    "add_token",
    "challenge_attributes",
    "check_installed",
    "start_puppet_stack",
    "write_enc_config",
    "write_token_autosign",
]
