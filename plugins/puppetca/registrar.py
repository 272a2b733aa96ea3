"""The Puppet CA registrar: autosign tokens before the machine exists, certificate cleaning after.

Talks to puppetserver's CA HTTP API (``/puppet-ca/v1``) with :mod:`requests`, each request in a
thread through :meth:`Registrar.call_sync`. The API's admin endpoints (``certificate_status``,
``clean``) are guarded by puppetserver's ``auth.conf``: the stock rules admit a client
certificate that carries the ``pp_cli_auth`` extension, such as one made offline with
``puppetserver ca generate --ca-client``.

Ownership: the CSR an agent makes from the prepared cloud-config asks for a certificate extension
(``marker_oid``, in Puppet's private arc ``1.3.6.1.4.1.34380.1.2``) whose value is governord's
marker ``governord:host-id=<uuid>``; the CA copies it into the signed certificate, and Puppet
shows it to PuppetDB as the trusted fact ``trusted.extensions``. The sweep lists every
certificate and request that carries it, and cleans one only while it still does.

``verify`` and ``cert`` are passed on every request: with ``REQUESTS_CA_BUNDLE`` set in the
environment, requests replaces a session-level ``verify`` with that bundle (psf/requests#3829).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import secrets
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote

import requests
from cryptography import x509

from governord.autosign import (
    allowed_extensions,
    challenge_password,
    common_names,
    der_string,
    extension_refusal,
    load_request,
    token_matches,
)
from governord.errors import PermanentError, RetryableError, http_error
from governord.models import OWNERSHIP_KEY, HostOrigin, HostView
from governord.registrars import Phase, Registrar, RegistrarConfig, Registration, marker_of
from governord.registrars import TagMapping as BaseTagMapping

from .config import PuppetCAConfig, PuppetCATagMapping

log = logging.getLogger(__name__)

#: The PKCS#9 challengePassword attribute, as cloud-init's puppet module and Puppet name it.
CHALLENGE_PASSWORD_OID = "1.2.840.113549.1.9.7"

#: Certificate names Puppet accepts (it refuses upper case).
_CERTNAME = re.compile(r"^[a-z0-9._-]+$")


#: the text of a DER-encoded ASN.1 string (an extension's value), or None (shared with the
#: autosign checks, which compare the extensions a CSR asks for with the cloud-config's)
_der_string = der_string


def certname_of(host: HostView) -> str:
    """The certificate name of a host: its FQDN, lower case as Puppet requires."""
    return host.fqdn.lower().rstrip(".")


def _utc(value: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def marker_in(extensions: x509.Extensions) -> str | None:
    """The governord host id an ownership-marker extension of a certificate or CSR names, or None
    (whichever OID carries it: one configured earlier still counts)."""
    for extension in extensions:
        value = extension.value
        if isinstance(value, x509.UnrecognizedExtension):
            host_id = marker_of(_der_string(value.value))
            if host_id is not None:
                return host_id
    return None


def autosign_refusal(
    record: dict[str, Any] | None, certname: str, csr_pem: bytes | str, *, now: datetime.datetime | None = None
) -> str | None:
    """Why a CSR must not be autosigned for ``record`` (a :meth:`PuppetCARegistrar.prepare`
    record), or None if its token is right and it asks for no certificate extension but those
    the record's cloud-config asks for (the ownership marker). Single use is the caller's
    business: it must consume the token once it said yes."""
    if not record or not record.get("autosign_token"):
        return f"no autosign token was issued for {certname}"
    if record.get("certname") != certname:
        return f"the token was issued for {record.get('certname')}, not {certname}"
    moment = now or datetime.datetime.now(datetime.UTC)
    expires = record.get("expires_at")
    if expires and _utc(expires) <= moment:
        return f"the autosign token for {certname} expired at {expires}"
    try:
        csr = load_request(csr_pem)
    except ValueError as exc:
        return f"not a PEM certificate request: {exc}"
    subject = (common_names(csr) or [""])[0]
    if subject != certname:
        return f"the CSR is for {subject!r}, not {certname}"
    given = challenge_password(csr)
    if given is None:
        return f"the CSR for {certname} has no challengePassword"
    if not token_matches(given, record["autosign_token"]):
        return f"the CSR for {certname} carries a wrong challengePassword"
    return extension_refusal(csr, allowed_extensions(record))


class PuppetCARegistrar(Registrar):
    """Pre-authorises a host's Puppet certificate; cleans it (revoke + delete) on retirement."""

    type_name: ClassVar[str] = "puppetca"
    Config: ClassVar[type[RegistrarConfig]] = PuppetCAConfig
    TagMapping: ClassVar[type[BaseTagMapping]] = PuppetCATagMapping
    deregister_phase: ClassVar[Phase] = Phase.BEFORE_MACHINE
    #: the certificate's name, state and the token's validity; never the token itself nor the
    #: cloud-config that carries it (whoever holds it can have a CSR signed)
    application_keys: ClassVar[frozenset[str]] = frozenset({"certname", "certificate_state", "issued_at",
                                                            "expires_at"})

    def __init__(self, name: str, config: RegistrarConfig, *, state_dir: Path | None = None) -> None:
        if not isinstance(config, PuppetCAConfig):
            raise TypeError(f"{type(self).__name__} needs a PuppetCAConfig, not {type(config).__name__}")
        super().__init__(name, config, state_dir=state_dir)
        self.settings: PuppetCAConfig = config
        self._session = requests.Session()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Check that the client certificate and key are readable (a typo fails here, for good)."""
        self.require_readable("client_cert", "client_key", "ca_file", label="Puppet CA")

    async def close(self) -> None:
        """Drop pooled connections."""
        self._session.close()

    # -- the contract --------------------------------------------------------------------

    def classify(self, mappings: list[tuple[str, Any]]) -> dict[str, Any]:
        """Nothing to classify: every host gets a certificate named after its FQDN."""
        return {}

    async def prepare(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any] | None:
        """A one-time autosign token for the host's certname, and the cloud-config carrying it.

        Called again (after a crash) it returns the record it made the first time: the machine
        may already be booting with that token in its user data.
        """
        previous = host.registrations.get(self.name)
        if isinstance(previous, dict) and previous.get("autosign_token"):
            return previous
        certname = self._certname(host)
        if host.origin is HostOrigin.PROVISIONED:
            await self._refuse_leftover(certname)
        token = secrets.token_urlsafe(32)
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        expires = now + datetime.timedelta(seconds=self.settings.token_ttl)
        return {
            "certname": certname,
            "autosign_token": token,
            "issued_at": now.isoformat().replace("+00:00", "Z"),
            "expires_at": expires.isoformat().replace("+00:00", "Z"),
            "cloud_config": {
                "puppet": {
                    "conf": {"agent": {"server": self.settings.puppet_server, "certname": certname}},
                    "csr_attributes": {
                        "custom_attributes": {CHALLENGE_PASSWORD_OID: token},
                        "extension_requests": {self.settings.marker_oid: f"{OWNERSHIP_KEY}={host.id}"},
                    },
                }
            },
        }

    async def register(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any]:
        """Nothing to create (the agent sends its CSR); keeps the token record, adds the CA's view."""
        previous = host.registrations.get(self.name)
        record: dict[str, Any] = dict(previous) if isinstance(previous, dict) else {}
        certname = record.get("certname") or self._certname(host)
        status = await self._status(certname)
        record["certname"] = certname
        record["certificate_state"] = status["state"] if status else "none"
        return record

    async def check_ready(self, host: HostView, waited: float) -> bool | None:
        """No say: a signed certificate is implied by a good report in PuppetDB."""
        return None

    async def deregister(self, host: HostView) -> None:
        """Revoke and delete the certificate (``PUT /clean``), drop a pending CSR, verify 404."""
        await self._clean(self._recorded_certname(host))

    async def probe(self) -> bool:
        """One authorised call: the pending requests (the listing reads every certificate)."""
        await self.ensure_started()
        await self._request("GET", "certificate_statuses/any?state=requested", ok=(200,))
        return True

    async def list_owned(self) -> list[Registration]:
        """Every certificate and pending request on the CA whose extensions carry a governord
        marker (each is read once: the status list does not show extensions)."""
        response = await self._request("GET", "certificate_statuses/any", ok=(200,))
        statuses = self._json(response, "certificate_statuses")

        async def owned(status: dict[str, Any]) -> Registration | None:
            certname = str(status.get("name"))
            host_id = await self._marker(certname, str(status.get("state")))
            if host_id is None:
                return None
            return Registration(self.name, certname, certname, host_id,
                                {"state": status.get("state"), "fingerprint": status.get("fingerprint")})

        found = await asyncio.gather(*(owned(s) for s in statuses if isinstance(s, dict)))
        return [entry for entry in found if entry is not None]

    async def remove_owned(self, entry: Registration) -> bool:
        """Clean the certificate (or request) named ``entry.entry_id`` if it still carries the
        marker of ``entry.host_id``; verify 404."""
        status = await self._status(entry.entry_id)
        if status is None or await self._marker(entry.entry_id, str(status.get("state"))) != entry.host_id:
            return False
        await self._clean(entry.entry_id)
        return True

    async def _marker(self, certname: str, state: str) -> str | None:
        """The host id the ownership extension of ``certname``'s certificate (or, while it waits,
        its request) names; None if it has none, or is gone meanwhile."""
        quoted = quote(certname, safe="")
        path = f"certificate_request/{quoted}" if state == "requested" else f"certificate/{quoted}"
        response = await self._request("GET", path, ok=(200, 404))
        if response.status_code == 404:
            return None
        try:
            if state == "requested":
                return marker_in(x509.load_pem_x509_csr(response.content).extensions)
            return marker_in(x509.load_pem_x509_certificate(response.content).extensions)
        except ValueError as exc:
            raise RetryableError(f"Puppet CA answered {path} with no PEM it could read: {exc}", source=self.name) from None

    async def _clean(self, certname: str) -> None:
        """Revoke and delete ``certname``'s certificate, drop a pending request; verify 404."""
        response = await self._request("PUT", "clean", body={"certnames": [certname]}, ok=(200, 204, 404))
        if response.status_code == 404:
            log.info("%s: no certificate for %s to clean (%s)", self.name, certname, _message(response))
        else:
            log.info("%s: cleaned certificate of %s", self.name, certname)
        status = await self._status(certname)
        if status is not None:
            # /clean revokes and deletes signed certificates; a CSR that was never signed stays
            await self._request("DELETE", f"certificate_status/{quote(certname, safe='')}", ok=(200, 204, 404))
            status = await self._status(certname)
        if status is not None:
            raise RetryableError(
                f"Puppet CA still has {certname} (state {status.get('state')}) after cleaning it", source=self.name
            )

    async def lookup(self, host: HostView) -> dict[str, Any] | None:
        """The CA's certificate status of the host (state, fingerprint, validity), or None."""
        return await self._status(self._recorded_certname(host))

    # -- steps ---------------------------------------------------------------------------

    def _certname(self, host: HostView) -> str:
        certname = certname_of(host)
        if not _CERTNAME.match(certname):
            raise PermanentError(f"{host.fqdn!r} is not a valid Puppet certificate name", source=self.name)
        return certname

    def _recorded_certname(self, host: HostView) -> str:
        record = host.registrations.get(self.name)
        if isinstance(record, dict) and record.get("certname"):
            return str(record["certname"])
        return self._certname(host)

    async def _refuse_leftover(self, certname: str) -> None:
        """A signed certificate or pending CSR of that name would make the CA refuse the new
        machine's CSR; it may belong to a machine governord does not know, so it is not removed."""
        status = await self._status(certname)
        if status is not None and status.get("state") in ("signed", "requested"):
            raise PermanentError(
                f"Puppet CA already has a {status['state']} certificate for {certname} "
                f"(fingerprint {status.get('fingerprint')}); the new machine's request would be refused. "
                f"Clean it first (puppetserver ca clean --certname {certname}) if it is stale",
                source=self.name,
            )

    async def _status(self, certname: str) -> dict[str, Any] | None:
        """``GET certificate_status/<certname>``: the CA's record, or None on 404."""
        response = await self._request("GET", f"certificate_status/{quote(certname, safe='')}", ok=(200, 404))
        if response.status_code == 404:
            return None
        body = self._json(response, f"certificate_status/{certname}")
        keep = ("name", "state", "fingerprint", "serial_number", "not_before", "not_after", "dns_alt_names")
        return {k: body[k] for k in keep if k in body}

    # -- the wire ------------------------------------------------------------------------

    def _json(self, response: requests.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise RetryableError(
                f"Puppet CA answered {what} with non-JSON: {response.text[:200]!r}", source=self.name
            ) from None

    async def _request(
        self, method: str, path: str, *, ok: tuple[int, ...], body: Any = None
    ) -> requests.Response:
        response: requests.Response = await self.call_sync(self._send, method, path, body)
        if response.status_code in ok:
            return response
        message = (
            f"Puppet CA {method} /puppet-ca/v1/{path}: HTTP {response.status_code} {response.reason}: "
            f"{_message(response)}"
        )
        raise http_error(response.status_code, message, source=self.name)

    def _send(self, method: str, path: str, body: Any) -> requests.Response:
        """Blocking: runs in a worker thread."""
        cfg = self.settings
        url = f"{cfg.url}/puppet-ca/v1/{path}"
        verify: bool | str = str(cfg.ca_file) if cfg.verify_tls and cfg.ca_file is not None else cfg.verify_tls
        try:
            return self._session.request(
                method,
                url,
                json=body,
                headers={"Accept": "application/json"},
                verify=verify,
                cert=(str(cfg.client_cert), str(cfg.client_key)),
                timeout=cfg.call_timeout,
            )
        except requests.exceptions.SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise PermanentError(f"Puppet CA at {cfg.url}: server certificate not trusted: {exc}", source=self.name) from None
            raise RetryableError(f"Puppet CA at {cfg.url}: TLS failed: {exc}", source=self.name) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RetryableError(f"Puppet CA at {cfg.url} is unreachable: {exc}", source=self.name) from None
        except requests.RequestException as exc:
            raise RetryableError(f"Puppet CA at {cfg.url}: {exc}", source=self.name) from None
        except OSError as exc:
            # requests' own check that the client certificate and key files exist
            raise PermanentError(f"Puppet CA client certificate: {exc}", source=self.name) from None


def _message(response: requests.Response) -> str:
    """Puppet's own words from a response (plain text or a JSON ``message``)."""
    text = response.text.strip()
    try:
        body = response.json()
    except ValueError:
        return text[:500] or response.reason
    if isinstance(body, dict):
        for key in ("message", "error", "msg"):
            if body.get(key):
                return str(body[key])
    return text[:500]
