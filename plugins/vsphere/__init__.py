"""vSphere provider for governord: VMs cloned from a template on vCenter, through pyvmomi.

Needs the ``vsphere`` extra (``pip install governord[vsphere]``, which installs ``pyvmomi``).
pyvmomi is imported only when the provider type is registered: importing this package never
needs it, and without it ``governord_register_providers`` raises ImportError naming pyvmomi.

Configured as ``[providers.NAME]`` with ``type = "vsphere"``::

    [providers.vcenter]
    type = "vsphere"
    url = "https://vcenter.example.com/sdk"
    username = "governord@vsphere.local"
    password = { env = "GOVERNORD_VSPHERE_PASSWORD" }    # or { file = "/etc/governord/vsphere.pw" }
    verify_tls = true                                     # ca_file = "/etc/governord/vcenter-ca.pem"
    datacenter = "DC0"
    cluster = "DC0_C0"
    resource_pool = "governord"     # optional, path below the cluster's root pool
    folder = "governord"            # optional, VM folder path below the datacenter's VM folder
    datastore = "LocalDS_0"         # optional, else the template's

and a role's ``profile`` is ``{ template = "rhel9-template", cpus = 2, memory_mb = 4096,
network = "VM Network", annotation = "..." }`` (only ``template`` is required).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from governord import hookimpl

if TYPE_CHECKING:
    from governord.providers import ProviderRegistry


@hookimpl
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make the ``vsphere`` provider type known (pyvmomi is imported only here, on demand)."""
    from .provider import VSphereProvider

    registry.add(VSphereProvider)
