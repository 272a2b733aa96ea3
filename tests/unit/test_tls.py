"""The pieces of the application API's TLS that need no connection: a site CA's CRLs (which CA
signed them, which certificate they revoke), and reading the client's certificate out of a TLS
Certificate message. The handshakes themselves are tested over real connections to the daemon
in tests/system/test_api.py."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from governord.api.tls import classify, leaf_from_certificate_message
from governord.pki import RevocationListError, load_revocation_lists

NOW = datetime.datetime.now(datetime.UTC)


def _ca(name: str, days: int = 10) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - datetime.timedelta(days=1))
            .not_valid_after(NOW + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(key, hashes.SHA256()))
    return cert, key


def _leaf(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], serial: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app")]))
            .issuer_name(ca[0].subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=5))
            .sign(ca[1], hashes.SHA256()))


def _crl(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], revoked: list[int],
         next_update: datetime.datetime = NOW + datetime.timedelta(days=1)) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca[0].subject)
               .last_update(NOW - datetime.timedelta(days=2)).next_update(next_update))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW).build())
    return builder.sign(ca[1], hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_crls_of_a_bundle_revoke_by_issuer_and_serial(tmp_path: Path) -> None:
    one, two = _ca("Issuing CA 1"), _ca("Issuing CA 2")
    bundle = tmp_path / "cas.pem"
    bundle.write_bytes(_pem(one[0]) + _pem(two[0]))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(one, [1001]) + _crl(two, [], next_update=NOW - datetime.timedelta(hours=1)))
    lists = load_revocation_lists(crl, bundle)
    assert len(lists.crls) == 2
    assert lists.is_revoked(_leaf(one, 1001))
    assert not lists.is_revoked(_leaf(two, 1001))  # the same serial from the other CA is not revoked
    assert not lists.is_revoked(_leaf(one, 1002))
    assert lists.stale() == ["CN=Issuing CA 2"]


def test_a_crl_no_ca_of_the_bundle_signed_is_refused(tmp_path: Path) -> None:
    site, impostor = _ca("Site CA"), _ca("Site CA")
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(_pem(site[0]))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(impostor, [7]))
    with pytest.raises(RevocationListError, match="is not signed by a CA in .*its signature does not verify"):
        load_revocation_lists(crl, bundle)
    crl.write_bytes(_crl(_ca("Another CA"), [7]))
    with pytest.raises(RevocationListError, match="no CA there has its issuer's name"):
        load_revocation_lists(crl, bundle)
    crl.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    with pytest.raises(RevocationListError, match="CRL 1 in .* does not parse"):
        load_revocation_lists(crl, bundle)


def _message(version: int, der: bytes) -> bytes:
    entry = len(der).to_bytes(3, "big") + der + (b"\x00\x00" if version >= ssl.TLSVersion.TLSv1_3 else b"")
    body = (b"\x00" if version >= ssl.TLSVersion.TLSv1_3 else b"") + len(entry).to_bytes(3, "big") + entry
    return b"\x0b" + len(body).to_bytes(3, "big") + body


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_the_leaf_is_read_from_a_certificate_message(version: int) -> None:
    der = _leaf(_ca("CA"), 5).public_bytes(serialization.Encoding.DER)
    message = _message(version, der)
    assert leaf_from_certificate_message(version, message) == der
    assert leaf_from_certificate_message(version, message[:40]) is None  # cut short
    assert leaf_from_certificate_message(version, _message(version, b"")) is None  # no certificate sent
    assert leaf_from_certificate_message(version, b"\x0c" + message[1:]) is None  # not a Certificate message


def test_verification_codes_name_the_reason() -> None:
    def verify_error(code: int) -> ssl.SSLCertVerificationError:
        error = ssl.SSLCertVerificationError(1, "certificate verify failed")
        error.verify_code = code
        return error

    assert classify(verify_error(10)) == ("expired", "expired")
    assert classify(verify_error(9)) == ("not_yet_valid", "not yet valid")
    assert classify(verify_error(20)) == ("unknown_ca", "unknown CA")
    assert classify(verify_error(23)) == ("revoked_by_crl", "revoked by CRL")
    assert classify(verify_error(99)) == ("verify_failed", "certificate verification failed")
    assert classify(ssl.SSLError(1, "wrong version number")) == ("handshake_failed", "TLS handshake failed")
