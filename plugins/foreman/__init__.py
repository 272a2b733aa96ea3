"""Foreman registrar: registers hosts in Foreman with their hostgroup, Puppet classes and parameters.

Needs the ``foreman`` extra (``pip install governord[foreman]``, which brings apypie, the Foreman
project's own apipie client), imported only when a config uses the type. Configured by a ``[registrars.NAME]`` section with
``type = "foreman"``::

    [registrars.foreman]
    type = "foreman"
    url = "https://foreman.example.com"
    username = "governord"
    password = { env = "FOREMAN_PASSWORD" }
    organization = "Governor Lab"        # by name
    location = "Lab"                     # by title
    puppet_environment = "production"    # used when foreman_puppet is installed
    # verify_tls = true
    # ca_file = "/etc/pki/foreman-ca.pem"

and per tag by ``[tags.TAG.NAME]`` tables::

    [tags.node.foreman]
    hostgroup = "openshift/node"          # by title
    puppet_classes = ["openshift::node"]
    parameters = { openshift_role = "node" }
"""

from __future__ import annotations

from governord import hookimpl
from governord.registrars import LazyRegistrar, RegistrarRegistry


@hookimpl
def governord_register_registrars(registry: RegistrarRegistry) -> None:
    """Make the ``foreman`` registrar type known (apypie is imported when a config uses it)."""
    from .config import ForemanConfig, ForemanTagMapping

    registry.add(LazyRegistrar("foreman", f"{__name__}.registrar:ForemanRegistrar", Config=ForemanConfig,
                               TagMapping=ForemanTagMapping, requires=["apypie", "requests"]))
