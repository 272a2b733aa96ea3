"""novabox: the real nova API, served on a free loopback port, from nova's own functional-test stack.

Run with lab/.build/openstack-venv's python (see install.sh)::

    python novabox.py --keystone-url http://127.0.0.1:PORT/v3      # real tokens, checked by keystone
    python novabox.py                                               # no keystone: nova's stubbed auth

One process holds what nova's functional tests bring up (``_IntegratedTestBase``): nova-api (the
real WSGI pipeline from api-paste.ini), conductor, scheduler, one nova-compute with the fake virt
driver (``MediumFakeDriver``, host ``compute``), and placement (the real openstack-placement code,
in-process). Messaging is in-process (casts run as calls), the databases are in-memory sqlite.
glance, neutron and cinder are nova's in-process stand-ins (``GlanceFixture``, ``NeutronFixture``,
``CinderFixture``): they have no endpoint of their own.

With ``--keystone-url`` the pipeline keeps the real keystonemiddleware ``authtoken`` filter and
nova's ``NovaKeystoneContext``: every request's token is validated against keystone (as the
service user ``nova``, password from ``NOVA_SERVICE_PASSWORD``), and the server's project and
user are keystone's. The neutron stand-in owns its network in nova's fixture project
(``PROJECT_ID`` below); keystonebox.py creates the lab's project with that id.

Prints ``LISTENING http://127.0.0.1:PORT/v2.1 {json}`` once it serves, the JSON naming the lab's
images, flavors and network.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socketserver
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

ARGV = sys.argv[:]
# oslo.config parses sys.argv on its own when nova's configuration is loaded.
sys.argv = sys.argv[:1]
warnings.simplefilter("ignore")
# Native threads, not eventlet: under eventlet the stdlib HTTP server's loop never yields, so a
# request that waits on I/O (authtoken asking keystone) would never finish.
os.environ.setdefault("OS_NOVA_DISABLE_EVENTLET_PATCHING", "1")
from nova import monkey_patch  # noqa: E402

monkey_patch.patch()  # before anything imports eventlet

import fixtures  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.fixtures import neutron as neutron_fixture  # noqa: E402
from nova.tests.functional import integrated_helpers  # noqa: E402

#: the project nova's neutron stand-in owns its network, subnet, ports and security group in
PROJECT_ID: str = nova_fixtures.PROJECT_ID


class _QuietWarnings(fixtures.Fixture):
    """Replaces nova's WarningsFixture, which turns some SQLAlchemy warnings into errors.

    In tests that catches deprecated use early; here it turns ``stop`` of a server into HTTP 500.
    """

    def _setUp(self) -> None:
        saved = warnings.filters[:]
        warnings.simplefilter("ignore")
        self.addCleanup(lambda: warnings.filters.__setitem__(slice(None), saved))


class _AddressingNeutron(neutron_fixture.NeutronFixture):
    """nova's neutron stand-in, giving each new port its own address.

    The original copies one template port, so every server would get 192.168.1.3 and a requested
    fixed IP would be dropped. Here a requested ``ip_address`` on the private subnet is honoured
    (a conflict raises neutron's IpAddressInUse, as neutron does) and other ports get the next
    free address of the subnet's allocation pool.
    """

    def create_port(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        from neutronclient.common import exceptions as neutron_exc

        requested = ((body or {}).get("port") or {}).get("fixed_ips") or []
        result = super().create_port(body)
        port = result["port"]
        if port["network_id"] != self.network_1["id"]:
            return result
        subnet = self.subnet_1
        network = ipaddress.ip_network(subnet["cidr"], strict=False)
        used = {
            ip["ip_address"]
            for other_id, other in self._ports.items()
            if other_id != port["id"]
            for ip in other.get("fixed_ips", [])
        }
        wanted = next((item.get("ip_address") for item in requested if item.get("ip_address")), None)
        if wanted is not None:
            if ipaddress.ip_address(wanted) not in network:
                del self._ports[port["id"]]
                raise neutron_exc.InvalidIpForSubnetClient(
                    message=f"IP address {wanted} is not a valid IP for the specified subnet."
                )
            if wanted in used:
                del self._ports[port["id"]]
                raise neutron_exc.IpAddressInUseClient(
                    message=f"Unable to complete operation for network {port['network_id']}. "
                    f"The IP address {wanted} is in use."
                )
            address = wanted
        else:
            pool = subnet["allocation_pools"][0]
            start = max(int(ipaddress.ip_address(pool["start"])), int(network.network_address) + 10)
            end = int(ipaddress.ip_address(pool["end"]))
            address = next(
                str(ipaddress.ip_address(n)) for n in range(start, end + 1) if str(ipaddress.ip_address(n)) not in used
            )
        port["fixed_ips"] = [{"ip_address": address, "subnet_id": subnet["id"]}]
        self._ports[port["id"]]["fixed_ips"] = [{"ip_address": address, "subnet_id": subnet["id"]}]
        return result


class NovaBox(integrated_helpers._IntegratedTestBase):
    """nova's integrated functional-test stack, set up once and then kept running."""

    ADMIN_API = True
    USE_PROJECT_ID = False
    keystone_url: str | None = None
    service_password: str = ""

    def __init__(self) -> None:
        super().__init__("serve")
        self.STUB_KEYSTONE = self.keystone_url is None

    def serve(self) -> None:
        """testtools needs a test method; the box is driven by :func:`main`, not by a test runner."""

    def setUp(self) -> None:
        self.useFixture(fixtures.MonkeyPatch("nova.tests.fixtures.WarningsFixture", _QuietWarnings))
        self.useFixture(fixtures.MonkeyPatch("nova.tests.fixtures.NeutronFixture", _AddressingNeutron))
        super().setUp()

    def _setup_services(self) -> None:
        # before the API's paste pipeline is loaded: it reads these when authtoken is built
        self.flags(compute_driver="fake.MediumFakeDriver")
        self.flags(api_paste_config=str(Path(sys.prefix) / "etc" / "nova" / "api-paste.ini"), group="wsgi")
        if self.keystone_url is not None:
            import keystonemiddleware.auth_token  # noqa: F401 - registers [keystone_authtoken]
            from keystoneauth1 import loading
            from nova import conf as nova_conf

            conf = nova_conf.CONF
            conf.register_opts(loading.get_auth_plugin_conf_options("password"), group="keystone_authtoken")
            for key, value in {
                "www_authenticate_uri": self.keystone_url,
                "auth_url": self.keystone_url,
                "auth_type": "password",
                "username": "nova",
                "password": self.service_password,
                "project_name": "service",
                "user_domain_name": "Default",
                "project_domain_name": "Default",
                "service_token_roles_required": True,
                "memcached_servers": None,
            }.items():
                self.flags(**{key: value}, group="keystone_authtoken")
        super()._setup_services()


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        sys.stderr.write(f"novabox {self.address_string()} {format % args}\n")


def _lab_facts(box: NovaBox) -> dict[str, Any]:
    images = [{"id": image["id"], "name": image["name"]} for image in box.glance.images.values()]
    return {
        "project_id": PROJECT_ID,
        "images": sorted(images, key=lambda i: i["name"]),
        "network": {"id": box.neutron.network_1["id"], "name": box.neutron.network_1["name"]},
        "subnet": {"cidr": box.neutron.subnet_1["cidr"], "gateway": box.neutron.subnet_1["gateway_ip"]},
        "hypervisor": "compute",
    }


def main() -> int:
    """Bring the stack up and serve nova's API until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keystone-url", help="keystone's v3 URL; without it nova's auth is stubbed")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(ARGV[1:])

    # Only the LISTENING line may go to stdout: the launcher stops reading it after that line.
    announce = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    NovaBox.keystone_url = args.keystone_url
    NovaBox.service_password = os.environ.get("NOVA_SERVICE_PASSWORD", "")
    box = NovaBox()
    box.setUp()
    app = box.api_fixture.app()

    server = _ThreadingServer(("127.0.0.1", args.port), _QuietHandler)
    server.set_app(app)
    port = server.server_address[1]

    def stop(signum: int, frame: FrameType | None) -> None:
        # All state is in memory or already committed; nova's worker threads would only delay a
        # normal exit past the launcher's patience.
        server.server_close()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    facts = _lab_facts(box)
    print(f"LISTENING http://127.0.0.1:{port}/v2.1 {json.dumps(facts, separators=(',', ':'))}", file=announce, flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
