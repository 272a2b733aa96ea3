"""The configuration files of the lab's Puppet stack, written from Python values.

Everything points into one state directory (see :class:`Layout`), so several stacks can run side
by side and none touches /etc/puppet, /etc/puppetdb or /var/lib/*. The package defaults that are
kept (auth.conf, web routes, CA and metrics settings, bootstrap lists) are copied from Debian's
files so the stack behaves as a stock install does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

#: Debian's package locations (read-only; the lab never writes there)
PUPPETSERVER_CONF_D = Path("/etc/puppet/puppetserver/conf.d")
PUPPETSERVER_SERVICES_D = Path("/etc/puppet/puppetserver/services.d")
PUPPETSERVER_JAR = Path("/usr/share/puppetserver/puppetserver.jar")
PUPPETSERVER_RUBY_LOAD_PATH = Path("/usr/lib/puppetserver/ruby/vendor_ruby")
PUPPETSERVER_VENDORED_GEMS = Path("/usr/lib/puppetserver/vendored-jruby-gems")
JRUBY_LIB = Path("/usr/share/jruby/lib")
PUPPETDB_CONF_D = Path("/etc/puppetdb/conf.d")
PUPPETDB_BOOTSTRAP = Path("/etc/puppetdb/bootstrap.cfg")
PUPPETDB_JAR = Path("/usr/share/puppetdb/puppetdb.jar")


@dataclass(frozen=True)
class Ports:
    """The loopback ports one stack listens on."""

    puppetserver: int
    puppetdb_http: int
    puppetdb_https: int
    postgres: int


@dataclass(frozen=True)
class Layout:
    """Where one stack keeps its state, all below ``root``."""

    root: Path

    @property
    def confdir(self) -> Path:
        return self.root / "puppet" / "etc"

    @property
    def puppet_conf(self) -> Path:
        return self.confdir / "puppet.conf"

    @property
    def ssldir(self) -> Path:
        return self.root / "puppet" / "ssl"

    @property
    def cadir(self) -> Path:
        return self.root / "puppet" / "ca"

    @property
    def vardir(self) -> Path:
        return self.root / "puppet" / "var"

    @property
    def codedir(self) -> Path:
        return self.root / "puppet" / "code"

    @property
    def rundir(self) -> Path:
        return self.root / "puppet" / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def puppetserver_dir(self) -> Path:
        return self.root / "puppetserver"

    @property
    def puppetdb_dir(self) -> Path:
        return self.root / "puppetdb"

    @property
    def postgres_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def agents(self) -> Path:
        return self.root / "agents"

    def cert(self, certname: str) -> Path:
        return self.ssldir / "certs" / f"{certname}.pem"

    def key(self, certname: str) -> Path:
        return self.ssldir / "private_keys" / f"{certname}.pem"

    @property
    def ca_bundle(self) -> Path:
        return self.ssldir / "certs" / "ca.pem"

    @property
    def crl(self) -> Path:
        return self.ssldir / "crl.pem"

    def make_dirs(self) -> None:
        for directory in (self.confdir, self.ssldir, self.cadir, self.vardir, self.rundir, self.logs,
                          self.puppetserver_dir / "conf.d", self.puppetserver_dir / "var",
                          self.puppetdb_dir / "conf.d", self.puppetdb_dir / "var", self.agents):
            directory.mkdir(parents=True, exist_ok=True)


def _hocon(value: str | Path) -> str:
    """A HOCON string (HOCON accepts JSON strings), so paths with odd characters stay intact."""
    return json.dumps(str(value))


LOGBACK = """<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%d{yyyy-MM-dd'T'HH:mm:ss.SSSXXX} %-5p [%c{2}] %m%n</pattern></encoder>
  </appender>
  <logger name="org.eclipse.jetty" level="WARN"/>
  <logger name="org.springframework.jms.connection" level="WARN"/>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
</configuration>
"""


def write_puppet_conf(
    layout: Layout,
    ports: Ports,
    *,
    server_certname: str,
    autosign: str | None,
    enc_command: str | None,
) -> None:
    """puppet.conf, puppetdb.conf and routes.yaml: what the server's JRuby and ``puppetserver ca`` read."""
    server_lines = [
        "[server]",
        "storeconfigs = true",
        "storeconfigs_backend = puppetdb",
        "reports = store,puppetdb",
        f"autosign = {autosign or 'false'}",
    ]
    if enc_command:
        server_lines += ["node_terminus = exec", f"external_nodes = {enc_command}"]
    text = "\n".join(
        [
            "# Written by lab/puppet: one self-contained lab stack.",
            "[main]",
            f"certname = {server_certname}",
            "server = 127.0.0.1",
            f"serverport = {ports.puppetserver}",
            f"ssldir = {layout.ssldir}",
            f"cadir = {layout.cadir}",
            f"vardir = {layout.vardir}",
            f"codedir = {layout.codedir}",
            f"logdir = {layout.logs}",
            f"rundir = {layout.rundir}",
            # Without this, an agent's first run stalls 30 s on a reused keep-alive connection
            "http_keepalive_timeout = 0",
            "",
            *server_lines,
            "",
        ]
    )
    layout.puppet_conf.write_text(text, encoding="utf-8")
    (layout.confdir / "puppetdb.conf").write_text(
        f"[main]\nserver_urls = https://127.0.0.1:{ports.puppetdb_https}\nsoft_write_failure = false\n", encoding="utf-8"
    )
    (layout.confdir / "routes.yaml").write_text(
        "---\nserver:\n  facts:\n    terminus: puppetdb\n    cache: yaml\n", encoding="utf-8"
    )


def write_puppetserver_conf(layout: Layout, ports: Ports) -> Path:
    """puppetserver's conf.d: Debian's files, with paths, listener and pool size for the lab."""
    conf_d = layout.puppetserver_dir / "conf.d"
    for source in PUPPETSERVER_CONF_D.glob("*.conf"):
        shutil.copyfile(source, conf_d / source.name)
    logback = layout.puppetserver_dir / "logback.xml"
    logback.write_text(LOGBACK, encoding="utf-8")
    var = layout.puppetserver_dir / "var"
    (conf_d / "global.conf").write_text(f"global: {{\n    logging-config: {_hocon(logback)}\n}}\n", encoding="utf-8")
    (conf_d / "webserver.conf").write_text(
        "webserver: {\n"
        "    client-auth: want\n"
        "    ssl-host: 127.0.0.1\n"
        f"    ssl-port: {ports.puppetserver}\n"
        "}\n",
        encoding="utf-8",
    )
    (conf_d / "puppetserver.conf").write_text(
        "jruby-puppet: {\n"
        f"    ruby-load-path: [{_hocon(PUPPETSERVER_RUBY_LOAD_PATH)}]\n"
        f"    gem-home: {_hocon(var / 'jruby-gems')}\n"
        f"    gem-path: [{_hocon(var / 'jruby-gems')}, {_hocon(PUPPETSERVER_VENDORED_GEMS)}]\n"
        f"    server-conf-dir: {_hocon(layout.confdir)}\n"
        f"    server-code-dir: {_hocon(layout.codedir)}\n"
        f"    server-var-dir: {_hocon(var)}\n"
        f"    server-run-dir: {_hocon(layout.rundir)}\n"
        f"    server-log-dir: {_hocon(layout.logs)}\n"
        # one JRuby instance: small heap, and the lab compiles one catalog at a time anyway
        "    max-active-instances: 1\n"
        "}\n"
        "http-client: {\n}\n"
        "profiler: {\n}\n",
        encoding="utf-8",
    )
    return conf_d


def write_puppetdb_conf(layout: Layout, ports: Ports, *, server_certname: str, db_password: str) -> Path:
    """PuppetDB's conf.d: its own vardir and logging, the lab database, and the server's host cert for TLS."""
    conf_d = layout.puppetdb_dir / "conf.d"
    shutil.copyfile(PUPPETDB_CONF_D / "auth.conf", conf_d / "auth.conf")
    logback = layout.puppetdb_dir / "logback.xml"
    logback.write_text(LOGBACK, encoding="utf-8")
    (conf_d / "config.ini").write_text(
        "[global]\n"
        f"vardir = {layout.puppetdb_dir / 'var'}\n"
        f"logging-config = {logback}\n"
        "\n[puppetdb]\n"
        "disable-update-checking = true\n"
        "\n[command-processing]\n"
        "threads = 2\n",
        encoding="utf-8",
    )
    (conf_d / "database.ini").write_text(
        "[database]\n"
        f"subname = //127.0.0.1:{ports.postgres}/puppetdb\n"
        "username = puppetdb\n"
        f"password = {db_password}\n",
        encoding="utf-8",
    )
    (conf_d / "database.ini").chmod(0o600)
    (conf_d / "jetty.ini").write_text(
        "[jetty]\n"
        "host = 127.0.0.1\n"
        f"port = {ports.puppetdb_http}\n"
        "ssl-host = 127.0.0.1\n"
        f"ssl-port = {ports.puppetdb_https}\n"
        f"ssl-key = {layout.key(server_certname)}\n"
        f"ssl-cert = {layout.cert(server_certname)}\n"
        f"ssl-ca-cert = {layout.ca_bundle}\n",
        encoding="utf-8",
    )
    (conf_d / "repl.ini").write_text("[nrepl]\nenabled = false\n", encoding="utf-8")
    return conf_d


def write_agent_conf(confdir: Path, *, certname: str, port: int, base: Path) -> None:
    """An agent's own puppet.conf: its own ssldir/vardir, so one machine can play many hosts."""
    confdir.mkdir(parents=True, exist_ok=True)
    (confdir / "puppet.conf").write_text(
        "[main]\n"
        f"certname = {certname}\n"
        "server = 127.0.0.1\n"
        f"serverport = {port}\n"
        f"ssldir = {base / 'ssl'}\n"
        f"vardir = {base / 'var'}\n"
        f"logdir = {base / 'log'}\n"
        f"rundir = {base / 'run'}\n"
        f"codedir = {base / 'code'}\n"
        "http_keepalive_timeout = 0\n",
        encoding="utf-8",
    )
