"""Bare-metal provider for governord: a declared pool of machines, powered through their BMCs
(IPMI or Redfish) and installed by network boot (PXE).

Needs the ``baremetal`` extra (``pip install governord[baremetal]``, which installs ``pyghmi``
for IPMI and ``sushy`` for Redfish). Importing this package or registering the type needs
neither; a provider instance checks, when it is made, that the SDK of every protocol its pool
uses is installed (ImportError naming it), and imports it on the first BMC call.

Configured as ``[providers.NAME]`` with ``type = "baremetal"``::

    [providers.rack1]
    type = "baremetal"
    ready_port = 22            # the OS counts as up when this TCP port answers on `address`
    boot_timeout = 1800        # seconds from power-on until it must answer
    power_timeout = 60         # seconds a power change may take to show on the BMC

    [[providers.rack1.machines]]
    name = "node-a1"
    address = "192.0.2.21"     # the installed OS's address (DHCP reservation / kickstart)
    mac = "52:54:00:aa:00:01"  # the NIC it PXE-boots from
    cpus = 32
    memory_mb = 131072
    rack = "r1"
    labels = ["gpu"]
    bmc = { protocol = "ipmi", address = "192.0.2.121", username = "governord",
            password = { env = "GOVERNORD_BMC_PASSWORD" } }

    [[providers.rack1.machines]]
    name = "node-b1"
    address = "192.0.2.22"
    cpus = 16
    memory_mb = 65536
    bmc = { protocol = "redfish", address = "192.0.2.122", username = "governord",
            password = { file = "/etc/governord/bmc.pw" }, system_id = "1", verify_tls = true }

and a role's ``profile`` holds constraints: ``{ min_cpus = 16, min_memory_mb = 65536,
rack = "r1", labels = ["gpu"] }`` (all optional). Allocations are kept in
``STATE_DIR/baremetal/NAME.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from governord import hookimpl

if TYPE_CHECKING:
    from governord.providers import ProviderRegistry


@hookimpl
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make the ``baremetal`` provider type known (its SDKs are imported only on use)."""
    from .provider import BareMetalProvider

    registry.add(BareMetalProvider)
