"""governord's own certificate authority: created on first start in the state directory, it
issues the API server's certificate and one client certificate per application (an application
is identified by its certificate's common name, or the SAN ``api.tls.identity`` names; the
application's private key is handed out once and not kept). And a site CA's revocation lists,
when a site CA issues the applications' certificates instead (``api.tls.client_ca`` and
``client_crl``)."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=397)


@dataclass(frozen=True)
class IssuedPair:
    certificate: Path
    #: the private key's file; None when it was not kept (see :meth:`CertificateAuthority.issue`)
    key: Path | None
    #: the certificate's serial number, as hex
    serial: str = ""
    not_after: float = 0.0
    #: the issuer's name (RFC 4514): with the serial, what a revocation names
    issuer: str = ""
    #: the private key, PEM (PKCS#8)
    key_pem: bytes = field(default=b"", repr=False)


def _write_private(path: Path, data: bytes) -> None:
    # created 0600 from the start: the key is never readable by others, not even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class CertificateAuthority:
    """The CA in ``<state_dir>/pki``: ``ca.pem``, ``ca.key`` (0600), issued pairs beside them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cert_path = directory / "ca.pem"
        self.key_path = directory / "ca.key"

    def ensure(self) -> None:
        """Create the CA if it does not exist yet; warn about application keys an older version
        kept in ``issued/``."""
        kept = sorted(str(p) for p in (self.directory / "issued").glob("app-*.key"))
        if kept:
            log.warning("application private keys kept by an older governord: delete them once their applications "
                        "have theirs (governord no longer keeps any)", extra={"files": kept})
        if self.cert_path.exists() and self.key_path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "governord CA")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False, key_agreement=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.key_path, _key_pem(key))
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def issue(self, common_name: str, *, server_names: list[str] | None = None, stem: str,
              keep_key: bool = True, client_names: list[x509.GeneralName] | None = None) -> IssuedPair:
        """Issue a leaf certificate: a server one when ``server_names`` is given, else a client one
        (with ``client_names`` as its subject alternative names, if given).

        The certificate is written to ``issued/STEM.pem``; the key to ``issued/STEM.key`` (0600)
        only with ``keep_key``: an application's key is handed out once (``key_pem``) and never
        stored, the server's own key is kept."""
        ca_cert, ca_key = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if server_names:
            alt: list[x509.GeneralName] = []
            for entry in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(entry)))
                except ValueError:
                    alt.append(x509.DNSName(entry))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            if client_names:
                builder = builder.add_extension(x509.SubjectAlternativeName(client_names), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        out = self.directory / "issued"
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        pair = IssuedPair(out / f"{stem}.pem", out / f"{stem}.key" if keep_key else None,
                          format(cert.serial_number, "x"), cert.not_valid_after_utc.timestamp(),
                          cert.issuer.rfc4514_string(), _key_pem(key))
        if pair.key is not None:
            _write_private(pair.key, pair.key_pem)
        pair.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pair

    def subject(self) -> str:
        """The CA's own name (RFC 4514): the issuer of what it issues."""
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes()).subject.rfc4514_string()


# --- a site CA's certificate revocation lists ----------------------------------------------

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.DOTALL)
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class RevocationListError(ValueError):
    """A CRL file governord cannot use; the message says why, naming the file."""


@dataclass(frozen=True)
class RevocationLists:
    """The CRLs of a site CA (one per issuing CA), checked against the CAs they speak for.

    ``pem`` is exactly the text that was checked, so what OpenSSL loads is what was validated.
    """

    path: Path
    pem: bytes
    crls: tuple[x509.CertificateRevocationList, ...]

    def is_revoked(self, certificate: x509.Certificate) -> bool:
        """Whether a CRL from ``certificate``'s issuer lists its serial number."""
        for crl in self.crls:
            if crl.issuer == certificate.issuer and \
                    crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None:
                return True
        return False

    def stale(self, now: datetime.datetime | None = None) -> list[str]:
        """Issuers whose CRL is past its next update (OpenSSL then refuses their clients)."""
        now = now or datetime.datetime.now(datetime.UTC)
        return [crl.issuer.rfc4514_string() for crl in self.crls
                if crl.next_update_utc is not None and crl.next_update_utc < now]


def load_revocation_lists(path: Path, ca_file: Path) -> RevocationLists:
    """Read the PEM CRLs in ``path`` and check that each is signed by a CA in ``ca_file``.

    :raises RevocationListError: unreadable file, no CRL in it, a CRL that does not parse, or
        one no CA of ``ca_file`` signed.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RevocationListError(f"cannot read CRL file {path}: {exc.strerror}") from None
    blocks = _PEM_CRL.findall(data)
    if not blocks:
        raise RevocationListError(f"{path} holds no PEM CRL (-----BEGIN X509 CRL-----)")
    try:
        cas = [x509.load_pem_x509_certificate(block) for block in _PEM_CERT.findall(ca_file.read_bytes())]
    except (OSError, ValueError) as exc:
        raise RevocationListError(f"cannot read the CA certificates in {ca_file}: {exc}") from None
    crls = []
    for index, block in enumerate(blocks, 1):
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise RevocationListError(f"CRL {index} in {path} does not parse: {exc}") from None
        issuers = [ca for ca in cas if ca.subject == crl.issuer]
        if not any(_signed_by(crl, ca) for ca in issuers):
            problem = "its signature does not verify" if issuers else "no CA there has its issuer's name"
            raise RevocationListError(f"CRL {index} in {path} (issuer {crl.issuer.rfc4514_string()}) is not "
                                      f"signed by a CA in {ca_file}: {problem}")
        crls.append(crl)
    return RevocationLists(path, b"\n".join(blocks) + b"\n", tuple(crls))


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a key type CRLs cannot be signed with
        return False
