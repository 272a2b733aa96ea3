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
    # call_tries = 3                     # tries of one read (GET) that failed in transit
    # call_backoff = 0.5

A read-only request (GET, HEAD, OPTIONS) that fails in transit (no connection, connection cut,
no answer within ``call_timeout``, or 502/503/504 from the proxy in front of Foreman) is repeated
at once, up to ``call_tries`` tries in all, by requests' own retry mechanism (urllib3's
``Retry`` on the session's adapters), so one flaky request does not fail a whole step. Creates,
updates and deletes (POST, PUT, DELETE) are never repeated at this level once sent: a connection
cut after Foreman acted would make them twice (only a connection that could not be opened at all
is tried again, whatever the method, since nothing reached Foreman). Their failures go to the
engine, whose step retries find the host by name and marker and update it instead.

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
