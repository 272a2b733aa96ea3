"""The whole lab on one machine: vcsim, the Foreman and Satellite simulators, and governord
itself as a real process (with a systemd-style notify socket), plus views of "the other side"
(what exists in vSphere, Foreman and Satellite) for tests and the demo.

    with Lab(workdir) as lab:
        lab.start_peers()
        daemon = lab.start_governord()
        lab.ctl("scale", "demo", "node", "--add", "3", "--wait")

``Lab(workdir, faults=FaultSettings(...))`` puts a fault-injecting proxy (lab.faultproxy) in front of
vcsim and both simulators: configs written then point governord at the proxies (with its call
timeouts shortened to the settings' ``client_timeout``), while the lab's own views of the other
side (``vsphere_vms``, ``foreman_hosts``, ``satellite_systems``) still ask the peers directly.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import resource
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import xmlrpc.client
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import vcsim
from .faultproxy import FaultSettings, proxy_stats, start_faultproxy
from .platforms import PLATFORMS, Platform
from .process import PeerProcess, start_peer

REPO_ROOT = Path(__file__).resolve().parents[1]

CONFIG_TEMPLATE = """\
# governord configuration for the local lab (written by lab/stack.py)
[daemon]
state_dir = "{state_dir}"
log_level = "info"
shutdown_grace = 10.0

[api]
listen = "127.0.0.1"
port = 0
server_names = ["localhost", "127.0.0.1"]
admin_socket = "{socket}"
admin_socket_mode = "0600"
autosign_socket = "{autosign_socket}"
autosign_socket_mode = "0600"

[engine]
workers = {workers}
lease_seconds = {lease_seconds}
retry_backoff = {retry_backoff}
retry_backoff_max = {retry_backoff_max}
retry_limit = {retry_limit}
hook_timeout = 120.0
ready_poll_interval = 1.0
{engine_extra}
[networks.lab]
cidr = "198.51.100.0/24"
first = "198.51.100.10"
last = "198.51.100.250"
gateway = "198.51.100.1"
dns_servers = ["198.51.100.2"]
domain = "lab.example"

[providers.{provider}]
{provider_section}
[registrars.foreman]
type = "foreman"
url = "{foreman_url}"
username = "admin"
password = {{ env = "LAB_FOREMAN_PASSWORD" }}
verify_tls = false
organization = "Governor Lab"
location = "Lab"
puppet_environment = "production"
{registrar_extra}{foreman_extra}
[registrars.satellite]
type = "satellite"
url = "{satellite_url}"
username = "admin"
password = {{ env = "LAB_SATELLITE_PASSWORD" }}
verify_tls = false
{registrar_extra}
[tags.broker]
description = "OpenShift broker"
foreman = {{ hostgroup = "openshift/broker", puppet_classes = ["profile::base", "openshift::broker"], parameters = {{ openshift_role = "broker" }} }}
satellite = {{ system_group = "openshift-brokers", activation_key = "1-openshift-broker" }}

[tags.node]
description = "OpenShift node"
foreman = {{ hostgroup = "openshift/node", puppet_classes = ["profile::base", "openshift::node"], parameters = {{ openshift_role = "node" }} }}
satellite = {{ system_group = "openshift-nodes", activation_key = "1-openshift-node" }}

[applications.demo]
description = "The demo OpenShift platform"
max_hosts = {max_hosts}

[applications.demo.roles.node]
tags = ["node"]
provider = "{provider}"
{network_line}domain = "lab.example"
name_pattern = "demo-node-{{seq:02d}}"
profile = {profile}
"""

#: the Puppet class parameter a node group's host gets its providerID in (the lab's openshift::node
#: declares it, and the Foreman simulator's seed has it as a smart class parameter)
PROVIDER_ID_CLASS_PARAMETER = "openshift::node::provider_id"

#: the Cluster Autoscaler's provider on a free loopback port (STATE_DIR/autoscaler.port)
AUTOSCALER = """
[autoscaler]
listen = "127.0.0.1"
port = 0
node_groups = ["demo/node"]
gpu_types = ["nvidia-tesla-t4"]
"""


@dataclass
class Governord:
    """A governord daemon process started by the lab."""

    process: subprocess.Popen[bytes]
    config: Path
    socket: Path
    state_dir: Path
    log: Path
    notify: socket.socket
    env: dict[str, str]
    notifications: list[str] = field(default_factory=list)
    #: its store when that is PostgreSQL (``[store] url``); None: the SQLite file in its state dir
    store: PostgresView | None = None

    def read_notifications(self, timeout: float = 0.0) -> list[str]:
        if self.notify.fileno() == -1:
            return self.notifications
        self.notify.settimeout(timeout if timeout > 0 else 0.001)
        while True:
            try:
                data = self.notify.recv(4096).decode()
            except (BlockingIOError, TimeoutError):
                return self.notifications
            self.notifications.extend(data.split("\n"))
            self.notify.settimeout(0.001)

    def wait_notification(self, wanted: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.notifications:
            if self.process.poll() is not None:
                raise RuntimeError(f"governord exited {self.process.returncode}; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {wanted} from governord; log:\n{self.log_tail()}")
            self.read_notifications(0.2)

    def is_ready(self) -> bool:
        """Has it said READY=1 yet? (Asks without waiting.)"""
        return "READY=1" in self.read_notifications()

    @property
    def api_port(self) -> int:
        return int((self.state_dir / "api.port").read_text())

    @property
    def autoscaler_port(self) -> int:
        return int((self.state_dir / "autoscaler.port").read_text())

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.notify.fileno() != -1:
            self.read_notifications(0.1)
            self.notify.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        if self.notify.fileno() != -1:
            self.notify.close()

    def ctl(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run governord-ctl against this daemon's admin socket."""
        result = subprocess.run(
            [sys.executable, "-m", "governord.ctl", "--socket", str(self.socket), *args],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"},
            cwd=self.config.parent,  # where `apps register` writes the certificate and key it is handed
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"governord-ctl {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def ctl_json(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def admin_get(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        """GET ``path`` on the admin socket (e.g. ``/metrics``): the status and the body."""
        connection = _UnixHTTPConnection(str(self.socket), timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    def db_rows(self, table: str) -> list[dict[str, Any]]:
        """Rows of one of governord's tables (see :meth:`db_query`)."""
        if not re.fullmatch(r"[a-z_]+", table):
            raise ValueError(f"not a table name: {table!r}")
        return self.db_query(f"SELECT * FROM {table}")  # noqa: S608 - checked name

    def db_query(self, sql: str, params: Mapping[str, Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Run a query on governord's database, read-only: works while the daemon runs, after it
        died, and before it made its tables (no rows then). On SQLite (the file in its state
        dir, WAL-aware) parameters are ``?`` or ``:name``; on PostgreSQL (:class:`PostgresView`)
        ``:name`` only. Either way JSON columns come back as their text."""
        if self.store is not None:
            if not isinstance(params, Mapping):
                if params:
                    raise TypeError("on PostgreSQL, pass the query's parameters by name (:name and a mapping)")
                params = {}
            return self.store.query(sql, params)
        path = self.state_dir / "governord.db"
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(sql, params)]
        except sqlite3.OperationalError:
            return []  # not migrated yet
        finally:
            conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the admin API's)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class PostgresView:
    """governord's tables in a PostgreSQL database, read through SQLAlchemy the way
    :meth:`Governord.db_query` reads the SQLite file: rows as dicts, JSON columns as their text
    (as SQLite returns them), no rows from a table not made yet. One per database, shared by the
    instances on it; :meth:`close` ends its connections."""

    def __init__(self, url: str) -> None:
        from sqlalchemy import create_engine, event

        self.url = url
        self.engine = create_engine(url, pool_size=2, max_overflow=4, pool_pre_ping=True)
        event.listen(self.engine, "connect", _json_as_text)

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        from sqlalchemy import text
        from sqlalchemy.exc import ProgrammingError

        try:
            with self.engine.connect() as conn:
                return [dict(row) for row in conn.execute(text(sql), dict(params or {})).mappings()]
        except ProgrammingError as exc:
            if "UndefinedTable" in type(exc.orig).__name__:
                return []  # not migrated yet
            raise

    def close(self) -> None:
        self.engine.dispose()


def _json_as_text(dbapi_connection: Any, _record: Any) -> None:
    """psycopg decodes json and jsonb; the lab's readers expect the text, as SQLite gives it."""
    from psycopg.types.string import TextLoader

    for name in ("json", "jsonb"):
        dbapi_connection.adapters.register_loader(name, TextLoader)


class Lab:
    """The lab's peers and, on demand, governord itself."""

    def __init__(self, workdir: Path, *, faults: FaultSettings | None = None) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.peers: list[PeerProcess] = []
        #: what the fault proxies inject (None: governord talks to the peers directly)
        self.faults = faults
        #: peer URL -> the fault proxy in front of it
        self.fronts: dict[str, PeerProcess] = {}
        self.daemons: list[Governord] = []
        self.passwords = {
            "LAB_VCSIM_PASSWORD": secrets.token_urlsafe(12),
            "LAB_FOREMAN_PASSWORD": secrets.token_urlsafe(12),
            "LAB_SATELLITE_PASSWORD": secrets.token_urlsafe(12),
        }
        self.vcsim: PeerProcess | None = None
        self.foreman: PeerProcess | None = None
        self.satellite: PeerProcess | None = None
        self.inventory: vcsim.LabInventory | None = None
        self.platform: Platform | None = None
        #: the Puppet stack (lab.puppet.PuppetStack), once started
        self.puppet: Any = None
        #: the DNS server (lab.dns.DnsServer: BIND or PowerDNS), once started
        self.dns: Any = None
        #: extra clean-ups (platform labs that are not single peers)
        self.stoppers: list[Callable[[], None]] = []
        self.repo_root = REPO_ROOT
        #: configs written with a PostgreSQL store: the view of that database and the daemon's
        #: environment for it (the password)
        self._stores: dict[Path, tuple[PostgresView, dict[str, str]]] = {}
        self._views: dict[str, PostgresView] = {}

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.kill()
        for stop in reversed(self.stoppers):
            stop()
        for peer in reversed(self.peers):
            peer.stop()
        for view in self._views.values():
            view.close()

    # -- peers --------------------------------------------------------------------------------

    def start_peers(self, platform: str = "vsphere") -> None:
        """Start the Foreman and Satellite simulators and one platform (vcsim by default)."""
        self.start_foreman()
        self.start_satellite()
        self.start_platform(platform)

    def start_vcsim(self, name: str = "vcsim", *, delay_ms: int = 0,
                    method_delays: dict[str, int] | None = None,
                    task_delays: dict[str, int] | None = None) -> PeerProcess:
        """Start a vcsim with the lab inventory; the first one is the lab's own. ``delay_ms``
        slows every SOAP call (to land a kill in the middle of one); ``method_delays`` slows the
        calls of single methods, e.g. ``{"CloneVM_Task": 8000}``: vcsim waits that long before it
        runs the call (the clone is made only then); ``task_delays`` makes tasks take time, e.g.
        ``{"CloneVM_Task": 20000}``: the call answers at once and its task stays queued that many
        milliseconds (lab/vcsim/taskdelay.go)."""
        extra_args = [f"-delay={delay_ms}"] if delay_ms else []
        extra_args += [f"-method-delay={method}={ms}" for method, ms in (method_delays or {}).items()]
        extra_args += [f"-task-delay={method}={ms}" for method, ms in (task_delays or {}).items()]
        peer = vcsim.start_vcsim(
            username="governord", password=self.passwords["LAB_VCSIM_PASSWORD"], log_path=self.workdir / f"{name}.log",
            extra_args=extra_args or None,
        )
        self.peers.append(peer)
        inventory = vcsim.prepare_lab(peer.url, "governord", self.passwords["LAB_VCSIM_PASSWORD"])
        if self.vcsim is None:
            self.vcsim, self.inventory = peer, inventory
        self._front(peer, name)
        return peer

    def _front(self, peer: PeerProcess, name: str) -> None:
        """With faults on, start a fault proxy in front of ``peer`` (its own seed, derived from
        the lab's and the peer's name, so each peer's fault sequence is replayable on its own)."""
        if self.faults is None:
            return
        seed = self.faults.seed * 1000 + zlib.crc32(name.encode()) % 1000
        proxy = start_faultproxy(peer, self.faults, seed=seed, workdir=self.workdir)
        self.peers.append(proxy)
        self.fronts[peer.url] = proxy

    def url_for(self, peer: PeerProcess) -> str:
        """Where governord reaches ``peer``: through its fault proxy, if it has one."""
        proxy = self.fronts.get(peer.url)
        return proxy.url if proxy is not None else peer.url

    def fault_stats(self) -> dict[str, dict[str, Any]]:
        """Per fronted peer: requests seen and faults injected, from its proxy."""
        return {proxy.name.removeprefix("faultproxy-"): proxy_stats(proxy) for proxy in self.fronts.values()}

    def _start_simulator(self, module: str, password: str) -> PeerProcess:
        name = module.removeprefix("lab.").replace("_", "-")
        peer, _ = start_peer(
            name,
            [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0", "--username", "admin",
             f"--password={password}"],  # one argument: a password may start with "-"
            cwd=REPO_ROOT, log_path=self.workdir / f"{name}.log",
        )
        self.peers.append(peer)
        self._front(peer, name)
        return peer

    def start_foreman(self) -> PeerProcess:
        self.foreman = self._start_simulator("lab.foreman_sim", self.passwords["LAB_FOREMAN_PASSWORD"])
        return self.foreman

    def start_satellite(self) -> PeerProcess:
        self.satellite = self._start_simulator("lab.satellite_sim", self.passwords["LAB_SATELLITE_PASSWORD"])
        return self.satellite

    # -- governord ------------------------------------------------------------------------------

    def write_config(self, instance: str = "governord", *, workers: int = 8, max_hosts: int = 10,
                     retry_limit: int = 5, retry_backoff: float = 0.5, retry_backoff_max: float = 5.0,
                     platform: Platform | None = None, on_permanent_failure: str | None = None,
                     lease_seconds: float = 30.0, store_url: str | None = None, heartbeat: float = 1.0,
                     leader_lease: float = 4.0, extra: str = "", autoscaler: bool = False) -> Path:
        """Write a config for a governord instance whose files live in ``workdir/instance``,
        provisioning on ``platform`` (default: the lab's vcsim); with ``autoscaler``, the Cluster
        Autoscaler's gRPC provider too, for the node group demo/node. Behind fault proxies, every
        provider and registrar call times out after the fault settings' ``client_timeout``.

        ``store_url`` (a PostgreSQL URL with its credentials, as tests/fixtures/postgres.py makes
        them): the store is that database, the password passed by reference (the daemon's
        environment, which :meth:`start_governord` sets), and the instance joins the fleet on it
        as ``[fleet] instance = instance`` with the given ``heartbeat`` and ``leader_lease``.
        ``extra``: TOML appended as it is (more tables)."""
        assert self.foreman and self.satellite
        platform = platform or self.platform or self.start_platform("vsphere")
        home = self.workdir / instance
        home.mkdir(parents=True, exist_ok=True)
        path = home / "governord.toml"
        provider_section = platform.provider_section.strip()
        registrar_extra = ""
        if self.faults is not None:
            for upstream, proxy in self.fronts.items():
                provider_section = provider_section.replace(f'"{upstream}"', f'"{proxy.url}"')
            timeout = f"call_timeout = {self.faults.client_timeout}"
            provider_section = re.sub(r"(?m)^call_timeout = .*$", timeout, provider_section)
            if timeout not in provider_section:
                provider_section += "\n" + timeout
            registrar_extra = timeout + "\n"
        engine_extra = f'on_permanent_failure = "{on_permanent_failure}"\n' if on_permanent_failure else ""
        path.write_text(CONFIG_TEMPLATE.format(
            state_dir=home / "state", socket=home / "admin.sock", autosign_socket=home / "autosign.sock",
            workers=workers, retry_limit=retry_limit,
            retry_backoff=retry_backoff, retry_backoff_max=retry_backoff_max,
            provider=platform.provider, provider_section=provider_section,
            network_line=f'network = "{platform.network}"\n' if platform.network else "",
            profile=platform.profile, foreman_url=self.url_for(self.foreman),
            satellite_url=self.url_for(self.satellite), max_hosts=max_hosts, engine_extra=engine_extra,
            registrar_extra=registrar_extra, lease_seconds=lease_seconds,
            # a node group's host also gets its providerID as openshift::node's class parameter
            foreman_extra=f'provider_id_parameter = "{PROVIDER_ID_CLASS_PARAMETER}"\n' if autoscaler else "",
        ) + (self._puppet_registrars() if self.puppet is not None else "")
          + (self._dns_registrar() if self.dns is not None else "") + (AUTOSCALER if autoscaler else "")
          + (self._fleet_sections(path, instance, store_url, heartbeat, leader_lease) if store_url else "")
          + extra)
        return path

    def postgres_view(self, url: str) -> PostgresView:
        """The lab's view of a PostgreSQL database (one per URL, closed with the lab)."""
        if url not in self._views:
            self._views[url] = PostgresView(url)
        return self._views[url]

    def _fleet_sections(self, config: Path, instance: str, store_url: str, heartbeat: float,
                        leader_lease: float) -> str:
        """``[store]`` on PostgreSQL and ``[fleet]``; remembers the database for the daemon's
        environment and for :attr:`Governord.store`."""
        from sqlalchemy.engine import make_url

        url = make_url(store_url)
        self._stores[config] = (self.postgres_view(store_url), {"GOVERNORD_DB_PASSWORD": url.password or ""})
        bare = url._replace(username=None, password=None).render_as_string(hide_password=False)
        return f"""
[store]
url = "{bare}"
username = "{url.username}"
password = {{ env = "GOVERNORD_DB_PASSWORD" }}
pool_size = 4

[fleet]
instance = "{instance}"
heartbeat = {heartbeat}
leader_lease = {leader_lease}
"""

    def start_puppet(self) -> Any:
        """Start Debian's puppetserver and PuppetDB (lab.puppet) with Foreman (the lab's simulator)
        as the ENC and governord's own autosign policy; configs written afterwards add the
        puppetca and puppetdb registrars. The lab's workdir must be enterable by the postgres
        user (mode 0711 on the way down)."""
        from .puppet import start_puppet_stack, write_enc_config

        assert self.foreman, "start the Foreman simulator first: it is the ENC"
        policy = self.workdir / "autosign"
        # Puppet runs the policy with the certname as $1 and the CSR on stdin; it asks on the
        # autosign socket (the default instance's), which answers nothing else
        policy.write_text(f'#!/bin/sh\nGOVERNORD_AUTOSIGN_SOCKET={self.autosign_socket()} '
                          f'exec {Path(sys.executable).parent / "governord-autosign"} -- "$1"\n')
        policy.chmod(0o755)
        enc = write_enc_config(self.workdir / "enc.conf", self.foreman.url, "admin",
                               self.passwords["LAB_FOREMAN_PASSWORD"])
        self.puppet = start_puppet_stack(self.workdir / "puppet", autosign_command=str(policy), enc_command=enc)
        self.stoppers.append(self.puppet.stop)
        return self.puppet

    def autosign_socket(self, instance: str = "governord") -> Path:
        """The autosign socket of the governord ``instance`` configs written by :meth:`write_config` name."""
        return self.workdir / instance / "autosign.sock"

    def _puppet_registrars(self) -> str:
        stack = self.puppet
        return f"""
[registrars.puppetca]
type = "puppetca"
url = "{stack.server_url}"
ca_file = "{stack.ca_bundle}"
client_cert = "{stack.client_cert}"
client_key = "{stack.client_key}"
puppet_server = "127.0.0.1"

[registrars.puppetdb]
type = "puppetdb"
url = "{stack.puppetdb_https_url}"
ca_file = "{stack.ca_bundle}"
client_cert = "{stack.client_cert}"
client_key = "{stack.client_key}"
ready_timeout = 300.0
classes_from = "foreman"
"""

    def start_dns(self, kind: str = "bind") -> Any:
        """Start a DNS server (lab.dns: Debian's BIND 9, or PowerDNS with ``kind="powerdns"``) for
        the lab's zones, its TSIG key written to ``workdir/dns.key``; configs written afterwards
        add the dns registrar."""
        from .dns import start_bind, start_powerdns

        start = {"bind": start_bind, "powerdns": start_powerdns}[kind]
        self.dns = start(self.workdir / f"dns-{kind}")
        self.stoppers.append(self.dns.stop)
        key = self.workdir / "dns.key"
        key.write_text(self.dns.key.secret + "\n")
        key.chmod(0o600)
        return self.dns

    def _dns_registrar(self) -> str:
        server = self.dns
        reverse = ", ".join(f'"{zone.rstrip(".")}"' for zone in server.zones[1:])
        return f"""
[registrars.dns]
type = "dns"
server = "{server.address}"
port = {server.port}
zone = "{server.zones[0].rstrip(".")}"
reverse_zones = [{reverse}]
key_name = "{server.key.name}"
key_secret = {{ file = "{self.workdir / "dns.key"}" }}
ttl = 60
"""

    def dns_records(self) -> dict[str, dict[str, list[str]]]:
        """What the lab's DNS server holds in its zones (signed zone transfers): every name with
        an A, AAAA, PTR or TXT record, without the final dot, -> record type -> values."""
        import dns.query
        import dns.rdatatype
        import dns.tsig

        server = self.dns
        assert server is not None
        key = dns.tsig.Key(server.key.name, server.key.secret, server.key.algorithm)
        found: dict[str, dict[str, list[str]]] = {}
        for zone in server.zones:
            for message in dns.query.xfr(server.address, zone, port=server.port, keyring={key.name: key},
                                         keyname=key.name, relativize=False, lifetime=10):
                for rrset in message.answer:
                    kind = dns.rdatatype.to_text(rrset.rdtype)
                    if kind in ("A", "AAAA", "PTR", "TXT"):
                        values = found.setdefault(rrset.name.to_text().rstrip("."), {}).setdefault(kind, [])
                        values.extend(sorted(r.to_text().rstrip(".").strip('"') for r in rrset))
        return found

    def start_platform(self, kind: str) -> Platform:
        """Start the peer of a platform (see lab.platforms) and make it the one configs use."""
        self.platform = PLATFORMS[kind](self)
        return self.platform

    @staticmethod
    def new_password() -> str:
        return secrets.token_urlsafe(12)

    def start_governord(self, config: Path | None = None, *, extra_env: dict[str, str] | None = None,
                        wait_ready: bool = True, nofile: tuple[int, int] | None = None) -> Governord:
        """Start governord on ``config``; ``nofile`` is its (soft, hard) descriptor limit, as a
        unit's LimitNOFILE= would set it (default: the test's own)."""
        config = config or self.write_config()
        home = config.parent
        notify_path = home / f"notify-{len(self.daemons)}.sock"
        if notify_path.exists():
            notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        log = home / "governord.log"
        view, store_env = self._stores.get(config, (None, {}))
        env = {**os.environ, **self.passwords, "NOTIFY_SOCKET": str(notify_path),
               "XDG_CACHE_HOME": str(self.workdir / "cache"), **store_env, **(extra_env or {})}
        with open(log, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "governord", "--config", str(config)],
                stdout=log_file, stderr=log_file, env=env, cwd=home, start_new_session=True,
                preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None,
            )
        daemon = Governord(process, config, home / "admin.sock", home / "state", log, notify, env, store=view)
        self.daemons.append(daemon)
        if wait_ready:
            daemon.wait_notification("READY=1", timeout=60)
        return daemon

    # -- the other side ---------------------------------------------------------------------------

    def vsphere_vms(self, peer: PeerProcess | None = None) -> dict[str, dict[str, Any]]:
        """VMs in vcsim (the lab's, or ``peer``) that carry governord's ownership marker, by name."""
        return {vm["name"]: vm for vm in self.vsphere_vm_list(peer)}

    def vsphere_vm_list(self, peer: PeerProcess | None = None) -> list[dict[str, Any]]:
        """The same VMs, each one entry (two VMs of one name are two entries: a duplicate shows)."""
        peer = peer or self.vcsim
        assert peer
        from pyVmomi import vim

        si = vcsim.connect(peer.url, "governord", self.passwords["LAB_VCSIM_PASSWORD"])
        try:
            content = si.RetrieveContent()
            view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
            vms: list[dict[str, Any]] = []
            for vm in view.view:
                extra = {o.key: o.value for o in (vm.config.extraConfig if vm.config else [])}
                host_id = extra.get("guestinfo.governord.host-id")
                if host_id:
                    vms.append({"name": vm.name, "host_id": host_id, "power": str(vm.runtime.powerState),
                                "ip": vm.guest.ipAddress if vm.guest else None, "moid": vm._moId})
            view.Destroy()
            return vms
        finally:
            vcsim.disconnect(si)

    def foreman_hosts(self) -> dict[str, dict[str, Any]]:
        """Hosts in the Foreman simulator: name -> hostgroup, puppet classes, ip, host parameters."""
        assert self.foreman
        token = base64.b64encode(f"admin:{self.passwords['LAB_FOREMAN_PASSWORD']}".encode()).decode()

        def get(path: str) -> Any:
            request = urllib.request.Request(self.foreman.url + path, headers={  # type: ignore[union-attr]
                "Authorization": f"Basic {token}", "Accept": "application/json;version=2"})
            with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310 - loopback lab peer
                return json.loads(resp.read())

        hosts: dict[str, dict[str, Any]] = {}
        for summary in get("/api/hosts?per_page=1000")["results"]:
            full = get(f"/api/hosts/{summary['id']}")
            classes = sorted(c["name"] for c in full.get("puppetclasses", []))
            hosts[full["name"]] = {"id": full["id"], "hostgroup": full.get("hostgroup_title"), "ip": full.get("ip"),
                                   "puppet_classes": classes, "comment": full.get("comment"),
                                   "parameters": {p["name"]: p.get("value") for p in full.get("parameters", [])}}
        return hosts

    def satellite_systems(self) -> dict[str, dict[str, Any]]:
        """Systems in the Satellite simulator: name -> id and subscribed groups."""
        assert self.satellite
        proxy = xmlrpc.client.ServerProxy(self.satellite.url)
        key = proxy.auth.login("admin", self.passwords["LAB_SATELLITE_PASSWORD"])
        try:
            systems: dict[str, dict[str, Any]] = {}
            for system in proxy.system.listSystems(key):
                groups = sorted(g["system_group_name"] for g in proxy.system.listGroups(key, system["id"])
                                if g["subscribed"])
                systems[system["name"]] = {"id": system["id"], "groups": groups}
            return systems
        finally:
            proxy.auth.logout(key)
