"""OpenStack provider for governord: nova servers, through openstacksdk.

Needs the ``openstack`` extra (``pip install governord[openstack]``, which installs
``openstacksdk``). openstacksdk is imported only when a config uses the type (:mod:`.provider`);
registering the type imports the config models alone (:mod:`.config`), and without openstacksdk
installed ``governord_register_providers`` raises ModuleNotFoundError naming ``openstack``.

Configured as ``[providers.NAME]`` with ``type = "openstack"``::

    [providers.cloud]
    type = "openstack"
    auth_url = "https://keystone.example.com:5000/v3"
    username = "governord"
    password = { env = "GOVERNORD_OPENSTACK_PASSWORD" }   # or { file = "/etc/governord/openstack.pw" }
    project_name = "openshift"
    user_domain_name = "Default"        # the default
    project_domain_name = "Default"     # the default
    region_name = "RegionOne"           # optional
    verify_tls = true                   # ca_file = "/etc/governord/openstack-ca.pem"
    compute_api_version = "2.79"        # optional; default: the newest both sides speak

and a role's ``profile`` is ``{ flavor = "m1.large", image = "rhel-9.4", network = "openshift",
key_name = "ops", user_data = "...", security_groups = ["default"], availability_zone = "nova",
metadata = { role = "node" } }`` (only ``flavor`` and ``image`` are required).
"""

from __future__ import annotations

from governord import hookimpl
from governord.providers import LazyProvider, ProviderRegistry


@hookimpl
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make the ``openstack`` provider type known (openstacksdk is imported when a config uses it)."""
    from .config import OpenStackConfig, OpenStackProfile

    registry.add(LazyProvider("openstack", f"{__name__}.provider:OpenStackProvider", Config=OpenStackConfig,
                              Profile=OpenStackProfile, requires=["openstack", "keystoneauth1"]))
