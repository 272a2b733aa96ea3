"""Real DNS servers for the lab: Debian's BIND 9 and PowerDNS, taking RFC 2136 updates signed with TSIG.

:func:`start_bind` and :func:`start_powerdns` each set up a self-contained server under one
directory and start it in the foreground (no systemd, no init script), in its own process group,
on a free port of 127.0.0.1 (UDP and TCP), authoritative for the lab's forward zone
(:data:`FORWARD_ZONE`) and the reverse zones of its address ranges (:data:`REVERSE_ZONES`: the
lab network 198.51.100.0/24 and 2001:db8::/32). Each has a TSIG key (hmac-sha256, made by BIND's
``tsig-keygen``) that may update and transfer those zones (no other client may do either):

- BIND: ``named -g`` with its own ``named.conf`` (recursion off, no rndc channel), primary zones
  from zone files it keeps journals beside, and ``update-policy { grant KEY zonesub ANY; }``
  (the binary is run from a copy in the server's directory, beyond the reach of the AppArmor
  profile Debian ships for /usr/sbin/named, which would keep it out of that directory);
- PowerDNS: ``pdns_server`` with the gsqlite3 backend (the schema the package ships), zones made
  by ``pdnsutil create-zone``, the key imported by ``pdnsutil import-tsig-key`` and allowed per
  zone by its ``TSIG-ALLOW-DNSUPDATE`` metadata (``SOA-EDIT-DNSUPDATE`` raises the serial on
  each update), ``dnsupdate=yes``.

:class:`DnsServer` is the handle: address, port, key, zones, :meth:`DnsServer.stop`. The packages
(``bind9``, ``bind9-utils``, ``bind9-dnsutils``, ``pdns-server``, ``pdns-backend-sqlite3``) are in
the Makefile's APT_PACKAGES.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..process import stop_group

#: the lab's forward zone (lab/stack.py names hosts in it)
FORWARD_ZONE = "lab.example."
#: reverse zones of the lab's address ranges: 198.51.100.0/24 (lab/stack.py's network), 2001:db8::/32
REVERSE_ZONES: tuple[str, ...] = ("100.51.198.in-addr.arpa.", "8.b.d.0.1.0.0.2.ip6.arpa.")
ZONES: tuple[str, ...] = (FORWARD_ZONE, *REVERSE_ZONES)
#: the name of the key the lab's servers allow to update their zones
KEY_NAME = "governord-lab"
ALGORITHM = "hmac-sha256"
#: where Debian's pdns-backend-sqlite3 ships the gsqlite3 schema
PDNS_SQLITE_SCHEMA = Path("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")

_KEY_SECRET = re.compile(r'secret\s+"([A-Za-z0-9+/=]+)"')


class DnsLabError(RuntimeError):
    """A server could not be set up or started; the message ends with its output."""


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key: its name, algorithm and base64 secret."""

    name: str
    algorithm: str
    secret: str


@dataclass
class DnsServer:
    """A running lab DNS server."""

    #: ``bind`` or ``powerdns``
    kind: str
    directory: Path
    port: int
    key: TsigKey
    zones: tuple[str, ...]
    process: subprocess.Popen[bytes]
    log: Path
    address: str = "127.0.0.1"

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``timeout``)."""
        stop_group(self.process, signal.SIGTERM, timeout)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log, lines)

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def check_installed() -> None:
    """Raise :class:`DnsLabError` naming what is missing (the Makefile's APT_PACKAGES install it)."""
    missing = [tool for tool in ("named", "tsig-keygen", "pdns_server", "pdnsutil") if _which(tool) is None]
    if not PDNS_SQLITE_SCHEMA.exists():
        missing.append(str(PDNS_SQLITE_SCHEMA))
    if missing:
        raise DnsLabError(f"the DNS lab is not installed (missing {', '.join(missing)}): "
                          "install bind9, bind9-utils, pdns-server and pdns-backend-sqlite3 (`make apt`)")


def make_key(name: str = KEY_NAME) -> TsigKey:
    """A new hmac-sha256 key made by BIND's ``tsig-keygen``."""
    out = _run([_tool("tsig-keygen"), "-a", ALGORITHM, name], "tsig-keygen")
    match = _KEY_SECRET.search(out)
    if not match:
        raise DnsLabError(f"tsig-keygen printed no secret: {out!r}")
    return TsigKey(name, ALGORITHM, match.group(1))


def free_port() -> int:
    """A port of 127.0.0.1 free for both TCP and UDP (DNS listens on both)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise DnsLabError("no port free for both TCP and UDP")


# -- BIND ---------------------------------------------------------------------------------------


def start_bind(directory: str | Path, *, zones: Sequence[str] = ZONES, key: TsigKey | None = None,
               port: int | None = None, timeout: float = 30.0) -> DnsServer:
    """Set up BIND in ``directory`` (created) for ``zones`` and start ``named -g`` on ``port``
    (default: a free one) of 127.0.0.1; returns once every zone answers its SOA."""
    [server] = _start_named(directory, {"": key or make_key()}, zones=zones, port=port, timeout=timeout)
    return server


def start_bind_views(directory: str | Path, views: Sequence[str] = ("internal", "external"), *,
                     zones: Sequence[str] = ZONES, port: int | None = None, timeout: float = 30.0) -> list[DnsServer]:
    """One ``named`` with a view per name in ``views``, each holding its own copy of ``zones``
    and matched by its own key (``match-clients { key KEY; }``): a client signing with a view's
    key reads, updates and transfers that view's zones only (an unsigned query matches no view
    and is refused). Returns one handle per view (the same process; stopping one stops all)."""
    keys = {view: make_key(f"{KEY_NAME}-{view}") for view in views}
    return _start_named(directory, keys, zones=zones, port=port, timeout=timeout)


def _start_named(directory: str | Path, keys: dict[str, TsigKey], *, zones: Sequence[str], port: int | None,
                 timeout: float) -> list[DnsServer]:
    """named for ``zones``; ``keys``: view name -> its key (one entry named "": no views)."""
    check_installed()
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    zones = tuple(_absolute(z) for z in zones)
    (root / "update.key").write_text("".join(
        f'key "{key.name}" {{\n\talgorithm {key.algorithm};\n\tsecret "{key.secret}";\n}};\n'
        for key in keys.values()))
    (root / "update.key").chmod(0o600)
    sections = []
    for view, key in keys.items():
        folder = root / view if view else root
        folder.mkdir(exist_ok=True)
        stanzas = []
        for zone in zones:
            bare = zone.rstrip(".")
            zone_file = folder / f"{bare}.zone"
            zone_file.write_text(_zone_file(zone))
            stanzas.append(
                f'zone "{bare}" {{\n\ttype primary;\n\tfile "{zone_file}";\n'
                f'\tupdate-policy {{ grant "{key.name}" zonesub ANY; }};\n'
                # zone transfers (how the registrar lists what it owns) only signed with the key
                f'\tallow-transfer {{ key "{key.name}"; }};\n}};\n')
        if view:
            sections.append(f'view "{view}" {{\n\tmatch-clients {{ key "{key.name}"; }};\n'
                            + "".join(stanzas) + "};\n")
        else:
            sections.extend(stanzas)
    conf = root / "named.conf"
    conf.write_text(
        "options {\n"
        f'\tdirectory "{root}";\n'
        f'\tpid-file "{root}/named.pid";\n'
        f'\tsession-keyfile "{root}/session.key";\n'
        f'\tmanaged-keys-directory "{root}";\n'
        f"\tlisten-on port {port} {{ 127.0.0.1; }};\n"
        "\tlisten-on-v6 { none; };\n"
        "\trecursion no;\n"
        "\tdnssec-validation no;\n"
        "\tnotify no;\n"
        "};\n"
        # no rndc channel: stopped by a signal
        "controls { };\n"
        f'include "{root}/update.key";\n'
        + "".join(sections)
    )
    check = subprocess.run([_tool("named-checkconf"), "-z", str(conf)], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        raise DnsLabError(f"named-checkconf refused {conf}: {(check.stdout + check.stderr).strip()}")
    log = root / "named.log"
    # -g: foreground, log to stderr; -4: IPv4 only; -n 1: one worker thread, the lab is tiny
    args = ["-g", "-4", "-n", "1", "-c", str(conf)]
    try:
        process = _launch([_unconfined_named(root), *args], log)
    except PermissionError:  # a directory mounted noexec: the package's own, confined or not
        process = _launch([_tool("named"), *args], log)
    servers = [DnsServer("bind", root, port, key, zones, process, log) for key in keys.values()]
    for server in servers:
        _wait_answering(server, timeout)
    return servers


def _unconfined_named(root: Path) -> str:
    """Debian's ``named``, copied into the server's directory. Debian ships an AppArmor profile
    for /usr/sbin/named that confines it to /etc/bind, /var/cache/bind and the like, so on a
    machine where AppArmor is on, the package's binary could not read this lab's own directory;
    a profile attaches by path, and the copy (the same program) runs unconfined."""
    copy = root / "named"
    shutil.copy2(_tool("named"), copy)
    return str(copy)


def _zone_file(zone: str) -> str:
    return (
        "$TTL 300\n"
        f"{zone} IN SOA ns1.{FORWARD_ZONE} hostmaster.{FORWARD_ZONE} 1 3600 600 86400 60\n"
        f"{zone} IN NS ns1.{FORWARD_ZONE}\n"
        + (f"ns1.{FORWARD_ZONE} IN A 127.0.0.1\n" if zone == FORWARD_ZONE else "")
    )


# -- PowerDNS -----------------------------------------------------------------------------------


def start_powerdns(directory: str | Path, *, zones: Sequence[str] = ZONES, key: TsigKey | None = None,
                   port: int | None = None, timeout: float = 30.0) -> DnsServer:
    """Set up PowerDNS with the gsqlite3 backend in ``directory`` (created) for ``zones`` and
    start ``pdns_server`` on ``port`` (default: a free one) of 127.0.0.1; returns once every zone
    answers its SOA."""
    check_installed()
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    key = key or make_key()
    port = port or free_port()
    zones = tuple(_absolute(z) for z in zones)
    database = root / "pdns.sqlite3"
    with sqlite3.connect(database) as db:
        db.executescript(PDNS_SQLITE_SCHEMA.read_text())
    (root / "pdns.conf").write_text(
        "launch=gsqlite3\n"
        f"gsqlite3-database={database}\n"
        f"local-address=127.0.0.1:{port}\n"
        "dnsupdate=yes\n"
        # updates are taken from loopback only, and (per zone metadata) only signed with the key
        "allow-dnsupdate-from=127.0.0.0/8\n"
        # zone transfers (how the registrar lists what it owns) only signed with the key (zone metadata)
        "disable-axfr=no\nallow-axfr-ips=\n"
        f"socket-dir={root}\n"
        "daemon=no\nguardian=no\ndisable-syslog=yes\nwrite-pid=no\n"
        "webserver=no\napi=no\n"
        "receiver-threads=1\ndistributor-threads=1\nsigning-threads=1\n"
        "loglevel=4\n"
    )
    pdnsutil = [_tool("pdnsutil"), f"--config-dir={root}"]
    _run([*pdnsutil, "import-tsig-key", key.name, key.algorithm, key.secret], "pdnsutil import-tsig-key")
    for zone in zones:
        _run([*pdnsutil, "create-zone", zone, f"ns1.{FORWARD_ZONE}"], f"pdnsutil create-zone {zone}")
        if zone == FORWARD_ZONE:
            _run([*pdnsutil, "add-record", zone, "ns1", "A", "300", "127.0.0.1"], "pdnsutil add-record")
        for kind, value in (("TSIG-ALLOW-DNSUPDATE", key.name), ("TSIG-ALLOW-AXFR", key.name),
                            # each update raises the SOA serial (as BIND does), so secondaries see it
                            ("SOA-EDIT-DNSUPDATE", "INCREASE")):
            _run([*pdnsutil, "set-meta", zone, kind, value], f"pdnsutil set-meta {zone} {kind}")
    log = root / "pdns.log"
    process = _launch([_tool("pdns_server"), f"--config-dir={root}"], log)
    server = DnsServer("powerdns", root, port, key, zones, process, log)
    _wait_answering(server, timeout)
    return server


# -- shared -------------------------------------------------------------------------------------


def _absolute(zone: str) -> str:
    return zone.lower().rstrip(".") + "."


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _tool(tool: str) -> str:
    path = _which(tool)
    if path is None:
        raise DnsLabError(f"{tool} is not installed")
    return path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run(argv: list[str], what: str, timeout: float = 60.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise DnsLabError(f"{what} failed ({result.returncode}): {(result.stdout + result.stderr).strip()[-2000:]}")
    return result.stdout


def _launch(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        # its own session, so stop() signals the server and nothing else
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait_answering(server: DnsServer, timeout: float) -> None:
    """Wait until the server answers the SOA of each of its zones, authoritatively, over UDP."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype
    import dns.tsig

    deadline = time.monotonic() + timeout
    pending = list(server.zones)
    while pending:
        if not server.running():
            raise DnsLabError(f"{server.kind} exited ({server.process.returncode}):\n{server.log_tail()}")
        try:
            query = dns.message.make_query(pending[0], dns.rdatatype.SOA)
            # signed: a server with views answers only a client its key matches
            query.use_tsig(dns.tsig.Key(server.key.name, server.key.secret, server.key.algorithm))
            answer = dns.query.udp(query, server.address, port=server.port, timeout=0.5)
            if answer.rcode() == dns.rcode.NOERROR and answer.flags & dns.flags.AA and answer.answer:
                pending.pop(0)
                continue
        except (OSError, dns.exception.DNSException):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise DnsLabError(f"{server.kind} did not answer for {pending[0]} within {timeout:.0f}s:\n"
                              f"{server.log_tail()}")
        time.sleep(0.1)


__all__ = [
    "ALGORITHM", "FORWARD_ZONE", "KEY_NAME", "REVERSE_ZONES", "ZONES", "DnsLabError", "DnsServer", "TsigKey",
    "check_installed", "free_port", "make_key", "start_bind", "start_bind_views", "start_powerdns",
]
