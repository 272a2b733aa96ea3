"""Puppet autosign: what a certificate signing request must be to be signed, as far as the
request alone can tell (the host's state and its one-time token are the Governor's part, see
:meth:`governord.service.Governor.verify_autosign`).

A request is signed only if it asks for exactly the certificate governord prepared: its own
subject, a valid signature, and no certificate extension beyond those governord put into the
host's cloud-config (``puppet.csr_attributes.extension_requests`` of the registrar's
``prepare`` record), each with the value governord gave it. Whoever holds the token (an
application could read it once) must not get ``pp_*`` trusted facts, alternative DNS names or
any other extension of their choosing into a certificate the site's Puppet trusts.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.x509.oid import AttributeOID, NameOID

#: DER tags of the ASN.1 string types an extension value may be written as (UTF8String is what
#: Puppet writes; PrintableString and IA5String are read too).
_DER_STRINGS = {0x0C, 0x13, 0x16}


def der_string(data: bytes) -> str | None:
    """The text of a DER-encoded ASN.1 string (an extension's value), or None if it is not one."""
    if len(data) < 2 or data[0] not in _DER_STRINGS:
        return None
    length, start = data[1], 2
    if length & 0x80:  # long form: the next (length & 0x7f) bytes hold the length
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            return None
        length, start = int.from_bytes(data[2:2 + count], "big"), 2 + count
    if len(data) != start + length:
        return None
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_request(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """The request in ``csr_pem``. :raises ValueError: it is not one PEM certificate request."""
    data = csr_pem.encode("utf-8", "replace") if isinstance(csr_pem, str) else csr_pem
    return x509.load_pem_x509_csr(data)


def common_names(csr: x509.CertificateSigningRequest) -> list[str]:
    return [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def challenge_password(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The request's ``challengePassword`` as the bytes it carries (None if it has none).
    Bytes, not text: any bytes may arrive, and comparing them never raises."""
    try:
        raw = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        return None
    return raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "surrogateescape")


def token_matches(given: bytes | None, token: Any) -> bool:
    """Is ``given`` (a challengePassword) the one-time ``token``? In constant time, on bytes."""
    if given is None or not token:
        return False
    return hmac.compare_digest(given, str(token).encode("utf-8"))


def allowed_extensions(record: Mapping[str, Any] | None) -> dict[str, str]:
    """The extension requests governord put into the host's cloud-config (OID -> value), from a
    registrar's ``prepare`` record; none if it put none there."""
    try:
        requested = record["cloud_config"]["puppet"]["csr_attributes"]["extension_requests"]  # type: ignore[index]
    except (KeyError, TypeError):
        return {}
    if not isinstance(requested, Mapping):
        return {}
    return {str(oid): str(value) for oid, value in requested.items()}


def extension_refusal(csr: x509.CertificateSigningRequest, allowed: Mapping[str, str]) -> str | None:
    """Why the request's extensions must not be signed (None if they may): it asks for one
    governord did not put into the cloud-config, or for one of those with another value, or
    its extension request cannot be read."""
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:
        return f"the request's extensions cannot be read: {exc}"
    for extension in extensions:
        oid = extension.oid.dotted_string
        if oid not in allowed:
            return f"the request asks for extension {oid}, which governord did not put into its cloud-config"
        value = extension.value
        text = der_string(value.value) if isinstance(value, x509.UnrecognizedExtension) else None
        if text != allowed[oid]:
            return f"the request asks for extension {oid} with another value than governord gave it"
    return None
