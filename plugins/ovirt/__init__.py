"""oVirt/RHV provider for governord: VMs made from a template on an oVirt engine, through ovirtsdk4.

Needs the ``ovirt`` extra (``pip install governord[ovirt]``, which installs
``ovirt-engine-sdk-python``; building it needs gcc, the Python headers and libxml2-dev).
ovirtsdk4 is imported only when a config uses the type (:mod:`.provider`); registering the type
imports the config models alone (:mod:`.config`), and without ovirtsdk4 installed
``governord_register_providers`` raises ModuleNotFoundError naming it.

Configured as ``[providers.NAME]`` with ``type = "ovirt"``::

    [providers.rhv]
    type = "ovirt"
    url = "https://engine.example.com/ovirt-engine/api"
    username = "governord@internal"
    password = { env = "GOVERNORD_OVIRT_PASSWORD" }     # or { file = "/etc/governord/ovirt.pw" }
    verify_tls = true                                    # ca_file = "/etc/governord/engine-ca.pem"
    cluster = "Default"

and a role's ``profile`` is ``{ template = "rhel9-template", memory_mb = 4096, cpus = 2,
cloud_init = true }`` (only ``template`` is required).
"""

from __future__ import annotations

from governord import hookimpl
from governord.providers import LazyProvider, ProviderRegistry


@hookimpl
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make the ``ovirt`` provider type known (ovirtsdk4 is imported when a config uses it)."""
    from .config import OVirtConfig, OVirtProfile

    registry.add(LazyProvider("ovirt", f"{__name__}.provider:OVirtProvider", Config=OVirtConfig, Profile=OVirtProfile,
                              requires=["ovirtsdk4", "pycurl"]))
