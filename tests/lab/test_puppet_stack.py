"""The lab's real Puppet stack: CA, token autosign, Foreman as ENC, PuppetDB, as governord meets them.

One stack serves the whole run (``puppet_stack``, tests/fixtures/puppet.py); every test uses its
own certnames. Facts behind the expectations: shared/reference/puppet.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import requests
from cryptography import x509
from pypuppetdb import connect

from lab.puppet import SERVER_CERTNAME, challenge_attributes
from tests.fixtures.puppet import PuppetLab, random_token

pytestmark = pytest.mark.integration

#: Puppet's pp_cli_auth extension: what the stock auth.conf asks of CA admin clients
PP_CLI_AUTH = x509.ObjectIdentifier("1.3.6.1.4.1.34380.1.3.39")

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy (PuppetDB stores commands asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def ca(lab: PuppetLab, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A CA API call with governord's pp_cli_auth certificate (``verify`` per call: REQUESTS_CA_BUNDLE
    would override a session's)."""
    stack = lab.stack
    return requests.request(method, f"{stack.server_url}/puppet-ca/v1/{path}", verify=str(stack.ca_bundle),
                            cert=(str(stack.client_cert), str(stack.client_key)), timeout=30, **kwargs)


def ca_state(lab: PuppetLab, certname: str) -> str | None:
    response = ca(lab, "GET", f"certificate_status/{certname}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return str(response.json()["state"])


def pdb_query(lab: PuppetLab, endpoint: str, query: list[Any] | None = None) -> Any:
    params = {"query": json.dumps(query)} if query is not None else {}
    response = requests.get(f"{lab.stack.puppetdb_url}/pdb/query/v4/{endpoint}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def notify_events(lab: PuppetLab, certname: str) -> set[str] | None:
    """Titles of the Notify events in ``certname``'s latest report in PuppetDB (None: no report yet)."""
    reports = pdb_query(lab, "reports", ["and", ["=", "certname", certname], ["=", "latest_report?", True]])
    if not reports:
        return None
    events = pdb_query(lab, "events", ["and", ["=", "report", reports[0]["hash"]], ["=", "resource_type", "Notify"]])
    return {e["resource_title"] for e in events}


def signed_host(lab: PuppetLab, prefix: str, **foreman: Any) -> tuple[str, int, str]:
    """A host known to Foreman, pre-authorized, after its first agent run: (certname, rc, output)."""
    certname = lab.certname(prefix)
    lab.foreman_host(certname, **foreman)
    token = lab.authorize(certname)
    rc, output = lab.stack.run_agent(certname, csr_attributes=challenge_attributes(token))
    return certname, rc, output


# -- the stack itself ---------------------------------------------------------------------------


def test_both_services_answer_on_loopback(puppet_stack: PuppetLab) -> None:
    stack = puppet_stack.stack
    simple = requests.get(f"{stack.server_url}/status/v1/simple", verify=str(stack.ca_bundle), timeout=10)
    assert simple.status_code == 200 and simple.text == "running"
    pdb = requests.get(f"{stack.puppetdb_url}/status/v1/services/puppetdb-status", timeout=10)
    assert pdb.json()["state"] == "running"
    pdb_tls = requests.get(f"{stack.puppetdb_https_url}/pdb/meta/v1/version", verify=str(stack.ca_bundle),
                           cert=(str(stack.client_cert), str(stack.client_key)), timeout=10)
    assert pdb_tls.status_code == 200 and pdb_tls.json()["version"].startswith("7.")
    assert all(url.startswith(("http://127.0.0.1:", "https://127.0.0.1:"))
               for url in (stack.server_url, stack.puppetdb_url, stack.puppetdb_https_url))
    assert set(stack.pids()) == {"postgres", "puppetserver", "puppetdb"}


def test_certificates_cover_loopback_and_governord_is_a_ca_client(puppet_stack: PuppetLab) -> None:
    stack = puppet_stack.stack
    server = x509.load_pem_x509_certificate(stack.layout.cert(SERVER_CERTNAME).read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    client = x509.load_pem_x509_certificate(stack.client_cert.read_bytes())
    assert client.subject.rfc4514_string() == "CN=governord.lab.example"
    assert client.extensions.get_extension_for_oid(PP_CLI_AUTH)
    # the stock auth.conf: the CA's admin API is for pp_cli_auth certificates only
    assert ca(puppet_stack, "GET", "certificate_statuses/any").status_code == 200
    anonymous = requests.get(f"{stack.server_url}/puppet-ca/v1/certificate_statuses/any",
                             verify=str(stack.ca_bundle), timeout=10)
    assert anonymous.status_code == 403


# -- autosign with a challengePassword token ---------------------------------------------------


def test_agent_without_token_stays_unsigned(puppet_stack: PuppetLab) -> None:
    certname = puppet_stack.certname("notoken")
    puppet_stack.foreman_host(certname, hostgroup="openshift/node")
    rc, output = puppet_stack.stack.run_agent(certname)
    assert rc == 1, output
    assert "you might still need to sign this agent's certificate" in output
    assert ca_state(puppet_stack, certname) == "requested"


def test_wrong_token_is_refused(puppet_stack: PuppetLab) -> None:
    certname = puppet_stack.certname("wrongtoken")
    puppet_stack.foreman_host(certname, hostgroup="openshift/node")
    puppet_stack.authorize(certname)
    rc, output = puppet_stack.stack.run_agent(certname, csr_attributes=challenge_attributes(random_token()))
    assert rc == 1, output
    assert ca_state(puppet_stack, certname) == "requested"
    assert notify_events(puppet_stack, certname) is None


# -- Foreman classifies (ENC), the report in PuppetDB proves it ---------------------------------


@pytest.mark.parametrize(
    ("hostgroup", "own_classes", "expected"),
    [
        ("openshift/node", [], {"profile::base", "openshift::node"}),
        ("openshift/broker", ["openshift::master"], {"profile::base", "openshift::broker", "openshift::master"}),
    ],
    ids=["node", "broker+master"],
)
def test_token_signs_and_foreman_classes_are_applied(
    puppet_stack: PuppetLab, hostgroup: str, own_classes: list[str], expected: set[str]
) -> None:
    certname, rc, output = signed_host(puppet_stack, "classified", hostgroup=hostgroup, classes=own_classes)
    assert rc == 2, output  # --detailed-exitcodes: changes applied (the notifies)
    assert ca_state(puppet_stack, certname) == "signed"
    titles = eventually(lambda: notify_events(puppet_stack, certname), what=f"{certname}'s report in PuppetDB")
    assert titles == {f"{c} applied" for c in expected}
    classes = pdb_query(puppet_stack, "resources", ["and", ["=", "certname", certname], ["=", "type", "Class"]])
    assert {r["title"].lower() for r in classes} >= expected
    node = pdb_query(puppet_stack, f"nodes/{certname}")
    assert node["latest_report_status"] == "changed" and node["report_environment"] == "production"
    facts = pdb_query(puppet_stack, f"nodes/{certname}/facts/clientcert")
    assert facts[0]["value"] == certname


def test_host_unknown_to_foreman_gets_no_catalog(puppet_stack: PuppetLab) -> None:
    certname = puppet_stack.certname("unknown")
    token = puppet_stack.authorize(certname)
    rc, output = puppet_stack.stack.run_agent(certname, csr_attributes=challenge_attributes(token))
    assert rc == 1, output
    assert ca_state(puppet_stack, certname) == "signed"
    assert "Failed when searching for node" in output or "Failed to find" in output, output


# -- teardown: CA clean, PuppetDB deactivate -------------------------------------------------------


def test_ca_clean_makes_the_certificate_unknown_and_the_host_refused(puppet_stack: PuppetLab) -> None:
    certname, rc, output = signed_host(puppet_stack, "cleaned", hostgroup="openshift/node")
    assert rc == 2, output
    response = ca(puppet_stack, "PUT", "clean", json={"certnames": [certname]})
    assert response.status_code == 200, response.text
    assert ca(puppet_stack, "GET", f"certificate_status/{certname}").status_code == 404
    assert ca_state(puppet_stack, certname) is None
    # the host still has its (now revoked) certificate and key: Jetty checks the CA's CRL and
    # refuses the TLS handshake ("alert certificate unknown"), so no catalog, no report
    rc, output = puppet_stack.stack.run_agent(certname)
    assert rc not in (0, 2), output
    assert "certificate unknown" in output, output
    assert "Could not retrieve catalog" in output
    assert ca_state(puppet_stack, certname) is None


def test_puppetdb_deactivate_with_pypuppetdb(puppet_stack: PuppetLab) -> None:
    stack = puppet_stack.stack
    certname, rc, output = signed_host(puppet_stack, "deactivated", hostgroup="openshift/broker")
    assert rc == 2, output
    # governord's way in: HTTPS with its client certificate
    db = connect(host="127.0.0.1", port=stack.ports.puppetdb_https, protocol="https", ssl_verify=str(stack.ca_bundle),
                 ssl_key=str(stack.client_key), ssl_cert=str(stack.client_cert), timeout=30)
    node = eventually(lambda: next(iter(db.nodes(path=certname)), None), what=f"{certname} in PuppetDB")
    assert node.deactivated is False
    stamp = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    answer = db.command("deactivate node", {"certname": certname, "producer_timestamp": stamp})
    assert answer.get("uuid")
    deactivated = eventually(lambda: pdb_query(puppet_stack, f"nodes/{certname}").get("deactivated"),
                             what=f"{certname} deactivated")
    assert deactivated.startswith(str(datetime.datetime.now(datetime.UTC).year))
    active = pdb_query(puppet_stack, "nodes", ["=", "certname", certname])
    assert active == []  # the nodes endpoint lists active nodes only
