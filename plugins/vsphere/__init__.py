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
    # call_tries = 3                # tries of one read-only SOAP call that failed in transit
    # call_backoff = 0.5

and a role's ``profile`` is ``{ template = "rhel9-template", cpus = 2, memory_mb = 4096,
network = "VM Network", annotation = "..." }`` (only ``template`` is required).

Every SOAP call is an HTTP POST, so which calls are safe to repeat is the provider's own list
(``READ_ONLY_METHODS`` in :mod:`.provider`: property reads, ``RetrieveServiceContent``, the
PropertyCollector's ``RetrieveProperties(Ex)``/``ContinueRetrievePropertiesEx``, and the search
index's ``Find*``). One of them that fails in transit (no connection, connection cut, no answer
within ``call_timeout``, an unreadable answer, or 502/503/504 from the proxy in front of vCenter)
is repeated, up to ``call_tries`` tries in all, so that one flaky request does not fail a whole
step. Every other call (``CloneVM_Task``, ``ReconfigVM_Task``, ``PowerOnVM_Task``, ``SetField``,
``CreateContainerView``, logging in, ...) is sent once: a connection cut after vCenter acted
would make it twice. Its failure goes to the engine, whose step retries find the VM by its
marker and complete it instead. The retrying is a stub in front of pyVmomi's SOAP stub (the way
pyVmomi's own ``SessionOrientedStub`` wraps it), so it covers every call made after logging in.
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
