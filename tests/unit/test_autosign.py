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
