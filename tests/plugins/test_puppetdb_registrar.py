"""The PuppetDB registrar against Debian's real puppetdb, fed by real ``puppet agent`` runs.

Readiness is driven by what the agent actually did; deactivation is checked through PuppetDB's
query API with a separate plain HTTP client (``/pdb/query/v4/nodes`` with ``node_state``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import requests

from governord.errors import PermanentError, RetryableError
from governord.models import HostOrigin, HostState, HostView
from governord.plugins.puppetdb import governord_register_registrars
from governord.plugins.puppetdb.registrar import (
    PuppetDBConfig,
    PuppetDBRegistrar,
    PuppetDBTagMapping,
    class_title,
)
from governord.registrars import Phase, RegistrarRegistry
from lab.puppet import challenge_attributes
from tests.fixtures.puppet import PuppetLab

NAME = "puppetdb"


def make_host(fqdn: str, *, classes: list[str] | None = None, classes_from: str = "foreman") -> HostView:
    """A host record as the engine hands it to registrars, classified by Foreman."""
    classification = {classes_from: {"hostgroup": None, "puppet_classes": classes or [], "parameters": {}}}
    return HostView(
        id=str(uuid.uuid4()), name=fqdn.split(".")[0], fqdn=fqdn, app="openshift", role="node",
        origin=HostOrigin.PROVISIONED, state=HostState.REGISTERING, provider="lab", machine_id=None,
        tags=("node",), addresses=(), classification=classification, registrations={},
    )


def make_config(**values: Any) -> PuppetDBConfig:
    config = PuppetDBRegistrar.Config.model_validate({"type": "puppetdb", "call_timeout": 30, **values})
    assert isinstance(config, PuppetDBConfig)
    return config


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- pure parts (no server) -------------------------------------------------------------------


def test_plugin_registers_the_puppetdb_type() -> None:
    registry = RegistrarRegistry()
    governord_register_registrars(registry)
    # registered lazily: the config models are known, the class is imported when loaded
    entry = registry.get("puppetdb")
    assert entry is not None and entry.Config is PuppetDBRegistrar.Config and entry.TagMapping is PuppetDBRegistrar.TagMapping
    assert registry.load("puppetdb") is PuppetDBRegistrar
    assert PuppetDBRegistrar.deregister_phase is Phase.AFTER_MACHINE


def test_config_defaults_and_strictness(tmp_path: Path) -> None:
    config = make_config()
    assert config.url == "https://puppetdb:8081"
    assert config.ready_timeout == 1800 and config.classes_from == "foreman" and config.verify_tls
    (tmp_path / "c").write_text("x")  # the files a config names must exist when it is loaded
    (tmp_path / "hidden-key-path").write_text("x")
    keyed = make_config(url="https://pdb.example:8081/", client_cert=str(tmp_path / "c"),
                        client_key=str(tmp_path / "hidden-key-path"))
    assert keyed.url == "https://pdb.example:8081"
    assert "hidden-key-path" not in repr(keyed)
    for bad in ({"url": "ftp://pdb"}, {"url": "pdb:8081"}, {"url": "http://pdb:99999"}, {"ready_timeout": 0},
                {"timeout": -1}, {"client_cert": str(tmp_path / "c")}, {"colour": "blue"},
                {"ca_file": str(tmp_path / "absent.pem")}, {"ca_file": str(tmp_path)},
                {"client_cert": str(tmp_path / "c"), "client_key": str(tmp_path / "absent.key")}):
        with pytest.raises(pydantic.ValidationError):
            make_config(**bad)
    with pytest.raises(pydantic.ValidationError):
        PuppetDBTagMapping.model_validate({"puppet_classes": ["x"]})
    reg = PuppetDBRegistrar(NAME, make_config(url="http://127.0.0.1:8080"))
    assert reg.classify([("node", PuppetDBTagMapping())]) == {}


def test_class_titles_follow_puppet() -> None:
    assert class_title("openshift::node") == "Openshift::Node"
    assert class_title("::profile::base") == "Profile::Base"
    assert class_title("ntp") == "Ntp"


async def test_register_records_the_certname() -> None:
    reg = PuppetDBRegistrar(NAME, make_config(url=f"http://127.0.0.1:{closed_port()}"))
    assert await reg.register(make_host("N1.Lab.Example"), {}) == {"certname": "n1.lab.example"}


async def test_unreachable_puppetdb_is_retryable() -> None:
    reg = PuppetDBRegistrar(NAME, make_config(url=f"http://127.0.0.1:{closed_port()}"))
    host = make_host("n1.lab.example", classes=["profile::base"])
    for call in (reg.check_ready(host, 1.0), reg.deregister(host), reg.lookup(host)):
        with pytest.raises(RetryableError) as info:
            await call
        assert info.value.source == NAME
    await reg.close()


async def test_a_client_certificate_gone_since_the_config_was_loaded_is_permanent(tmp_path: Path) -> None:
    """A missing file is refused when the config is loaded; one removed later fails for good
    at start, naming the key, rather than being retried."""
    cert, key = tmp_path / "gone.pem", tmp_path / "gone.key"
    cert.write_text("x")
    key.write_text("x")
    reg = PuppetDBRegistrar(NAME, make_config(url="https://127.0.0.1:1", client_cert=str(cert), client_key=str(key)))
    cert.unlink()
    key.unlink()
    with pytest.raises(PermanentError, match="client_cert"):
        await reg.start()


# -- against the real PuppetDB ----------------------------------------------------------------

#: the classes Foreman's hostgroup openshift/node gives (profile::base is inherited from openshift)
NODE_CLASSES = ["profile::base", "openshift::node"]


def lab_config(lab: PuppetLab, **values: Any) -> PuppetDBConfig:
    """HTTPS with governord's client certificate, as in production."""
    stack = lab.stack
    return make_config(url=stack.puppetdb_https_url, ca_file=str(stack.ca_bundle), client_cert=str(stack.client_cert),
                       client_key=str(stack.client_key), clock_skew=1, **values)


@pytest.fixture
async def registrar(puppet_stack: PuppetLab, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PuppetDBRegistrar]:
    # a bundle without the lab CA: requests must not let it override the registrar's ca_file
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    reg = PuppetDBRegistrar(NAME, lab_config(puppet_stack))
    await reg.start()
    yield reg
    await reg.close()


def run_agent(lab: PuppetLab, certname: str, *extra: str) -> tuple[int, str]:
    """One real agent run as ``certname``, pre-authorised for autosigning on its first run."""
    token = lab.authorize(certname)
    return lab.stack.run_agent(certname, csr_attributes=challenge_attributes(token), extra_args=list(extra))


def pdb_get(lab: PuppetLab, path: str, **params: Any) -> requests.Response:
    """A plain query against PuppetDB's HTTP port (a separate client, no pypuppetdb)."""
    return requests.get(f"{lab.stack.puppetdb_url}/pdb/query/v4/{path}", params=params, timeout=30)


def wait_for_report(lab: PuppetLab, certname: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
    """PuppetDB stores commands asynchronously: wait until ``count`` reports of ``certname`` are in."""
    deadline = time.monotonic() + timeout
    while True:
        reports = pdb_get(lab, "reports", query=f'["=", "certname", "{certname}"]').json()
        if len(reports) >= count:
            return list(reports)
        assert time.monotonic() < deadline, f"PuppetDB has {len(reports)} reports of {certname}, not {count}"
        time.sleep(0.5)


async def ready_soon(reg: PuppetDBRegistrar, host: HostView, waited: float, timeout: float = 30.0) -> bool | None:
    """check_ready as the engine polls it, until True or ``timeout`` (the catalog may land after the report)."""
    deadline = time.monotonic() + timeout
    while True:
        started = time.monotonic()
        result = await reg.check_ready(host, waited)
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(1.0)
        waited += time.monotonic() - started


@pytest.fixture(scope="module")
def configured_node(puppet_stack: PuppetLab) -> Iterator[str]:
    """A host Foreman puts in openshift/node, after one successful agent run."""
    certname = puppet_stack.certname("node")
    puppet_stack.foreman_host(certname, hostgroup="openshift/node")
    code, output = run_agent(puppet_stack, certname)
    assert code in (0, 2), output[-3000:]
    assert "openshift::node applied" in output
    wait_for_report(puppet_stack, certname)
    yield certname


@pytest.mark.integration
async def test_not_ready_before_the_agent_ran(puppet_stack: PuppetLab, registrar: PuppetDBRegistrar) -> None:
    host = make_host(puppet_stack.certname("fresh"), classes=NODE_CLASSES)
    record = await registrar.register(host, {})
    assert record == {"certname": host.fqdn}
    # nothing secret in the record: an application sees all of it (the declared split)
    assert PuppetDBRegistrar.application_view(record) == record
    assert PuppetDBRegistrar.application_view(registrar.classify([])) == {}
    assert await registrar.check_ready(host, 5.0) is False
    assert await registrar.lookup(host) is None


@pytest.mark.integration
async def test_ready_after_a_good_run_with_the_demanded_classes(
    configured_node: str, registrar: PuppetDBRegistrar,
) -> None:
    host = make_host(configured_node, classes=NODE_CLASSES)
    started = time.monotonic()
    assert await ready_soon(registrar, host, waited=120.0) is True
    assert time.monotonic() - started < 30
    found = await registrar.lookup(host)
    assert found is not None and found["latest_report_status"] == "changed" and found["deactivated"] is None
    # no classes demanded (classes_from names a registrar that did not classify): a good run is enough
    assert await registrar.check_ready(make_host(configured_node, classes_from="elsewhere"), 120.0) is True


@pytest.mark.integration
async def test_a_missing_class_keeps_it_waiting_then_fails(
    puppet_stack: PuppetLab, configured_node: str,
) -> None:
    reg = PuppetDBRegistrar(NAME, lab_config(puppet_stack, ready_timeout=60))
    host = make_host(configured_node, classes=[*NODE_CLASSES, "openshift::broker"])
    assert await reg.check_ready(host, 50.0) is False
    with pytest.raises(PermanentError) as info:
        await reg.check_ready(host, 61.0)
    message = str(info.value)
    assert "no successful Puppet report with classes" in message and "after 61s" in message
    assert "lacks Class[Openshift::Broker]" in message and "Class[Openshift::Node]" not in message.split("lacks")[1]
    assert info.value.source == NAME
    await reg.close()


@pytest.mark.integration
async def test_a_report_from_before_the_wait_does_not_count(
    configured_node: str, registrar: PuppetDBRegistrar,
) -> None:
    """The host waits anew (e.g. re-tagged): only a run that ends after that counts."""
    host = make_host(configured_node, classes=NODE_CLASSES)
    assert await ready_soon(registrar, host, waited=120.0) is True
    await asyncio.sleep(2.5)  # > clock_skew (1 s)
    assert await registrar.check_ready(host, 0.5) is False


@pytest.mark.integration
async def test_a_noop_run_is_not_ready(puppet_stack: PuppetLab, registrar: PuppetDBRegistrar) -> None:
    certname = puppet_stack.certname("noop")
    puppet_stack.foreman_host(certname, hostgroup="openshift/node")
    code, output = run_agent(puppet_stack, certname, "--noop")
    assert code in (0, 2), output[-3000:]
    [report] = wait_for_report(puppet_stack, certname)
    assert report["noop"] is True
    host = make_host(certname, classes=NODE_CLASSES)
    assert await registrar.check_ready(host, 120.0) is False
    reg = PuppetDBRegistrar(NAME, lab_config(puppet_stack, ready_timeout=60))
    with pytest.raises(PermanentError, match="noop"):
        await reg.check_ready(host, 61.0)
    await reg.close()


@pytest.mark.integration
async def test_a_failed_run_is_not_ready_then_fails_naming_the_failure(
    puppet_stack: PuppetLab, registrar: PuppetDBRegistrar,
) -> None:
    """Foreman does not know this host, so the ENC fails and so does the catalog request."""
    certname = puppet_stack.certname("failing")
    code, output = run_agent(puppet_stack, certname)
    assert code not in (0, 2) and "Could not retrieve catalog" in output, output[-3000:]
    [report] = wait_for_report(puppet_stack, certname)
    assert report["status"] == "failed"
    host = make_host(certname, classes=NODE_CLASSES)
    assert await registrar.check_ready(host, 120.0) is False
    reg = PuppetDBRegistrar(NAME, lab_config(puppet_stack, ready_timeout=100))
    assert await reg.check_ready(host, 99.0) is False
    with pytest.raises(PermanentError) as info:
        await reg.check_ready(host, 101.0)
    message = str(info.value)
    assert f"Puppet run on {certname} failed" in message and report["hash"] in message
    assert "Could not retrieve catalog" in message and "Failed when searching for node" in message
    await reg.close()


@pytest.mark.integration
async def test_no_report_at_all_fails_after_ready_timeout(puppet_stack: PuppetLab) -> None:
    reg = PuppetDBRegistrar(NAME, lab_config(puppet_stack, ready_timeout=30))
    host = make_host(puppet_stack.certname("silent"), classes=["openshift::node"])
    assert await reg.check_ready(host, 29.0) is False
    with pytest.raises(PermanentError, match=r"no successful Puppet report with classes \[Openshift::Node\] .* after 31s"):
        await reg.check_ready(host, 31.0)
    await reg.close()


@pytest.mark.integration
async def test_deregister_deactivates_the_node(puppet_stack: PuppetLab, registrar: PuppetDBRegistrar) -> None:
    certname = puppet_stack.certname("retired")
    run_agent(puppet_stack, certname)
    wait_for_report(puppet_stack, certname)
    active = f'["=", "certname", "{certname}"]'
    assert len(pdb_get(puppet_stack, "nodes", query=active).json()) == 1
    host = make_host(certname)
    await registrar.deregister(host)
    # checked from the other side: gone from the (default, active) node list, deactivated in the
    # "any" view; PuppetDB 7 still answers nodes/<certname> for it, with the timestamp set
    assert pdb_get(puppet_stack, "nodes", query=active).json() == []
    [node] = pdb_get(puppet_stack, "nodes",
                     query=f'["and", ["=", "certname", "{certname}"], ["=", "node_state", "any"]]').json()
    assert node["deactivated"] is not None
    assert pdb_get(puppet_stack, f"nodes/{certname}").json()["deactivated"] == node["deactivated"]
    found = await registrar.lookup(host)
    assert found is not None and found["deactivated"] == node["deactivated"]
    await registrar.deregister(host)  # twice is fine
    await registrar.deregister(make_host(puppet_stack.certname("never-seen")))  # unknown is success

    # why this runs after the machine is gone: a node that reports again is active again
    puppet_stack.stack.run_agent(certname)
    wait_for_report(puppet_stack, certname, count=2)
    assert len(pdb_get(puppet_stack, "nodes", query=active).json()) == 1
    await registrar.deregister(host)
    assert pdb_get(puppet_stack, "nodes", query=active).json() == []


@pytest.mark.integration
async def test_plain_http_port_works_too(puppet_stack: PuppetLab, configured_node: str) -> None:
    reg = PuppetDBRegistrar(NAME, make_config(url=puppet_stack.stack.puppetdb_url, clock_skew=1))
    assert await ready_soon(reg, make_host(configured_node, classes=NODE_CLASSES), waited=120.0) is True
    await reg.close()


@pytest.mark.integration
async def test_an_untrusted_server_is_a_permanent_error(puppet_stack: PuppetLab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", requests.certs.where())
    stack = puppet_stack.stack
    reg = PuppetDBRegistrar(NAME, make_config(url=stack.puppetdb_https_url, client_cert=str(stack.client_cert),
                                              client_key=str(stack.client_key)))
    with pytest.raises(PermanentError, match="not trusted"):
        await reg.lookup(make_host(puppet_stack.certname("untrusted")))
    await reg.close()


# -- the sweep: nodes whose certificate carries governord's marker ------------------------------

MARKER_OID = "1.3.6.1.4.1.34380.1.2.1"


def run_marked_agent(lab: PuppetLab, certname: str, host_id: str) -> tuple[int, str]:
    """An agent run whose CSR asks for governord's marker extension, as the Puppet CA registrar's
    cloud-config makes it."""
    token = lab.authorize(certname)
    attributes = {**challenge_attributes(token), "extension_requests": {MARKER_OID: f"governord:host-id={host_id}"}}
    return lab.stack.run_agent(certname, csr_attributes=attributes)


def active(lab: PuppetLab, certname: str) -> bool:
    return bool(pdb_get(lab, "nodes", query=f'["=", "certname", "{certname}"]').json())


@pytest.mark.integration
async def test_list_owned_finds_active_marked_nodes_only(puppet_stack: PuppetLab, registrar: PuppetDBRegistrar) -> None:
    marked, host_id = puppet_stack.certname("marked"), str(uuid.uuid4())
    run_marked_agent(puppet_stack, marked, host_id)
    wait_for_report(puppet_stack, marked)
    plain = puppet_stack.certname("plain")
    run_agent(puppet_stack, plain)
    wait_for_report(puppet_stack, plain)

    listed = {entry.entry_id: entry for entry in await registrar.list_owned()}
    assert listed[marked].host_id == host_id and listed[marked].system == NAME
    assert plain not in listed


@pytest.mark.integration
async def test_remove_owned_deactivates_only_while_the_node_names_the_listed_host(
    puppet_stack: PuppetLab, registrar: PuppetDBRegistrar,
) -> None:
    certname, host_id = puppet_stack.certname("orphan"), str(uuid.uuid4())
    run_marked_agent(puppet_stack, certname, host_id)
    wait_for_report(puppet_stack, certname)
    [entry] = [e for e in await registrar.list_owned() if e.entry_id == certname]

    assert await registrar.remove_owned(dataclasses.replace(entry, host_id=str(uuid.uuid4()))) is False
    assert active(puppet_stack, certname)
    assert await registrar.remove_owned(entry) is True
    # the other side: no longer active, deactivated in the "any" view, and not listed again
    assert not active(puppet_stack, certname)
    [node] = pdb_get(puppet_stack, "nodes",
                     query=f'["and", ["=", "certname", "{certname}"], ["=", "node_state", "any"]]').json()
    assert node["deactivated"] is not None
    assert certname not in {e.entry_id for e in await registrar.list_owned()}
    assert await registrar.remove_owned(entry) is False
