"""The application API's TLS: client certificates verified in the handshake against the client
CA (and, for a site CA, its CRL), and every refused handshake logged with its reason and counted.

A client certificate from an unknown CA, an expired or not yet valid one, or one a site CA's
CRL revokes fails inside the TLS handshake, before aiohttp sees a connection; asyncio reports
that only in debug mode. So the server's :class:`ssl.SSLContext` makes its connections'
:class:`ssl.SSLObject` of a subclass whose ``do_handshake`` reports a failure before passing it
on: the reason (from OpenSSL's verification code), the peer, and the refused certificate.

The site CA's CRL is re-read on SIGHUP (:meth:`ApplicationTLS.reload_crl`) and when its file
changes (a ``stat`` per handshake and per request, :meth:`ApplicationTLS.refresh`). A new CRL
gets a new context, which each new connection switches to in the SNI callback (OpenSSL cannot
take a CRL back out of a context's store). Connections opened before a revocation are caught per
request by :meth:`ApplicationTLS.revoked_by_crl`.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ..pki import RevocationListError, RevocationLists, load_revocation_lists

log = logging.getLogger(__name__)

#: OpenSSL's X509_V_ERR_* verification codes -> (metric label, what the log says)
VERIFY_REASONS: dict[int, tuple[str, str]] = {
    2: ("unknown_ca", "unknown CA"),  # unable to get issuer certificate
    18: ("unknown_ca", "unknown CA"),  # self-signed certificate
    19: ("unknown_ca", "unknown CA"),  # self-signed certificate in the chain
    20: ("unknown_ca", "unknown CA"),  # unable to get local issuer certificate
    21: ("unknown_ca", "unknown CA"),  # unable to verify the first certificate
    9: ("not_yet_valid", "not yet valid"),
    10: ("expired", "expired"),
    23: ("revoked_by_crl", "revoked by CRL"),
    3: ("crl_missing", "no CRL for its issuer"),
    11: ("crl_out_of_date", "CRL not yet valid"),
    12: ("crl_out_of_date", "CRL expired"),
    4: ("bad_signature", "bad signature"),
    7: ("bad_signature", "bad signature"),
    24: ("invalid_ca", "issuer is not a CA"),
    26: ("wrong_purpose", "not a client certificate"),
}
OTHER_VERIFY_FAILURE = ("verify_failed", "certificate verification failed")
HANDSHAKE_FAILURE = ("handshake_failed", "TLS handshake failed")

#: TLS handshake message type of a Certificate message (RFC 8446 4.4.2, RFC 5246 7.4.2)
_CERTIFICATE_MESSAGE = 11


@dataclass(frozen=True)
class HandshakeRefusal:
    """One refused TLS handshake."""

    #: short and stable, the metric's label: unknown_ca, expired, revoked_by_crl, ...
    reason: str
    #: what the log says: "unknown CA", "expired", "revoked by CRL", ...
    description: str
    #: OpenSSL's verification code and message (None when the failure was not verification)
    verify_code: int | None
    verify_message: str | None
    #: OpenSSL's reason (CERTIFICATE_VERIFY_FAILED, HTTP_REQUEST, WRONG_VERSION_NUMBER, ...)
    error: str
    #: "address:port", or None if it could not be learnt
    peer: str | None
    #: the refused certificate, as far as the client sent one
    subject: str | None = None
    issuer: str | None = None
    serial: str | None = None


def classify(exc: ssl.SSLError) -> tuple[str, str]:
    """(metric label, description) of a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return VERIFY_REASONS.get(exc.verify_code, OTHER_VERIFY_FAILURE)
    return HANDSHAKE_FAILURE


def leaf_from_certificate_message(version: int, message: bytes) -> bytes | None:
    """The DER of the first certificate in a TLS Certificate handshake message (header
    included), or None if it is empty or malformed."""
    try:
        if message[0] != _CERTIFICATE_MESSAGE:
            return None
        at = 4
        if version >= ssl.TLSVersion.TLSv1_3:  # a certificate_request_context comes first
            at += 1 + message[at]
        at += 3  # the certificate list's length
        length = int.from_bytes(message[at:at + 3], "big")
        der = message[at + 3:at + 3 + length]
    except IndexError:
        return None
    return der if length and len(der) == length else None


def _peer_of_caller() -> str | None:
    """The peer of the connection whose handshake is running: asyncio's SSLProtocol, which
    calls ``do_handshake``, knows its transport; the SSLObject it made does not."""
    caller = sys._getframe(2).f_locals.get("self")  # noqa: SLF001 - the only way to the protocol
    get_extra = getattr(caller, "_get_extra_info", None)
    if get_extra is None:
        return None
    try:
        peer = get_extra("peername")
    except Exception:  # noqa: BLE001 - a closed transport: no peer to name
        return None
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    return str(peer) if peer else None


class ReportingSSLObject(ssl.SSLObject):
    """An SSLObject that reports a failed handshake to its context's :class:`ApplicationTLS`."""

    #: (TLS version, raw Certificate message) the client sent, kept until the handshake ends
    client_certificate_message: tuple[int, bytes] | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLEOFError, ssl.SSLZeroReturnError,
                ssl.SSLSyscallError):
            # more bytes needed, or the client went away: nothing was refused
            raise
        except ssl.SSLError as exc:
            gate = getattr(self.context, "gate", None)
            if gate is not None:
                gate.report(self, exc, _peer_of_caller())
            raise
        # done: the certificate is getpeercert()'s now
        self.client_certificate_message = None


class _ApiContext(ssl.SSLContext):
    """The server context: makes :class:`ReportingSSLObject` connections and knows its gate."""

    sslobject_class = ReportingSSLObject
    gate: ApplicationTLS


class ApplicationTLS:
    """The TLS side of the application API: its server context, the site CA's CRL, and the
    reporting of refused handshakes (logged, and counted through ``count(reason, stage)``)."""

    def __init__(
        self,
        *,
        certificate: str | Path,
        key: str | Path,
        client_ca: str | Path,
        client_crl: Path | None,
        count: Callable[[str, str], None],
    ) -> None:
        """:raises RevocationListError: the CRL file is unusable (the daemon exits 2 on it)."""
        self.certificate = str(certificate)
        self.key = str(key)
        self.client_ca = Path(client_ca)
        self.client_crl = client_crl
        self.count = count
        self.crl: RevocationLists | None = None
        #: (mtime, size, inode) of the CRL file as last read, good or not
        self._crl_seen: tuple[int, int, int] | None = None
        if client_crl is not None:
            self._crl_seen = self._stat()
            self.crl = load_revocation_lists(client_crl, self.client_ca)
            self._warn_if_stale(self.crl)
        #: the context the server listens with; its SNI callback moves a new connection to _current
        self.context = self._build(self.crl)
        self.context.sni_callback = self._choose_context
        self._current: ssl.SSLContext = self.context

    # -- contexts and the CRL ---------------------------------------------------------------------

    def _build(self, crl: RevocationLists | None) -> _ApiContext:
        context = _ApiContext(ssl.PROTOCOL_TLS_SERVER)
        context.gate = self
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cafile=str(self.client_ca))
        context.load_cert_chain(self.certificate, self.key)
        # Optional: /healthz and /metrics answer without one; /v1 refuses a connection without.
        context.verify_mode = ssl.CERT_OPTIONAL
        # Only this hook sees the client's Certificate message of a handshake that then fails
        # (OpenSSL keeps no peer certificate after a failed verification). Every context needs
        # it: a connection moved to a newer one reports to that one's.
        context._msg_callback = _keep_client_certificate  # type: ignore[attr-defined]  # noqa: SLF001
        if crl is not None:
            # OpenSSL reads CRLs only from files: load exactly the bytes that were checked
            with tempfile.NamedTemporaryFile(prefix="governord-crl-", suffix=".pem") as copy:
                copy.write(crl.pem)
                copy.flush()
                context.load_verify_locations(cafile=copy.name)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return context

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.client_crl is not None
        try:
            st = os.stat(self.client_crl)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def refresh(self) -> None:
        """Reload the CRL if its file changed since it was last read (a ``stat``)."""
        if self.client_crl is not None and self._stat() != self._crl_seen:
            self.reload_crl("the file changed")

    def reload_crl(self, why: str) -> bool:
        """Read the CRL again; a bad one is logged and the previous one stays in force."""
        if self.client_crl is None:
            return True
        self._crl_seen = self._stat()
        try:
            crl = load_revocation_lists(self.client_crl, self.client_ca)
            context = self._build(crl)
        except (RevocationListError, ssl.SSLError, OSError) as exc:
            log.error("CRL not reloaded, the previous one stays in force: %s", exc,
                      extra={"key": "api.tls.client_crl", "file": str(self.client_crl), "why": why})
            return False
        self.crl, self._current = crl, context
        revoked = sum(len(list(c)) for c in crl.crls)
        log.info("CRL reloaded", extra={"file": str(self.client_crl), "why": why, "revoked": revoked})
        self._warn_if_stale(crl)
        return True

    @staticmethod
    def _warn_if_stale(crl: RevocationLists) -> None:
        for issuer in crl.stale():
            log.warning("the CRL is past its next update: clients of this CA are refused until a fresh one "
                        "is installed", extra={"file": str(crl.path), "issuer": issuer})

    def _choose_context(self, connection: ssl.SSLObject, server_name: str | None, context: Any) -> None:
        self.refresh()
        if self._current is not self.context:
            connection.context = self._current

    def revoked_by_crl(self, der: bytes) -> bool:
        """Whether the current CRL revokes this (DER) certificate: for connections opened before
        the revocation arrived."""
        self.refresh()
        if self.crl is None:
            return False
        return self.crl.is_revoked(x509.load_der_x509_certificate(der))

    # -- refusals ---------------------------------------------------------------------------------

    def report(self, connection: ReportingSSLObject, exc: ssl.SSLError, peer: str | None) -> None:
        """Log and count one refused handshake."""
        reason, description = classify(exc)
        refusal = HandshakeRefusal(
            reason, description, getattr(exc, "verify_code", None), getattr(exc, "verify_message", None),
            str(exc.reason or exc), peer, *_describe(connection.client_certificate_message),
        )
        connection.client_certificate_message = None
        self.count(refusal.reason, "handshake")
        fields: dict[str, Any] = {"reason": refusal.reason, "stage": "handshake", "peer": refusal.peer or "unknown",
                  "error": refusal.error}
        if refusal.verify_code is not None:
            fields.update(verify_code=refusal.verify_code, verify_message=refusal.verify_message)
        for name in ("subject", "issuer", "serial"):
            if getattr(refusal, name) is not None:
                fields[name] = getattr(refusal, name)
        # a certificate refused is worth a warning; a port scan or plain HTTP is not
        level = logging.WARNING if refusal.verify_code is not None else logging.INFO
        log.log(level, "refused: %s", refusal.description, extra=fields)


def _keep_client_certificate(connection: Any, direction: str, version: int, content_type: Any, msg_type: Any,
                             data: bytes) -> None:
    if direction == "read" and msg_type == _CERTIFICATE_MESSAGE and isinstance(connection, ReportingSSLObject):
        connection.client_certificate_message = (int(version), bytes(data))


def _describe(message: tuple[int, bytes] | None) -> tuple[str | None, str | None, str | None]:
    """(subject, issuer, serial in hex) of the certificate a Certificate message carries."""
    der = leaf_from_certificate_message(*message) if message else None
    if der is None:
        return None, None, None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None, None, None
    return cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), format(cert.serial_number, "x")
