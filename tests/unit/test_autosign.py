"""Puppet autosign decided by governord: only a live host it is bringing up, with the one-time
token its registrar issued as challengePassword, and only once; every decision audited."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import AttributeOID, NameOID

from governord import testing
from governord.runtime import Runtime

from .conftest import wait_states


def csr(certname: str, password: str | None, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)]))
    if password is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, password.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def test_autosign_decisions(make_runtime) -> None:  # type: ignore[no-untyped-def]
    testing.MemoryRegistrar.preauthorise["cmdb"] = True
    testing.MemoryRegistrar.readiness["cmdb"] = {"demo-node-01.lab.example": False}
    runtime: Runtime = await make_runtime()
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"configuring"})
        token = row["registrations"]["cmdb"]["autosign_token"]
        fqdn = row["fqdn"]
        verify = runtime.governor.verify_autosign

        assert (await verify(fqdn, csr(fqdn, None), actor="t"))[:2] == (False, "the request carries no challengePassword")
        refused = await verify(fqdn, csr(fqdn, "guessed"), actor="t")
        assert refused[:2] == (False, "the challengePassword is not the token issued for this host")
        other = await verify("intruder.lab.example", csr("intruder.lab.example", token), actor="t")
        assert other[:2] == (False, "governord is bringing up no host intruder.lab.example")
        mismatch = await verify(fqdn, csr("other.lab.example", token), actor="t")
        assert mismatch[0] is False and "not demo-node-01.lab.example" in mismatch[1]
        assert (await verify(fqdn, "-----BEGIN CERTIFICATE REQUEST-----\nxx\n", actor="t"))[0] is False

        signed = await verify(fqdn, csr(fqdn, token), actor="t")
        assert signed[:2] == (True, "pre-authorised by governord")
        again = await verify(fqdn, csr(fqdn, token), actor="t")
        assert again[:2] == (False, "the token was used already")

        kinds = [e["kind"] for e in await runtime.store.list_events(host_id=row["id"])]
        assert kinds.count("autosign-refused") == 5 and kinds.count("autosign-signed") == 1  # the intruder has no host

        # a host on its way out is never signed
        testing.MemoryRegistrar.readiness["cmdb"][fqdn] = True
        await wait_states(runtime, [row["id"]], {"ready"})
        refused_ready = await verify(fqdn, csr(fqdn, token), actor="t")
        assert refused_ready[:2] == (False, f"host {fqdn} is ready, not being brought up")
    finally:
        await runtime.stop()


async def test_an_expired_token_is_refused(make_runtime) -> None:  # type: ignore[no-untyped-def]
    """Registrars write expires_at as ISO 8601 UTC (the Puppet CA registrar does): past is refused."""
    from sqlalchemy import update

    from governord.store.schema import hosts

    testing.MemoryRegistrar.preauthorise["cmdb"] = True
    testing.MemoryRegistrar.readiness["cmdb"] = {"demo-node-01.lab.example": False}
    runtime: Runtime = await make_runtime()
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"configuring"})
        record = {**row["registrations"]["cmdb"], "expires_at": "2020-01-01T00:00:00Z"}
        async with runtime.store.transaction() as conn:
            await conn.execute(update(hosts).where(hosts.c.id == row["id"]).values(
                registrations={**row["registrations"], "cmdb": record}))
        refused = await runtime.governor.verify_autosign(row["fqdn"], csr(row["fqdn"], record["autosign_token"]),
                                                         actor="t")
        assert refused[:2] == (False, "the token has expired")
    finally:
        await runtime.stop()


# -- the token is spent by the deciding transaction ---------------------------------------------


async def _configuring_host(make_runtime) -> tuple[Runtime, dict]:  # type: ignore[no-untyped-def,type-arg]
    testing.MemoryRegistrar.preauthorise["cmdb"] = True
    testing.MemoryRegistrar.readiness["cmdb"] = {"demo-node-01.lab.example": False}
    runtime: Runtime = await make_runtime()
    decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [row] = await wait_states(runtime, decision.request["host_ids"], {"configuring"})
    return runtime, row


async def test_two_hundred_refusals_do_not_hide_that_the_token_was_spent(make_runtime) -> None:  # type: ignore[no-untyped-def]
    """Before, single use was read off the newest 200 events of the host: 200 refused CSRs
    pushed the "signed" event out of sight and the token signed a second request."""
    runtime, row = await _configuring_host(make_runtime)
    try:
        fqdn, token = row["fqdn"], row["registrations"]["cmdb"]["autosign_token"]
        key = ec.generate_private_key(ec.SECP256R1())
        assert (await runtime.governor.verify_autosign(fqdn, csr(fqdn, token, key), actor="t"))[0] is True
        wrong = csr(fqdn, "guessed", key)
        for _ in range(200):
            assert (await runtime.governor.verify_autosign(fqdn, wrong, actor="t"))[0] is False
        again = await runtime.governor.verify_autosign(fqdn, csr(fqdn, token), actor="t")
        assert again[:2] == (False, "the token was used already")
        [spent] = await runtime.store.list_hosts(ids=[row["id"]])
        assert spent["autosign_used_at"] is not None
    finally:
        await runtime.stop()


async def test_of_two_requests_at_once_one_is_signed(make_runtime) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    runtime, row = await _configuring_host(make_runtime)
    try:
        fqdn, token = row["fqdn"], row["registrations"]["cmdb"]["autosign_token"]
        answers = await asyncio.gather(*(runtime.governor.verify_autosign(fqdn, csr(fqdn, token), actor="t")
                                         for _ in range(8)))
        assert sorted(a[0] for a in answers) == [False] * 7 + [True]
        kinds = [e["kind"] for e in await runtime.store.list_events(host_id=row["id"], kind_prefix="autosign-")]
        assert kinds.count("autosign-signed") == 1 and kinds.count("autosign-refused") == 7
    finally:
        await runtime.stop()


async def test_a_non_ascii_challenge_password_is_refused_and_audited(make_runtime) -> None:  # type: ignore[no-untyped-def]
    """Before, comparing it as text raised TypeError (hmac.compare_digest takes ASCII str only):
    refused by accident, and no audit event."""
    runtime, row = await _configuring_host(make_runtime)
    try:
        fqdn = row["fqdn"]
        refused = await runtime.governor.verify_autosign(fqdn, csr(fqdn, "pässwörd-ünïcode"), actor="t")
        assert refused[:2] == (False, "the challengePassword is not the token issued for this host")
        [event] = await runtime.store.list_events(host_id=row["id"], kind_prefix="autosign-")
        assert event["kind"] == "autosign-refused" and event["detail"]["certname"] == fqdn
    finally:
        await runtime.stop()


# -- the CSR asks for no extension governord did not put into the cloud-config ---------------------

MARKER_OID = "1.3.6.1.4.1.34380.1.2.1"
PP_ROLE = "1.3.6.1.4.1.34380.1.1.13"


def _utf8(text: str) -> bytes:
    """A DER UTF8String, as Puppet writes an extension request's value."""
    data = text.encode()
    assert len(data) < 128
    return bytes([0x0C, len(data)]) + data


def csr_with(certname: str, password: str, extensions: list[x509.ExtensionType]) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certname)]))
               .add_attribute(AttributeOID.CHALLENGE_PASSWORD, password.encode()))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


async def test_only_the_extensions_governord_asked_for_are_signed(make_runtime) -> None:  # type: ignore[no-untyped-def]
    """The token's holder (an application could read it) must not get pp_* trusted facts or
    other names into the certificate: any extension but the cloud-config's, or with another
    value, is refused; a refusal does not spend the token."""
    from sqlalchemy import update

    from governord.store.schema import hosts

    runtime, row = await _configuring_host(make_runtime)
    try:
        fqdn = row["fqdn"]
        marker = f"governord:host-id={row['id']}"
        record = {**row["registrations"]["cmdb"], "cloud_config": {"puppet": {"csr_attributes": {
            "custom_attributes": {"1.2.840.113549.1.9.7": row["registrations"]["cmdb"]["autosign_token"]},
            "extension_requests": {MARKER_OID: marker}}}}}
        async with runtime.store.transaction() as conn:
            await conn.execute(update(hosts).where(hosts.c.id == row["id"]).values(
                registrations={**row["registrations"], "cmdb": record}))
        token = record["autosign_token"]
        ours = x509.UnrecognizedExtension(x509.ObjectIdentifier(MARKER_OID), _utf8(marker))
        verify = runtime.governor.verify_autosign

        role = x509.UnrecognizedExtension(x509.ObjectIdentifier(PP_ROLE), _utf8("puppetserver"))
        refused = await verify(fqdn, csr_with(fqdn, token, [ours, role]), actor="t")
        assert refused[0] is False and PP_ROLE in refused[1] and "did not put" in refused[1]
        alone = await verify(fqdn, csr_with(fqdn, token, [role]), actor="t")
        assert alone[0] is False and PP_ROLE in alone[1]
        other = x509.UnrecognizedExtension(x509.ObjectIdentifier(MARKER_OID), _utf8("governord:host-id=someone-else"))
        changed = await verify(fqdn, csr_with(fqdn, token, [other]), actor="t")
        assert changed[0] is False and "another value" in changed[1]
        names = x509.SubjectAlternativeName([x509.DNSName("puppet"), x509.DNSName(fqdn)])
        alt = await verify(fqdn, csr_with(fqdn, token, [ours, names]), actor="t")
        assert alt[0] is False and "2.5.29.17" in alt[1]

        # what governord asked for is signed (the refusals left the token unspent); asking for
        # nothing is fine too, but by then the token is spent
        assert (await verify(fqdn, csr_with(fqdn, token, [ours]), actor="t"))[:2] == (True, "pre-authorised by governord")
        assert (await verify(fqdn, csr_with(fqdn, token, []), actor="t"))[1] == "the token was used already"
        kinds = [e["kind"] for e in await runtime.store.list_events(host_id=row["id"], kind_prefix="autosign-")]
        assert kinds == ["autosign-refused"] * 4 + ["autosign-signed", "autosign-refused"]
    finally:
        await runtime.stop()


def test_extension_refusal_without_a_cloud_config_refuses_every_extension() -> None:
    from governord.autosign import allowed_extensions, extension_refusal, load_request

    role = x509.UnrecognizedExtension(x509.ObjectIdentifier(PP_ROLE), _utf8("x"))
    request = load_request(csr_with("n1.lab.example", "t", [role]))
    assert allowed_extensions({"autosign_token": "t"}) == {}
    assert allowed_extensions({"cloud_config": {"puppet": "not a mapping"}}) == {}
    assert "did not put" in str(extension_refusal(request, {}))
    assert extension_refusal(load_request(csr_with("n1.lab.example", "t", [])), {}) is None
    # a value that is no DER string never matches
    raw = x509.UnrecognizedExtension(x509.ObjectIdentifier(PP_ROLE), b"\x04\x01x")
    assert "another value" in str(extension_refusal(load_request(csr_with("n1.lab.example", "t", [raw])), {PP_ROLE: "x"}))
