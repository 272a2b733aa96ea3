"""vSphere provider for governord: VMs cloned from a template on vCenter, through pyvmomi.

Needs the ``vsphere`` extra (``pip install governord[vsphere]``, which installs ``pyvmomi``).
pyvmomi is imported only when a config uses the type (:mod:`.provider`); registering the type
imports the config models alone (:mod:`.config`), and without pyvmomi installed
``governord_register_providers`` raises ModuleNotFoundError naming it.

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

from governord import hookimpl
from governord.providers import LazyProvider, ProviderRegistry


@hookimpl
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make the ``vsphere`` provider type known (pyvmomi is imported when a config uses it)."""
    from .config import VSphereConfig, VSphereProfile

    registry.add(LazyProvider("vsphere", f"{__name__}.provider:VSphereProvider", Config=VSphereConfig,
                              Profile=VSphereProfile, requires=["pyVmomi", "pyVim"]))
