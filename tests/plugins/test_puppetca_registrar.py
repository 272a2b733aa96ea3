"""The Puppet CA registrar against Debian's real puppetserver, checked from the other side.

Effects are read back over plain HTTP with the lab's governord CA-client certificate (the CA's
``certificate_status``) and by running the real ``puppet agent``: a CSR carrying the prepared
token is signed by the lab's autosign policy, and after ``deregister`` the same agent (same
ssldir) is refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID

from governord.errors import PermanentError, RetryableError
from governord.models import HostOrigin, HostState, HostView
from governord.plugins.puppetca import governord_register_registrars
from governord.plugins.puppetca.registrar import (
    CHALLENGE_PASSWORD_OID,
    PuppetCAConfig,
    PuppetCARegistrar,
    PuppetCATagMapping,
    autosign_refusal,
)
from governord.registrars import Phase, RegistrarRegistry
from lab.puppet import add_token
from tests.fixtures.puppet import PuppetLab

NAME = "puppetca"


def make_host(
    fqdn: str, *, registrations: dict[str, Any] | None = None, origin: HostOrigin = HostOrigin.PROVISIONED
) -> HostView:
    """A host record as the engine hands it to registrars."""
    return HostView(
        id=str(uuid.uuid4()), name=fqdn.split(".")[0], fqdn=fqdn, app="openshift", role="node",
        origin=origin, state=HostState.REQUESTED, provider="lab", machine_id=None,
        tags=("node",), addresses=(), classification={}, registrations=registrations or {},
    )


def with_record(host: HostView, record: dict[str, Any] | None) -> HostView:
    """The host as the engine hands it on after storing ``record`` for this registrar."""
    registrations = dict(host.registrations)
    if record is not None:
        registrations[NAME] = record
    return HostView(**{**host.__dict__, "registrations": registrations})


def make_config(**values: Any) -> PuppetCAConfig:
    config = PuppetCARegistrar.Config.model_validate({"type": "puppetca", "call_timeout": 20, **values})
    assert isinstance(config, PuppetCAConfig)
    return config


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_csr(certname: str, challenge: str | None) -> bytes:
    """A PEM CSR like an agent's, with ``challenge`` as its challengePassword."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)])
    )
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# -- pure parts (no server) -------------------------------------------------------------------


def test_plugin_registers_the_puppetca_type() -> None:
    registry = RegistrarRegistry()
    governord_register_registrars(registry)
    # registered lazily: the config models are known, the class is imported when loaded
    entry = registry.get("puppetca")
    assert entry is not None and entry.Config is PuppetCARegistrar.Config and entry.TagMapping is PuppetCARegistrar.TagMapping
    assert registry.load("puppetca") is PuppetCARegistrar
    assert PuppetCARegistrar.deregister_phase is Phase.BEFORE_MACHINE


def files(tmp_path: Path, *names: str) -> list[Path]:
    """Files the config names: they must exist when it is validated (ReadableFile)."""
    made = [tmp_path / name for name in names]
    for path in made:
        path.write_text("x")
    return made


def test_config_defaults_and_strictness(tmp_path: Path) -> None:
    cert, key = files(tmp_path, "c.pem", "secret-key-path.pem")
    config = make_config(client_cert=str(cert), client_key=str(key))
    assert config.url == "https://puppet:8140"
    assert config.puppet_server == "puppet"
    assert config.verify_tls is True and config.ca_file is None
    assert config.token_ttl > 0
    assert "secret-key-path" not in repr(config)
    explicit = make_config(url="https://ca.example:8140/", client_cert=str(cert), client_key=str(key),
                           puppet_server="puppet.example")
    assert explicit.url == "https://ca.example:8140" and explicit.puppet_server == "puppet.example"
    base = {"client_cert": str(cert), "client_key": str(key)}
    assert config.marker_oid == "1.3.6.1.4.1.34380.1.2.1"
    assert make_config(client_cert=str(cert), client_key=str(key), marker_oid="1.3.6.1.4.1.34380.1.2.7.1").marker_oid
    for bad in ({"url": "http://puppet:8140"}, {"url": "puppet:8140"}, {"token_ttl": 0},
                {"colour": "blue"}, {"client_cert": None}, {"marker_oid": "1.3.6.1.4.1.34380.1.1.1"},
                {"marker_oid": "1.3.6.1.4.1.34380.1.2"}, {"marker_oid": "pp_uuid"},
                {"client_key": str(tmp_path / "absent.key")}, {"ca_file": str(tmp_path)}):
        with pytest.raises(pydantic.ValidationError):
            make_config(**{**base, **bad})
    with pytest.raises(pydantic.ValidationError):
        make_config(client_cert=str(cert))
    with pytest.raises(pydantic.ValidationError):
        PuppetCATagMapping.model_validate({"hostgroup": "x"})
    reg = PuppetCARegistrar(NAME, config)
    assert reg.classify([("node", PuppetCATagMapping())]) == {}


async def test_prepare_is_idempotent_without_asking_the_ca(tmp_path: Path) -> None:
    """A record with a token is returned unchanged; the closed port proves no request is made."""
    files(tmp_path, "c", "k")
    reg = PuppetCARegistrar(NAME, make_config(
        url=f"https://127.0.0.1:{closed_port()}", client_cert=str(tmp_path / "c"), client_key=str(tmp_path / "k"),
    ))
    record = {"certname": "n1.lab.example", "autosign_token": "tok", "expires_at": "2000-01-01T00:00:00Z",
              "cloud_config": {"puppet": {}}}
    host = make_host("n1.lab.example", registrations={NAME: record})
    assert await reg.prepare(host, {}) is record


async def test_prepare_for_an_adopted_host_makes_a_token_and_cloud_config(tmp_path: Path) -> None:
    """Adopted machines already have their certificate, so the CA is not asked about leftovers."""
    files(tmp_path, "c", "k")
    reg = PuppetCARegistrar(NAME, make_config(
        url=f"https://127.0.0.1:{closed_port()}", client_cert=str(tmp_path / "c"), client_key=str(tmp_path / "k"),
        puppet_server="puppet.lab.example", token_ttl=600,
    ))
    host = make_host("Web1.Lab.Example", origin=HostOrigin.ADOPTED)
    before = datetime.datetime.now(datetime.UTC)
    record = await reg.prepare(host, {})
    assert record is not None
    token = record["autosign_token"]
    assert len(token) >= 40
    assert record["certname"] == "web1.lab.example"
    expires = datetime.datetime.fromisoformat(record["expires_at"])
    assert before + datetime.timedelta(seconds=590) < expires <= before + datetime.timedelta(seconds=601)
    assert record["cloud_config"] == {"puppet": {
        "conf": {"agent": {"server": "puppet.lab.example", "certname": "web1.lab.example"}},
        "csr_attributes": {"custom_attributes": {CHALLENGE_PASSWORD_OID: token},
                           "extension_requests": {"1.3.6.1.4.1.34380.1.2.1": f"governord:host-id={host.id}"}},
    }}
    again = await reg.prepare(with_record(host, record), {})
    assert again == record
    other = await reg.prepare(make_host("web2.lab.example", origin=HostOrigin.ADOPTED), {})
    assert other is not None and other["autosign_token"] != token


def test_autosign_refusal_checks_name_token_and_expiry() -> None:
    now = datetime.datetime.now(datetime.UTC)
    record = {"certname": "n1.lab.example", "autosign_token": "right-token",
              "expires_at": (now + datetime.timedelta(hours=1)).isoformat()}
    assert autosign_refusal(record, "n1.lab.example", make_csr("n1.lab.example", "right-token")) is None
    assert "wrong challengePassword" in str(autosign_refusal(record, "n1.lab.example", make_csr("n1.lab.example", "other")))
    assert "no challengePassword" in str(autosign_refusal(record, "n1.lab.example", make_csr("n1.lab.example", None)))
    assert "not n1.lab.example" in str(autosign_refusal(record, "n1.lab.example", make_csr("n2.lab.example", "right-token")))
    assert "issued for" in str(autosign_refusal(record, "n2.lab.example", make_csr("n2.lab.example", "right-token")))
    assert "expired" in str(autosign_refusal(record, "n1.lab.example", make_csr("n1.lab.example", "right-token"),
                                             now=now + datetime.timedelta(hours=2)))
    assert "no autosign token" in str(autosign_refusal(None, "n1.lab.example", make_csr("n1.lab.example", "x")))
    assert "not a PEM" in str(autosign_refusal(record, "n1.lab.example", b"garbage"))


def _extension(oid: str, text: str) -> x509.UnrecognizedExtension:
    """An extension request as Puppet writes one: the value a DER UTF8String."""
    data = text.encode()
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), bytes([0x0C, len(data)]) + data)


def _csr_asking(certname: str, challenge: str, *extensions: x509.ExtensionType) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)]))
               .add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode()))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


async def test_autosign_refusal_takes_only_the_extensions_the_cloud_config_asks_for(tmp_path: Path) -> None:
    """The prepared record's own cloud-config asks for the ownership marker: that CSR passes; one
    that also asks for a trusted fact (pp_role), or for the marker of another host, does not."""
    files(tmp_path, "c", "k")
    reg = PuppetCARegistrar(NAME, make_config(
        url=f"https://127.0.0.1:{closed_port()}", client_cert=str(tmp_path / "c"), client_key=str(tmp_path / "k"),
    ))
    host = make_host("n1.lab.example", origin=HostOrigin.ADOPTED)
    record = await reg.prepare(host, {})
    assert record is not None
    token, marker_oid = record["autosign_token"], reg.settings.marker_oid
    [(oid, marker)] = record["cloud_config"]["puppet"]["csr_attributes"]["extension_requests"].items()
    assert (oid, marker) == (marker_oid, f"governord:host-id={host.id}")
    ours = _extension(marker_oid, marker)
    assert autosign_refusal(record, host.fqdn, _csr_asking(host.fqdn, token, ours)) is None
    role = _extension("1.3.6.1.4.1.34380.1.1.13", "puppetserver")
    assert "1.3.6.1.4.1.34380.1.1.13" in str(autosign_refusal(record, host.fqdn, _csr_asking(host.fqdn, token, ours, role)))
    theirs = _extension(marker_oid, "governord:host-id=another")
    assert "another value" in str(autosign_refusal(record, host.fqdn, _csr_asking(host.fqdn, token, theirs)))
    # a password that is no ASCII is a wrong one, not a TypeError
    assert "wrong challengePassword" in str(autosign_refusal(record, host.fqdn, _csr_asking(host.fqdn, "tökén", ours)))
    await reg.close()


async def test_unreachable_ca_is_retryable(tmp_path: Path) -> None:
    files(tmp_path, "c", "k")
    reg = PuppetCARegistrar(NAME, make_config(
        url=f"https://127.0.0.1:{closed_port()}", client_cert=str(tmp_path / "c"), client_key=str(tmp_path / "k"),
        verify_tls=False,
    ))
    host = make_host("gone.lab.example")
    with pytest.raises(RetryableError) as info:
        await reg.lookup(host)
    assert info.value.source == NAME
    with pytest.raises(RetryableError):
        await reg.deregister(host)
    await reg.close()


async def test_a_client_certificate_gone_since_the_config_was_loaded_is_permanent(tmp_path: Path) -> None:
    """A missing file is refused when the config is loaded; one removed later fails for good
    at start, naming the key, rather than being retried."""
    cert, key = files(tmp_path, "gone.pem", "gone.key")
    reg = PuppetCARegistrar(NAME, make_config(url="https://127.0.0.1:1", client_cert=str(cert), client_key=str(key)))
    cert.unlink()
    key.unlink()
    with pytest.raises(PermanentError, match="client_cert"):
        await reg.start()


# -- against the real puppetserver -----------------------------------------------------------


@pytest.fixture
def lab_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA bundle in the environment that does not know the lab CA, as on this kind of machine:
    requests would let it override a session-level ``verify``; the registrar must not care."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())


def lab_config(lab: PuppetLab, **values: Any) -> PuppetCAConfig:
    stack = lab.stack
    return make_config(url=stack.server_url, ca_file=str(stack.ca_bundle), client_cert=str(stack.client_cert),
                       client_key=str(stack.client_key), puppet_server="puppet.lab.example", **values)


@pytest.fixture
async def registrar(puppet_stack: PuppetLab, lab_env: None) -> AsyncIterator[PuppetCARegistrar]:
    reg = PuppetCARegistrar(NAME, lab_config(puppet_stack))
    await reg.start()
    yield reg
    await reg.close()


def ca_status(lab: PuppetLab, certname: str) -> tuple[int, dict[str, Any] | None]:
    """The CA's certificate status of ``certname``, read with a plain client: (HTTP status, body)."""
    stack = lab.stack
    response = requests.get(f"{stack.server_url}/puppet-ca/v1/certificate_status/{certname}",
                            verify=str(stack.ca_bundle), cert=(str(stack.client_cert), str(stack.client_key)),
                            timeout=30)
    return response.status_code, (response.json() if response.status_code == 200 else None)


def ca_state(lab: PuppetLab, certname: str) -> str | None:
    """The certificate's state on the CA (None: it has no such certificate or request)."""
    status, body = ca_status(lab, certname)
    assert status in (200, 404), status
    return None if body is None else str(body["state"])


async def prepared_and_signed(lab: PuppetLab, reg: PuppetCARegistrar, prefix: str) -> tuple[HostView, dict[str, Any]]:
    """Prepare a host, let "governord" accept its token, run its agent with the cloud-config's
    csr_attributes; returns the host (with its record) and the record."""
    certname = lab.certname(prefix)
    host = make_host(certname)
    record = await reg.prepare(host, {})
    assert record is not None
    # what governord-autosign would answer; the lab's policy reads it from this file
    add_token(lab.workdir, certname, record["autosign_token"])
    code, output = lab.stack.run_agent(certname, csr_attributes=record["cloud_config"]["puppet"]["csr_attributes"])
    assert ca_state(lab, certname) == "signed", output[-2000:]
    return with_record(host, record), record


@pytest.mark.integration
async def test_prepared_token_gets_the_agent_signed(puppet_stack: PuppetLab, registrar: PuppetCARegistrar) -> None:
    certname = puppet_stack.certname("signed")
    host = make_host(certname)
    record = await registrar.prepare(host, {})
    assert record is not None and record["certname"] == certname
    host = with_record(host, record)
    assert await registrar.prepare(host, {}) is record
    assert (await registrar.register(host, {}))["certificate_state"] == "none"
    assert await registrar.lookup(host) is None
    assert await registrar.check_ready(host, 10.0) is None

    add_token(puppet_stack.workdir, certname, record["autosign_token"])
    code, output = puppet_stack.stack.run_agent(
        certname, csr_attributes=record["cloud_config"]["puppet"]["csr_attributes"])
    status, body = ca_status(puppet_stack, certname)
    assert status == 200 and body is not None and body["state"] == "signed", output[-2000:]
    registered = await registrar.register(host, {})
    assert registered["certificate_state"] == "signed"
    assert registered["autosign_token"] == record["autosign_token"]
    # an application sees the certificate's name and state and the token's validity: never the
    # token, nor the cloud-config that carries it (whoever holds it can have a CSR signed)
    assert PuppetCARegistrar.application_view(registered) == {
        "certname": certname, "certificate_state": "signed", "issued_at": record["issued_at"],
        "expires_at": record["expires_at"]}
    assert record["autosign_token"] not in repr(PuppetCARegistrar.application_view(record))
    found = await registrar.lookup(host)
    assert found is not None and found["state"] == "signed" and found["fingerprint"] == body["fingerprint"]


@pytest.mark.integration
async def test_a_wrong_token_leaves_the_request_pending_and_deregister_drops_it(
    puppet_stack: PuppetLab, registrar: PuppetCARegistrar,
) -> None:
    certname = puppet_stack.certname("wrongtoken")
    host = make_host(certname)
    record = await registrar.prepare(host, {})
    assert record is not None
    add_token(puppet_stack.workdir, certname, record["autosign_token"])
    code, output = puppet_stack.stack.run_agent(
        certname, csr_attributes={"custom_attributes": {CHALLENGE_PASSWORD_OID: "not-the-token"}})
    assert code != 0
    assert ca_state(puppet_stack, certname) == "requested", output[-2000:]
    host = with_record(host, record)
    assert (await registrar.register(host, {}))["certificate_state"] == "requested"
    await registrar.deregister(host)
    assert ca_status(puppet_stack, certname)[0] == 404


@pytest.mark.integration
async def test_deregister_cleans_the_certificate_and_the_old_agent_is_refused(
    puppet_stack: PuppetLab, registrar: PuppetCARegistrar,
) -> None:
    host, _record = await prepared_and_signed(puppet_stack, registrar, "cleaned")
    await registrar.deregister(host)
    assert ca_status(puppet_stack, host.fqdn) == (404, None)  # read over HTTP by a separate client
    assert await registrar.lookup(host) is None
    await registrar.deregister(host)  # already gone: still success
    code, output = puppet_stack.stack.run_agent(host.fqdn)
    assert code != 0
    assert "certificate" in output.lower(), output[-2000:]
    assert "Could not retrieve catalog" in output, output[-2000:]


@pytest.mark.integration
async def test_prepare_refuses_a_leftover_certificate(puppet_stack: PuppetLab, registrar: PuppetCARegistrar) -> None:
    """A new machine with the name of one whose certificate was never cleaned could not get signed."""
    old, _ = await prepared_and_signed(puppet_stack, registrar, "leftover")
    with pytest.raises(PermanentError, match="already has a signed certificate") as info:
        await registrar.prepare(make_host(old.fqdn), {})
    assert info.value.source == NAME
    await registrar.deregister(old)
    assert (await registrar.prepare(make_host(old.fqdn), {}) or {}).get("autosign_token")


@pytest.mark.integration
async def test_a_client_certificate_without_pp_cli_auth_is_refused_permanently(
    puppet_stack: PuppetLab, registrar: PuppetCARegistrar, lab_env: None,
) -> None:
    """An ordinary agent certificate is denied by auth.conf's 'puppetlabs cert status' rule (403)."""
    host, _ = await prepared_and_signed(puppet_stack, registrar, "plain")
    ssl_dir = puppet_stack.stack.agent_dir(host.fqdn) / "ssl"
    plain = PuppetCARegistrar(NAME, make_config(
        url=puppet_stack.stack.server_url, ca_file=str(puppet_stack.stack.ca_bundle),
        client_cert=str(ssl_dir / "certs" / f"{host.fqdn}.pem"),
        client_key=str(ssl_dir / "private_keys" / f"{host.fqdn}.pem"),
    ))
    await plain.start()
    with pytest.raises(PermanentError, match="HTTP 403") as info:
        await plain.lookup(host)
    assert "Forbidden" in str(info.value) and info.value.source == NAME
    with pytest.raises(PermanentError, match="HTTP 403"):
        await plain.deregister(host)
    assert ca_state(puppet_stack, host.fqdn) == "signed"
    await plain.close()


@pytest.mark.integration
async def test_an_untrusted_server_is_a_permanent_error(puppet_stack: PuppetLab, lab_env: None) -> None:
    """Without ca_file the system bundle (REQUESTS_CA_BUNDLE) is used, which does not know the lab CA."""
    stack = puppet_stack.stack
    reg = PuppetCARegistrar(NAME, make_config(url=stack.server_url, client_cert=str(stack.client_cert),
                                              client_key=str(stack.client_key)))
    with pytest.raises(PermanentError, match="not trusted"):
        await reg.lookup(make_host(puppet_stack.certname("untrusted")))
    await reg.close()


# -- the sweep: certificates that carry governord's marker ---------------------------------------


def test_marker_is_read_from_der_strings_of_either_length_form() -> None:
    from governord.plugins.puppetca.registrar import _der_string

    short = "governord:host-id=" + str(uuid.uuid4())
    assert _der_string(bytes([0x0C, len(short)]) + short.encode()) == short
    long_text = "x" * 200
    assert _der_string(bytes([0x0C, 0x81, 200]) + long_text.encode()) == long_text
    assert _der_string(bytes([0x16, 3]) + b"abc") == "abc"
    assert _der_string(bytes([0x04, 3]) + b"abc") is None  # an OCTET STRING is no text
    assert _der_string(bytes([0x0C, 5]) + b"abc") is None  # length disagrees
    assert _der_string(b"") is None


def signed_certificate(lab: PuppetLab, certname: str) -> x509.Certificate:
    """The CA's copy of a certificate, fetched with a plain client."""
    stack = lab.stack
    response = requests.get(f"{stack.server_url}/puppet-ca/v1/certificate/{certname}", verify=str(stack.ca_bundle),
                            timeout=30)
    assert response.status_code == 200, response.text
    return x509.load_pem_x509_certificate(response.content)


@pytest.mark.integration
async def test_the_signed_certificate_carries_the_marker(puppet_stack: PuppetLab, registrar: PuppetCARegistrar) -> None:
    host, _record = await prepared_and_signed(puppet_stack, registrar, "marked")
    extension = signed_certificate(puppet_stack, host.fqdn).extensions.get_extension_for_oid(
        x509.ObjectIdentifier("1.3.6.1.4.1.34380.1.2.1"))
    assert f"governord:host-id={host.id}".encode() in extension.value.value  # type: ignore[attr-defined]


@pytest.mark.integration
async def test_list_owned_finds_marked_certificates_and_requests_only(
    puppet_stack: PuppetLab, registrar: PuppetCARegistrar,
) -> None:
    signed, _ = await prepared_and_signed(puppet_stack, registrar, "owned")
    # an agent whose CSR carries no marker (not made from governord's cloud-config)
    plain = puppet_stack.certname("unmarked")
    token = add_token(puppet_stack.workdir, plain)
    puppet_stack.stack.run_agent(plain, csr_attributes={"custom_attributes": {CHALLENGE_PASSWORD_OID: token}})
    assert ca_state(puppet_stack, plain) == "signed"
    # a request that is still waiting (its token was wrong), marked
    waiting = make_host(puppet_stack.certname("waiting"))
    record = await registrar.prepare(waiting, {})
    assert record is not None
    attributes = record["cloud_config"]["puppet"]["csr_attributes"]
    puppet_stack.stack.run_agent(waiting.fqdn, csr_attributes={**attributes, "custom_attributes": {
        CHALLENGE_PASSWORD_OID: "not-the-token"}})
    assert ca_state(puppet_stack, waiting.fqdn) == "requested"

    listed = {entry.entry_id: entry for entry in await registrar.list_owned()}
    assert listed[signed.fqdn].host_id == signed.id and listed[signed.fqdn].details["state"] == "signed"
    assert listed[waiting.fqdn].host_id == waiting.id and listed[waiting.fqdn].details["state"] == "requested"
    assert plain not in listed
    assert "governord.lab.example" not in listed and all(e.system == NAME for e in listed.values())


@pytest.mark.integration
async def test_remove_owned_cleans_only_while_the_marker_is_the_listed_one(
    puppet_stack: PuppetLab, registrar: PuppetCARegistrar,
) -> None:
    signed, _ = await prepared_and_signed(puppet_stack, registrar, "orphan")
    [entry] = [e for e in await registrar.list_owned() if e.entry_id == signed.fqdn]
    stranger = dataclasses.replace(entry, host_id=str(uuid.uuid4()))
    assert await registrar.remove_owned(stranger) is False
    assert ca_state(puppet_stack, signed.fqdn) == "signed"
    assert await registrar.remove_owned(entry) is True
    assert ca_status(puppet_stack, signed.fqdn) == (404, None)
    assert await registrar.remove_owned(entry) is False

    waiting = make_host(puppet_stack.certname("orphan-request"))
    record = await registrar.prepare(waiting, {})
    assert record is not None
    attributes = record["cloud_config"]["puppet"]["csr_attributes"]
    puppet_stack.stack.run_agent(waiting.fqdn, csr_attributes={**attributes, "custom_attributes": {
        CHALLENGE_PASSWORD_OID: "wrong"}})
    [pending] = [e for e in await registrar.list_owned() if e.entry_id == waiting.fqdn]
    assert await registrar.remove_owned(pending) is True
    assert ca_status(puppet_stack, waiting.fqdn) == (404, None)


async def test_the_probe_is_one_authorised_call_to_the_ca(puppet_stack: PuppetLab, registrar: PuppetCARegistrar) -> None:
    assert await registrar.probe() is True
    stack = puppet_stack.stack
    gone = PuppetCARegistrar(NAME, make_config(
        url=f"https://127.0.0.1:{closed_port()}", ca_file=str(stack.ca_bundle), client_cert=str(stack.client_cert),
        client_key=str(stack.client_key), puppet_server="puppet.lab.example"))
    with pytest.raises(RetryableError):
        await gone.probe()

