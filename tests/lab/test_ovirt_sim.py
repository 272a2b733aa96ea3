"""The oVirt engine simulator as the real ovirtsdk4 client meets it (and as raw HTTPS sees it).

Every expectation is a fact about the real engine: the SSO token and revoke endpoints and their
JSON, 401 without a token, the fault texts the SDK turns into its own exceptions, the status
sequences, and XML the SDK's readers parse.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ovirtsdk4
import pytest
from ovirtsdk4 import reader, types

from lab.ovirt_sim import AUTH_KEY, OVirtSimServer, Timing, default_seed, expire_tokens
from lab.vcsim import TLSFiles
from tests.fixtures.ovirt import OVirtEngine, launch_ovirt_sim

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


# -- helpers ------------------------------------------------------------------------------------


def raw(engine: OVirtEngine, method: str, path: str, *, token: str | None = None,
        form: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request without the SDK: status, headers, body."""
    base = urllib.parse.urlsplit(engine.url)
    url = f"{base.scheme}://{base.netloc}{path}"
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(engine.ca_file))
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_status(service: Any, wanted: types.VmStatus, timeout: float = 5.0) -> list[types.VmStatus]:
    """Poll until the VM has ``wanted``; return the statuses seen on the way."""
    seen: list[types.VmStatus] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = service.get().status
        if not seen or seen[-1] is not status:
            seen.append(status)
        if status is wanted:
            return seen
        time.sleep(0.01)
    raise AssertionError(f"still {seen[-1]} after {timeout}s (saw {seen})")


def wait_reported(service: Any, count: int, timeout: float = 5.0) -> list[types.ReportedDevice]:
    """Poll until the guest reports ``count`` addresses in all; return its devices."""
    deadline = time.monotonic() + timeout
    while True:
        devices = service.reported_devices_service().list()
        if sum(len(device.ips or ()) for device in devices) >= count:
            return devices
        assert time.monotonic() < deadline, f"the guest reported {devices} after {timeout}s"
        time.sleep(0.01)


def link_local(mac: str) -> str:
    """The IPv6 link-local address a guest forms from its MAC (modified EUI-64)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    interface_id = bytes([octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + interface_id))


def new_vm(connection: Any, name: str | None = None, **attrs: Any) -> types.Vm:
    values: dict[str, Any] = {
        "name": name or f"sim-{uuid.uuid4().hex[:8]}",
        "cluster": types.Cluster(name="Default"),
        "template": types.Template(name="rhel9-template"),
    }
    values.update(attrs)
    return connection.system_service().vms_service().add(types.Vm(**values))


@pytest.fixture
def conn(ovirt_engine: OVirtEngine) -> Iterator[Any]:
    connection = ovirt_engine.connection()
    try:
        yield connection
    finally:
        connection.close()


# -- SSO and authentication ---------------------------------------------------------------------


def test_token_then_api_summary(conn: Any) -> None:
    assert conn.authenticate()
    api = conn.system_service().get()
    assert api.product_info.name == "oVirt Engine"
    assert api.product_info.version.major == 4
    assert api.summary.vms.total >= 0
    assert api.special_objects.blank_template.id == "00000000-0000-0000-0000-000000000000"


def test_wrong_password_is_the_sdks_auth_error(ovirt_engine: OVirtEngine) -> None:
    connection = ovirt_engine.connection(password="wrong")
    with pytest.raises(ovirtsdk4.AuthError) as caught:
        connection.system_service().get()
    assert str(caught.value) == (
        "Error during SSO authentication access_denied : "
        "Cannot authenticate user 'admin@internal': The username or password is incorrect.."
    )
    connection.close(logout=False)


def test_sso_error_bodies_are_the_engines_json(ovirt_engine: OVirtEngine) -> None:
    form = {"grant_type": "password", "username": "admin@internal", "password": "wrong", "scope": "ovirt-app-api"}
    status, headers, body = raw(ovirt_engine, "POST", "/ovirt-engine/sso/oauth/token", form=form)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {
        "error_code": "access_denied",
        "error": "Cannot authenticate user 'admin@internal': The username or password is incorrect..",
    }
    # outside the REST API scope SsoUtils answers in the OpenID form
    status, _, body = raw(ovirt_engine, "POST", "/ovirt-engine/sso/oauth/token", form={**form, "scope": "ovirt-app-admin"})
    assert status == 400
    assert set(json.loads(body)) == {"error", "error_description"}
    assert json.loads(body)["error"] == "access_denied"


def test_the_api_needs_a_valid_bearer_token(ovirt_engine: OVirtEngine, conn: Any) -> None:
    assert raw(ovirt_engine, "GET", "/ovirt-engine/api/vms")[0] == 401
    assert raw(ovirt_engine, "GET", "/ovirt-engine/api/vms", token="not-a-token")[0] == 401
    status, headers, body = raw(ovirt_engine, "GET", "/ovirt-engine/api/vms", token=conn.authenticate())
    assert status == 200
    assert headers["Content-Type"].startswith("application/xml")
    assert isinstance(reader.Reader.read(body), list)


def test_an_invalid_token_without_credentials_is_an_auth_error(ovirt_engine: OVirtEngine) -> None:
    # ovirtsdk4 answers a 401 by asking SSO for a new token once; without credentials that fails
    connection = ovirt_engine.connection(username=None, password=None, token="stale")
    with pytest.raises(ovirtsdk4.AuthError):
        connection.system_service().vms_service().list()
    connection.close(logout=False)


def test_close_revokes_the_token(ovirt_engine: OVirtEngine) -> None:
    connection = ovirt_engine.connection()
    token = connection.authenticate()
    assert raw(ovirt_engine, "GET", "/ovirt-engine/api", token=token)[0] == 200
    connection.close()
    assert raw(ovirt_engine, "GET", "/ovirt-engine/api", token=token)[0] == 401


# -- inventory and search -------------------------------------------------------------------------


def test_clusters_and_templates(conn: Any) -> None:
    system = conn.system_service()
    [cluster] = system.clusters_service().list(search="name=Default")
    assert cluster.data_center.id
    templates = {t.name: t for t in system.templates_service().list()}
    assert {"Blank", "rhel9-template"} <= set(templates)
    rhel = templates["rhel9-template"]
    assert rhel.cluster.id == cluster.id
    assert rhel.memory == 2048 * MIB and rhel.memory_policy.guaranteed == 1024 * MIB
    assert system.templates_service().template_service(rhel.id).get().name == "rhel9-template"
    assert conn.follow_link(rhel.cluster).name == "Default"


def test_vm_search(conn: Any) -> None:
    vms = conn.system_service().vms_service()
    prefix = f"srch{uuid.uuid4().hex[:6]}"
    first = new_vm(conn, f"{prefix}-a", comment="governord:host-id=1111", description="web")
    second = new_vm(conn, f"{prefix}-b", comment="governord:host-id=2222", description="db")
    assert {vm.id for vm in vms.list(search=f"name={prefix}*")} == {first.id, second.id}
    assert [vm.id for vm in vms.list(search=f"name={prefix}-a")] == [first.id]
    assert [vm.id for vm in vms.list(search=f"name={prefix}* and comment=*2222")] == [second.id]
    assert {vm.id for vm in vms.list(search=f"name={prefix}-a or name={prefix}-b")} == {first.id, second.id}
    assert [vm.id for vm in vms.list(search=f"name={prefix}* and description!=web")] == [second.id]
    # the REST layer's case_sensitive defaults to false: the engine's ILIKE
    assert len(vms.list(search=f"name={prefix.upper()}*")) == 2
    assert vms.list(search=f"name={prefix.upper()}*", case_sensitive=True) == []
    assert len(vms.list(search=f"name={prefix}*", max=1)) == 1
    with pytest.raises(ovirtsdk4.Error) as caught:
        vms.list(search="colour=blue")
    assert caught.value.code == 400


def test_search_sorts_and_pages(conn: Any) -> None:
    vms = conn.system_service().vms_service()
    prefix = f"sort{uuid.uuid4().hex[:6]}"
    # made in an order that is neither the names' nor the descriptions'
    made = {suffix: new_vm(conn, f"{prefix}-{suffix}", description=description,
                           template=types.Template(name="Blank")).id
            for suffix, description in (("c", "2"), ("A", "3"), ("b", "1"), ("d", ""))}

    def names(**params: Any) -> list[str]:
        return [vm.name.rpartition("-")[2] for vm in vms.list(**params)]

    # always by name (the default sort), letters before case as PostgreSQL collates
    assert names(search=f"name={prefix}*") == ["A", "b", "c", "d"]
    assert names(search=f"name={prefix}* sortby description") == ["d", "b", "c", "A"]
    assert names(search=f"name={prefix}* SortBy description DESC") == ["A", "c", "b", "d"]
    assert names(search=f"name={prefix}* sortby name desc page 1", max=3) == ["d", "c", "b"]
    # a page is max results long
    assert names(search=f"name={prefix}* page 2", max=3) == ["d"]
    assert names(search=f"name={prefix}* page 3", max=3) == []
    assert names(search=f"name={prefix}* page 2") == []  # without max, everything is on page 1
    # a max that is no number is ignored, as ParametersHelper.getIntegerParameter does
    assert len(vms.list(search=f"name={prefix}*", query={"max": "many"})) == 4
    for bad in (f"name={prefix}* sortby colour", f"name={prefix}* page zero"):
        with pytest.raises(ovirtsdk4.Error) as caught:
            vms.list(search=bad)
        assert caught.value.code == 400
    for vm_id in made.values():
        vms.vm_service(vm_id).remove()


# -- VM life and faults -----------------------------------------------------------------------


def test_a_vm_lives_through_the_engines_statuses(conn: Any) -> None:
    vms = conn.system_service().vms_service()
    vm = new_vm(conn, memory=3072 * MIB, memory_policy=types.MemoryPolicy(guaranteed=1024 * MIB, max=8192 * MIB),
                cpu=types.Cpu(topology=types.CpuTopology(sockets=4, cores=1, threads=1)),
                comment="governord:host-id=abc")
    assert vm.status is types.VmStatus.IMAGE_LOCKED
    assert (vm.memory, vm.cpu.topology.sockets, vm.comment) == (3072 * MIB, 4, "governord:host-id=abc")
    service = vms.vm_service(vm.id)
    assert wait_status(service, types.VmStatus.DOWN)[0] is types.VmStatus.IMAGE_LOCKED

    init = types.Initialization(
        host_name="life.lab.example",
        nic_configurations=[types.NicConfiguration(
            name="eth0", on_boot=True, boot_protocol=types.BootProtocol.STATIC,
            ip=types.Ip(address="198.51.100.77", netmask="255.255.255.0", gateway="198.51.100.1"))],
    )
    service.start(use_cloud_init=True, vm=types.Vm(initialization=init))
    seen = wait_status(service, types.VmStatus.UP)
    assert seen[-1] is types.VmStatus.UP
    assert set(seen) <= {types.VmStatus.WAIT_FOR_LAUNCH, types.VmStatus.POWERING_UP, types.VmStatus.UP}
    # the link-local IPv6 address is reported first, the configured IPv4 one after it
    [device] = wait_reported(service, 1)
    assert device.type is types.ReportedDeviceType.NETWORK
    assert [(ip.address, ip.version) for ip in device.ips] == [(link_local(device.mac.address), types.IpVersion.V6)]
    [device] = wait_reported(service, 2)
    assert [ip.address for ip in device.ips] == ["198.51.100.77", link_local(device.mac.address)]
    followed = service.get(follow="reported_devices")
    assert followed.fqdn == "life.lab.example"
    assert followed.reported_devices[0].ips[0].address == "198.51.100.77"

    service.stop()
    assert wait_status(service, types.VmStatus.DOWN)[0] is types.VmStatus.POWERING_DOWN
    assert service.reported_devices_service().list() == []
    service.remove()
    # the disks go first: the VM is image_locked, then gone
    assert service.get().status is types.VmStatus.IMAGE_LOCKED
    deadline = time.monotonic() + 5
    with pytest.raises(ovirtsdk4.NotFoundError):
        while time.monotonic() < deadline:
            service.get()
            time.sleep(0.02)


def test_a_dhcp_guest_reports_an_address_from_the_range(conn: Any) -> None:
    service = conn.system_service().vms_service().vm_service(new_vm(conn).id)
    wait_status(service, types.VmStatus.DOWN)
    service.start()
    wait_status(service, types.VmStatus.UP)
    devices = wait_reported(service, 2)
    assert devices[0].ips[0].address.startswith("192.0.2.")
    assert devices[0].ips[0].version is types.IpVersion.V4
    service.stop()


def test_faults_are_the_engines_texts(conn: Any) -> None:
    vms = conn.system_service().vms_service()
    vm = new_vm(conn)
    service = vms.vm_service(vm.id)

    with pytest.raises(ovirtsdk4.Error) as caught:
        service.start()
    assert caught.value.code == 409
    assert caught.value.fault.detail == "[Cannot run VM: VM is locked. Please try again in a few minutes.]"

    with pytest.raises(ovirtsdk4.Error) as caught:
        new_vm(conn, vm.name)
    assert caught.value.code == 409
    assert caught.value.fault.reason == "Operation Failed"
    assert caught.value.fault.detail == (
        "[Cannot add VM. The VM name is already in use, please choose a unique name and try again.]"
    )

    wait_status(service, types.VmStatus.DOWN)
    service.start()
    with pytest.raises(ovirtsdk4.Error) as caught:
        service.start()
    # RunVmValidator's status matrix refuses before its "VM is running"
    assert caught.value.fault.detail == "[Cannot run VM because the VM is in Wait for Launch status.]"
    with pytest.raises(ovirtsdk4.Error) as caught:
        service.remove()
    assert (caught.value.code, caught.value.fault.detail) == (409, "[Cannot remove VM. VM is running.]")
    assert str(caught.value) == (
        'Fault reason is "Operation Failed". Fault detail is "[Cannot remove VM. VM is running.]". '
        "HTTP response code is 409."
    )
    service.stop()


def test_references_to_nothing(conn: Any) -> None:
    vms = conn.system_service().vms_service()
    with pytest.raises(ovirtsdk4.NotFoundError) as caught:
        new_vm(conn, template=types.Template(name="no-such-template"))
    assert caught.value.fault.detail == "Entity not found: Template: name=no-such-template"
    with pytest.raises(ovirtsdk4.NotFoundError) as caught:
        new_vm(conn, cluster=types.Cluster(name="Elsewhere"))
    assert caught.value.fault.detail == "Entity not found: Cluster: name=Elsewhere"
    with pytest.raises(ovirtsdk4.Error) as caught:
        vms.add(types.Vm(name="no-cluster", template=types.Template(name="rhel9-template")))
    assert (caught.value.code, caught.value.fault.reason) == (400, "Incomplete parameters")
    with pytest.raises(ovirtsdk4.Error) as caught:
        new_vm(conn, "bad name!")
    assert caught.value.code == 400 and "special characters" in caught.value.fault.detail
    # an unknown id is a bare 404 (no fault body) where the REST layer looks the VM up itself
    run_once = types.Vm(initialization=types.Initialization(host_name="x"))
    for call in (lambda s: s.get(), lambda s: s.start(use_cloud_init=True, vm=run_once), lambda s: s.remove()):
        with pytest.raises(ovirtsdk4.NotFoundError) as caught:
            call(vms.vm_service(str(uuid.uuid4())))
        assert caught.value.code == 404 and caught.value.fault is None


@pytest.fixture
def inproc() -> Iterator[tuple[OVirtSimServer, Any]]:
    """An engine in this process (its state is the test's to change) and a connection to it."""
    with OVirtSimServer(default_seed(), "admin@internal", "pw", timing=Timing.scaled(0.01)) as server:
        connection = ovirtsdk4.Connection(url=server.url, username="admin@internal", password="pw")
        try:
            yield server, connection
        finally:
            connection.close()


def fault_of(call: Any) -> tuple[int, str]:
    with pytest.raises(ovirtsdk4.Error) as caught:
        call()
    return caught.value.code, caught.value.fault.detail


def test_actions_on_an_unknown_vm_are_the_commands_400(conn: Any) -> None:
    # stop, shutdown and a plain start go to the command without a lookup: its validation fails
    # with ACTION_TYPE_FAILED_VM_NOT_FOUND, a BAD_PARAMETERS error, so 400 and not 404
    service = conn.system_service().vms_service().vm_service(str(uuid.uuid4()))
    for call, verb in ((service.stop, "stop"), (service.shutdown, "shutdown"), (service.start, "run")):
        with pytest.raises(ovirtsdk4.Error) as caught:
            call()
        assert not isinstance(caught.value, ovirtsdk4.NotFoundError)
        assert (caught.value.code, caught.value.fault.reason, caught.value.fault.detail) == (
            400, "Operation Failed", f"[Cannot {verb} VM. VM is not found.]")


def test_stopping_a_vm_that_is_down_succeeds(conn: Any) -> None:
    service = conn.system_service().vms_service().vm_service(new_vm(conn).id)
    wait_status(service, types.VmStatus.DOWN)
    # StopVmCommandBase.shouldSkipCommandExecution: already in the requested status, no error
    service.stop()
    service.shutdown()
    assert service.get().status is types.VmStatus.DOWN
    service.remove()


def test_shutdown_of_a_vm_that_is_not_up_stops_it(inproc: tuple[OVirtSimServer, Any]) -> None:
    server, connection = inproc
    server.state.timing.wait_for_launch = 5.0  # long enough to be seen
    server.state.timing.stop = 0.5
    service = connection.system_service().vms_service().vm_service(new_vm(connection, template=types.Template(name="Blank")).id)
    service.start()
    assert service.get().status is types.VmStatus.WAIT_FOR_LAUNCH
    # ShutdownVmCommand.perform: no guest to ask yet, so it stops the VM instead
    service.shutdown()
    assert wait_status(service, types.VmStatus.DOWN)[0] is types.VmStatus.POWERING_DOWN
    service.remove()


def test_a_vm_removed_by_someone_else_during_an_action() -> None:
    with OVirtSimServer(default_seed(), "admin@internal", "pw", timing=Timing.scaled(0.01)) as server:
        connection = ovirtsdk4.Connection(url=server.url, username="admin@internal", password="pw")
        vms = connection.system_service().vms_service()
        vm = vms.add(types.Vm(name="racy", cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")))
        service = vms.vm_service(vm.id)
        # gone after the REST layer's lookup, before RemoveVmCommand.validate
        server.state.before("remove", lambda state, vm_id: state.forget(vm_id))
        with pytest.raises(ovirtsdk4.Error) as caught:
            service.remove()
        assert (caught.value.code, caught.value.fault.detail) == (400, "[Cannot remove VM. VM is not found.]")
        assert vm.id not in server.state.vms
        with pytest.raises(ovirtsdk4.NotFoundError):
            service.remove()
        connection.close()


def test_statuses_only_hosts_report_and_what_the_engine_refuses_in_them(inproc: tuple[OVirtSimServer, Any]) -> None:
    server, connection = inproc
    vms = connection.system_service().vms_service()
    vm = vms.add(types.Vm(name="hosted", cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")))
    service = vms.vm_service(vm.id)
    service.start()
    wait_status(service, types.VmStatus.UP)

    server.state.set_status(vm.id, types.VmStatus.NOT_RESPONDING)
    assert service.get().status is types.VmStatus.NOT_RESPONDING
    assert fault_of(service.start) == (409, "[Cannot run VM because the VM is in Not Responding status.]")
    assert fault_of(service.remove) == (409, "[Cannot remove VM. VM is running.]")

    server.state.set_status(vm.id, types.VmStatus.UNKNOWN)
    # StopVmCommandBase.validate: Unknown is neither running nor one of the stoppable others
    assert fault_of(service.stop) == (409, "[Cannot stop VM. VM is not running.]")
    assert fault_of(service.remove) == (409, "[Cannot remove VM. VM is running.]")
    assert fault_of(service.start) == (409, "[Cannot run VM because the VM is in Unknown status.]")

    server.state.set_status(vm.id, types.VmStatus.MIGRATING, then=[(0.5, types.VmStatus.UP)])
    assert fault_of(service.start) == (409, "[Cannot run VM because the VM is in Migrating status.]")
    assert wait_status(service, types.VmStatus.UP)[0] is types.VmStatus.MIGRATING

    server.state.set_status(vm.id, types.VmStatus.PAUSED)
    service.start()  # a run of a paused VM resumes it
    assert wait_status(service, types.VmStatus.UP)

    server.state.set_status(vm.id, types.VmStatus.NOT_RESPONDING)
    server.state.timing.stop = 0.5
    service.stop()  # stoppable while not responding
    assert wait_status(service, types.VmStatus.DOWN)[0] is types.VmStatus.POWERING_DOWN


def test_a_launch_that_fails_falls_back_to_down(inproc: tuple[OVirtSimServer, Any]) -> None:
    server, connection = inproc
    vms = connection.system_service().vms_service()
    vm = vms.add(types.Vm(name="unlucky", cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")))
    service = vms.vm_service(vm.id)
    server.state.timing.wait_for_launch = 0.3
    server.state.fail_next_launch(vm.id)
    service.start()  # the action is accepted...
    # ...and the VM, tried on every host, is down again
    assert wait_status(service, types.VmStatus.DOWN) == [types.VmStatus.WAIT_FOR_LAUNCH, types.VmStatus.DOWN]
    service.start()
    assert wait_status(service, types.VmStatus.UP)[-1] is types.VmStatus.UP


def test_a_guest_reports_several_devices_and_ipv6() -> None:
    seed = {**default_seed(), "ipv6_network": "2001:db8:1::/64"}
    with OVirtSimServer(seed, "admin@internal", "pw", timing=Timing.scaled(0.01)) as server:
        connection = ovirtsdk4.Connection(url=server.url, username="admin@internal", password="pw")
        vms = connection.system_service().vms_service()
        vm = vms.add(types.Vm(name="multi", cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")))
        service = vms.vm_service(vm.id)
        service.start()
        wait_status(service, types.VmStatus.UP)
        server.state.report_nic(vm.id, "eth1", ["10.20.0.5", "fd00::5"])
        devices = wait_reported(service, 5)
        eth0, eth1 = devices
        mac = eth0.mac.address
        v4 = eth0.ips[0].address
        assert ipaddress.ip_address(v4) in ipaddress.ip_network("192.0.2.0/24")
        # the global address is the prefix and the same interface id as the link-local one
        global_v6 = str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(link_local(mac))) & (2**64 - 1)
                                              | int(ipaddress.IPv6Address("2001:db8:1::"))))
        assert [(ip.address, ip.version) for ip in eth0.ips] == [
            (v4, types.IpVersion.V4), (global_v6, types.IpVersion.V6), (link_local(mac), types.IpVersion.V6)]
        assert (eth1.name, [ip.address for ip in eth1.ips]) == ("eth1", ["10.20.0.5", "fd00::5"])
        assert eth1.mac.address != mac
        service.stop()
        wait_status(service, types.VmStatus.DOWN)
        assert service.reported_devices_service().list() == []
        connection.close()


def test_tokens_expire_and_the_sdk_logs_in_again() -> None:
    with OVirtSimServer(default_seed(), "admin@internal", "pw", timing=Timing.scaled(0.01),
                        token_idle_timeout=0.6) as server:
        auth = server.app[AUTH_KEY]
        connection = ovirtsdk4.Connection(url=server.url, username="admin@internal", password="pw")
        system = connection.system_service()
        system.get()
        [first] = list(auth["tokens"])
        time.sleep(0.3)
        system.get()  # used: the idle time starts again
        time.sleep(0.3)
        system.get()
        assert list(auth["tokens"]) == [first] and auth["issued"] == 1
        time.sleep(0.8)
        # the token idled out: 401, and ovirtsdk4 fetches a new one and sends the request again
        system.get()
        assert auth["expired"] == [first] and auth["issued"] == 2 and first not in auth["tokens"]
        [second] = expire_tokens(server.app)
        assert second != first and auth["tokens"] == {}
        # a POST is sent again too
        vm = system.vms_service().add(
            types.Vm(name="after-expiry", cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")))
        assert vm.id in server.state.vms and auth["issued"] == 3
        # a 401 for the expired token, then the login fails: the SDK's AuthError
        expire_tokens(server.app)
        auth["password"] = "changed"
        with pytest.raises(ovirtsdk4.AuthError):
            system.get()
        connection.close(logout=False)


def test_the_process_takes_a_token_idle_timeout(tmp_path: Path, ovirt_tls: TLSFiles) -> None:
    engine = launch_ovirt_sim(tmp_path, ovirt_tls, "ovirt-sim-idle", ("--token-idle-timeout", "0.5"))
    try:
        status, _, body = raw(engine, "POST", "/ovirt-engine/sso/oauth/token", form={
            "grant_type": "password", "scope": "ovirt-app-api", "username": engine.username,
            "password": engine.password})
        assert status == 200
        token = json.loads(body)["access_token"]
        assert raw(engine, "GET", "/ovirt-engine/api", token=token)[0] == 200
        time.sleep(0.8)
        assert raw(engine, "GET", "/ovirt-engine/api", token=token)[0] == 401
        connection = engine.connection()
        try:
            connection.system_service().get()
            time.sleep(0.8)
            assert connection.system_service().get().product_info.name == "oVirt Engine"  # logged in again
        finally:
            connection.close()
    finally:
        engine.stop()


def test_memory_validation(conn: Any) -> None:
    with pytest.raises(ovirtsdk4.Error) as caught:
        new_vm(conn, memory=512 * MIB, memory_policy=types.MemoryPolicy(guaranteed=1024 * MIB))
    assert caught.value.fault.detail == "[Cannot add VM. Physical Memory Guaranteed cannot exceed Memory Size.]"


# -- in process -----------------------------------------------------------------------------------


def test_in_process_server_counts_tokens_and_revocations() -> None:
    with OVirtSimServer(default_seed(), "admin@internal", "pw", timing=Timing.scaled(0.01)) as server:
        connection = ovirtsdk4.Connection(url=server.url, username="admin@internal", password="pw")
        vm = connection.system_service().vms_service().add(
            types.Vm(name="inproc", cluster=types.Cluster(name="Default"), template=types.Template(name="Blank")))
        # the Blank template has no disks: the VM is down at once
        assert vm.status is types.VmStatus.DOWN
        assert [v.name for v in server.state.vms.values()] == ["inproc"]
        connection.close()
        auth = server.app[AUTH_KEY]
        assert auth["issued"] == 1 and len(auth["revoked"]) == 1 and not auth["tokens"]
