"""The PuppetDB registrar: readiness from the latest Puppet report, deactivation on retirement.

Uses pypuppetdb: the query API (PQL with projections, which come back as plain dicts, and the
catalog endpoint) and the command API (``deactivate node``). pypuppetdb is synchronous; every
round trip runs in a thread through :meth:`Registrar.call_sync`, and its generators are drained
inside that thread so no request is made on the event loop. It passes ``verify`` and ``cert``
per request, so ``REQUESTS_CA_BUNDLE`` in the environment does not override ``ca_file``.

Nothing is created on registration: the agent's first run creates the node.

Ownership: a node is governord's when its certificate carries governord's marker extension (the
Puppet CA registrar has the agent's CSR ask for it), which Puppet reports as a trusted fact under
``trusted.extensions``. The sweep lists active nodes by that fact (any extension whose value is
``governord:host-id=<uuid>``) and deactivates one only while its facts still name the listed host.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

import pypuppetdb
import requests
from pypuppetdb.errors import APIError, EmptyResponseError

from governord.errors import PermanentError, RetryableError, http_error
from governord.models import OWNERSHIP_KEY, HostView
from governord.registrars import Phase, Registrar, RegistrarConfig, Registration, marker_of
from governord.registrars import TagMapping as BaseTagMapping

from .config import PuppetDBConfig, PuppetDBTagMapping

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Seconds deregister waits for PuppetDB to process the deactivation (it is asynchronous).
DEACTIVATE_VERIFY_TIMEOUT = 15.0
DEACTIVATE_VERIFY_INTERVAL = 0.25

#: Report fields check_ready reads.
_REPORT_FIELDS = (
    "certname", "hash", "status", "noop", "noop_pending", "start_time", "end_time", "receive_time",
    "catalog_uuid", "transaction_uuid", "cached_catalog_status", "configuration_version",
)
#: Node fields lookup and deregister read.
_NODE_FIELDS = (
    "certname", "deactivated", "expired", "report_timestamp", "catalog_timestamp", "facts_timestamp",
    "latest_report_status", "latest_report_noop", "latest_report_hash", "cached_catalog_status",
)

_CERTNAME = re.compile(r"^[a-z0-9._-]+$")

#: PQL: trusted facts of active nodes whose value is a governord ownership marker
_MARKED = (
    'path ~> ["trusted", "extensions", ".*"] and value ~ '
    + json.dumps(f"^{OWNERSHIP_KEY}=")  # no regex specials in the key
)


def class_title(name: str) -> str:
    """A class name as Puppet titles its ``Class`` resource: ``openshift::node`` → ``Openshift::Node``."""
    return "::".join(part[:1].upper() + part[1:] for part in name.strip().lstrip(":").split("::"))


def _when(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    parsed = datetime.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _pql_string(value: str) -> str:
    return json.dumps(value)


class PuppetDBRegistrar(Registrar):
    """Judges readiness by PuppetDB's latest report and catalog; deactivates retired nodes."""

    type_name: ClassVar[str] = "puppetdb"
    Config: ClassVar[type[RegistrarConfig]] = PuppetDBConfig
    TagMapping: ClassVar[type[BaseTagMapping]] = PuppetDBTagMapping
    deregister_phase: ClassVar[Phase] = Phase.AFTER_MACHINE
    #: its record is the node's certname, nothing secret
    application_keys: ClassVar[frozenset[str]] = frozenset({"certname"})

    def __init__(self, name: str, config: RegistrarConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, PuppetDBConfig):
            raise TypeError(f"{type(self).__name__} needs a PuppetDBConfig, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        self.settings: PuppetDBConfig = config
        self._db = self._connect()

    def _connect(self) -> Any:
        cfg = self.settings
        parts = urlsplit(cfg.url)
        https = parts.scheme == "https"
        verify: bool | str = str(cfg.ca_file) if cfg.verify_tls and cfg.ca_file is not None else cfg.verify_tls
        return pypuppetdb.connect(
            host=parts.hostname,
            port=parts.port or (8081 if https else 8080),
            protocol=parts.scheme,
            url_path=parts.path or "/",
            ssl_verify=verify if https else False,
            ssl_cert=str(cfg.client_cert) if https and cfg.client_cert else None,
            ssl_key=str(cfg.client_key) if https and cfg.client_key else None,
            timeout=cfg.timeout,
        )

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the configured certificate files are readable (a typo fails here, for good)."""
        self.require_readable("client_cert", "client_key", "ca_file", label="PuppetDB")

    async def close(self) -> None:
        """Drop pooled connections."""
        self._db.disconnect()

    # -- the contract --------------------------------------------------------------------

    def classify(self, mappings: list[tuple[str, Any]]) -> dict[str, Any]:
        """Nothing of its own: the classes to expect come from ``classes_from``."""
        return {}

    async def register(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any]:
        """Nothing to create: the agent's first run makes the node. Records the certname."""
        return {"certname": self._certname(host)}

    async def check_ready(self, host: HostView, waited: float) -> bool | None:
        """True once the latest report is a good, new run whose catalog has the demanded classes.

        ``False`` while it is not; a failed run is only final after ``ready_timeout``, since the
        next run may succeed (e.g. once the ENC knows the host).
        """
        certname = self._certname(host)
        classes = self._demanded_classes(host)
        since = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
            seconds=max(waited, 0.0) + self.settings.clock_skew
        )
        report = await self._latest_report(certname)
        reason = await self._not_ready_because(certname, report, since, classes)
        if reason is None:
            return True
        if waited > self.settings.ready_timeout:
            ended = _when(report.get("end_time")) if report is not None else None
            if report is not None and report.get("status") == "failed" and ended is not None and ended >= since:
                errors = await self._report_errors(str(report["hash"]))
                raise PermanentError(
                    f"Puppet run on {certname} failed (report {report['hash']}, ended {report.get('end_time')}) "
                    f"and no successful run followed within {self.settings.ready_timeout:.0f}s"
                    + (f": {'; '.join(errors)}" if errors else ""),
                    source=self.name,
                )
            wanted = ", ".join(class_title(c) for c in classes) or "none"
            raise PermanentError(
                f"no successful Puppet report with classes [{wanted}] from {certname} after {waited:.0f}s: {reason}",
                source=self.name,
            )
        log.debug("%s: %s not ready after %.0fs: %s", self.name, certname, waited, reason)
        return False

    async def deregister(self, host: HostView) -> None:
        """Send ``deactivate node`` and verify the node reads as deactivated; unknown is success."""
        certname = self._recorded_certname(host)
        node = await self._node(certname)
        if node is None:
            log.info("%s: PuppetDB has no node %s; nothing to deactivate", self.name, certname)
            return
        if node.get("deactivated"):
            return
        await self._deactivate(certname)

    async def list_owned(self) -> list[Registration]:
        """Every active node whose trusted facts carry a governord ownership marker."""
        rows = await self._pql(f"fact_contents[certname, value] {{ {_MARKED} }}")
        found: dict[str, Registration] = {}
        for row in rows:
            host_id = marker_of(row.get("value") if isinstance(row.get("value"), str) else None)
            certname = str(row.get("certname"))
            if host_id is not None and certname not in found:
                found[certname] = Registration(self.name, certname, certname, host_id, {})
        return list(found.values())

    async def remove_owned(self, entry: Registration) -> bool:
        """Deactivate the node ``entry.entry_id`` if it is active and its trusted facts still name
        ``entry.host_id``; verify that it reads as deactivated."""
        rows = await self._pql(
            f"fact_contents[certname, value] {{ certname = {_pql_string(entry.entry_id)} and {_MARKED} }}")
        owners = {marker_of(r.get("value") if isinstance(r.get("value"), str) else None) for r in rows}
        if entry.host_id not in owners:
            return False  # deactivated already, or its latest facts name another host
        await self._deactivate(entry.entry_id)
        return True

    async def _deactivate(self, certname: str) -> None:
        """Send ``deactivate node`` and wait until the node reads as deactivated (it is asynchronous)."""
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        await self._call(self._db.command, "deactivate node", {"certname": certname, "producer_timestamp": stamp})
        deadline = time.monotonic() + DEACTIVATE_VERIFY_TIMEOUT
        while True:
            node = await self._node(certname)
            if node is None or node.get("deactivated"):
                log.info("%s: deactivated node %s", self.name, certname)
                return
            if time.monotonic() >= deadline:
                # e.g. the node reported again after our timestamp: the machine is still running
                raise RetryableError(
                    f"PuppetDB node {certname} is still active {DEACTIVATE_VERIFY_TIMEOUT:.0f}s after "
                    f"'deactivate node' (last report {node.get('report_timestamp')})",
                    source=self.name,
                )
            await asyncio.sleep(DEACTIVATE_VERIFY_INTERVAL)

    async def lookup(self, host: HostView) -> dict[str, Any] | None:
        """The node as PuppetDB has it (deactivated or not, latest report status and time), or None."""
        return await self._node(self._recorded_certname(host))

    # -- steps ---------------------------------------------------------------------------

    def _certname(self, host: HostView) -> str:
        certname = host.fqdn.lower().rstrip(".")
        if not _CERTNAME.match(certname):
            raise PermanentError(f"{host.fqdn!r} is not a valid Puppet certificate name", source=self.name)
        return certname

    def _recorded_certname(self, host: HostView) -> str:
        record = host.registrations.get(self.name)
        if isinstance(record, dict) and record.get("certname"):
            return str(record["certname"])
        return self._certname(host)

    def _demanded_classes(self, host: HostView) -> list[str]:
        source = self.settings.classes_from
        if not source:
            return []
        classification = host.classification.get(source) or {}
        return [str(c) for c in classification.get("puppet_classes", []) if str(c).strip()]

    async def _not_ready_because(
        self, certname: str, report: dict[str, Any] | None, since: datetime.datetime, classes: list[str]
    ) -> str | None:
        """Why the host is not ready yet, or None if it is."""
        if report is None:
            return "PuppetDB has no report from it yet"
        ended = _when(report.get("end_time"))
        if ended is None or ended < since:
            return f"its latest report (ended {report.get('end_time')}) is older than its wait"
        status = report.get("status")
        if status == "failed":
            return f"its latest run failed (report {report.get('hash')})"
        if report.get("noop"):
            return f"its latest run was a noop run (report {report.get('hash')})"
        if report.get("cached_catalog_status") == "on_failure":
            return f"its latest run fell back to a cached catalog: compiling failed (report {report.get('hash')})"
        if status not in ("changed", "unchanged"):
            return f"its latest report has status {status!r}"
        if not classes:
            return None
        catalog = await self._catalog(certname)
        if catalog is None:
            return "PuppetDB has no catalog for it yet"
        run_catalog = report.get("catalog_uuid")
        if run_catalog and catalog.catalog_uuid and catalog.catalog_uuid != run_catalog:
            return f"PuppetDB's catalog ({catalog.catalog_uuid}) is not the one of its latest run ({run_catalog})"
        have = {key.casefold() for key in catalog.resources}
        missing = [class_title(c) for c in classes if f"Class[{class_title(c)}]".casefold() not in have]
        if missing:
            return f"its catalog lacks {', '.join(f'Class[{m}]' for m in missing)}"
        return None

    # -- queries -------------------------------------------------------------------------

    async def _latest_report(self, certname: str) -> dict[str, Any] | None:
        query = (
            f"reports[{', '.join(_REPORT_FIELDS)}] "
            f"{{ certname = {_pql_string(certname)} and latest_report? = true }}"
        )
        rows = await self._pql(query)
        return rows[0] if rows else None

    async def _node(self, certname: str) -> dict[str, Any] | None:
        query = f"nodes[{', '.join(_NODE_FIELDS)}] {{ certname = {_pql_string(certname)} and node_state = \"any\" }}"
        rows = await self._pql(query)
        return rows[0] if rows else None

    async def _report_errors(self, report_hash: str) -> list[str]:
        """The error-level log lines of one report (the first few)."""

        def fetch() -> list[str]:
            puppet: list[str] = []
            facter: list[str] = []
            for report in self._db.reports(query=json.dumps(["=", "hash", report_hash])):
                for entry in report.logs if isinstance(report.logs, list) else []:
                    if entry.get("level") not in ("err", "crit", "alert", "emerg"):
                        continue
                    # Facter's complaints (e.g. unreadable /proc files) seldom are why a run failed
                    lines = facter if entry.get("source") == "Facter" else puppet
                    message = str(entry.get("message"))
                    if message not in lines:
                        lines.append(message)
            return (puppet + facter)[:3]

        try:
            return await self._call(fetch)
        except (RetryableError, PermanentError) as exc:
            return [f"(could not read the report's log: {exc})"]

    async def _catalog(self, certname: str) -> Any:
        def fetch() -> Any:
            # next() on an empty generator would raise StopIteration into a Future
            return next(iter(self._db.catalogs(path=certname)), None)

        try:
            return await self._call(fetch)
        except PermanentError as exc:
            if getattr(exc, "http_status", None) == 404:
                return None
            raise

    async def _pql(self, query: str) -> list[dict[str, Any]]:
        return await self._call(lambda: list(self._db.pql(query)))

    # -- the wire ------------------------------------------------------------------------

    async def _call(self, func: Callable[..., T], *args: Any) -> T:
        """One blocking pypuppetdb call in a thread, its failures sorted for the engine."""
        try:
            return await self.call_sync(func, *args)
        except (RetryableError, PermanentError):
            raise
        except Exception as exc:  # noqa: BLE001 - every other failure is translated, none swallowed
            raise self._translate(exc) from None

    def _translate(self, exc: Exception) -> RetryableError | PermanentError:
        where = f"PuppetDB at {self.settings.url}"
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            response = exc.response
            message = f"{where}: HTTP {response.status_code} on {response.request.method} {response.url}: {_message(response)}"
            return http_error(response.status_code, message, source=self.name)
        if isinstance(exc, requests.exceptions.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            return PermanentError(f"{where}: server certificate not trusted: {exc}", source=self.name)
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return RetryableError(f"{where} is unreachable: {exc}", source=self.name)
        if isinstance(exc, (requests.RequestException, EmptyResponseError)):
            return RetryableError(f"{where}: {type(exc).__name__}: {exc}", source=self.name)
        if isinstance(exc, OSError):
            # requests' own check that the client certificate and key files exist
            return PermanentError(f"{where}: client certificate: {exc}", source=self.name)
        if isinstance(exc, APIError):
            return PermanentError(f"{where}: pypuppetdb refused the call: {type(exc).__name__} {exc}", source=self.name)
        return PermanentError(f"{where}: {type(exc).__name__}: {exc}", source=self.name)


def _message(response: requests.Response) -> str:
    """PuppetDB's own words from an error response."""
    text = response.text.strip()
    try:
        body = response.json()
    except ValueError:
        return text[:500] or response.reason
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return text[:500]
