"""PuppetDB registrar: waits for a good Puppet run, and deactivates the node on retirement.

Needs the ``puppetdb`` extra (``pip install governord[puppetdb]``, which brings pypuppetdb,
imported only when a config uses the type). Configured by a ``[registrars.NAME]`` section with ``type = "puppetdb"``::

    [registrars.puppetdb]
    type = "puppetdb"
    url = "https://puppetdb.example.com:8081"          # or http://127.0.0.1:8080
    ca_file = "/etc/governord/puppet/ca.pem"
    client_cert = "/etc/governord/puppet/governord.pem" # https only; must be allowed by PuppetDB
    client_key = "/etc/governord/puppet/governord.key"
    # verify_tls = true
    # timeout = 10                # seconds per HTTP request
    # ready_timeout = 1800        # seconds a host may take to produce a good report
    # classes_from = "foreman"    # configured registrar whose classification lists the classes to expect ("": none)
    # clock_skew = 60             # seconds the agent's clock may be behind governord's

A host counts as ready when its latest report is successful (changed or unchanged, not a noop,
not a fallback to a cached catalog), finished after the host began waiting, and its catalog has
every class its classification demands. The node is deactivated after the machine is gone: a
node that reports again would be reactivated.

There are no ``[tags.TAG.NAME]`` keys: which classes a host needs comes from ``classes_from``.
"""

from __future__ import annotations

from governord import hookimpl
from governord.registrars import LazyRegistrar, RegistrarRegistry


@hookimpl
def governord_register_registrars(registry: RegistrarRegistry) -> None:
    """Make the ``puppetdb`` registrar type known (pypuppetdb is imported when a config uses it)."""
    from .config import PuppetDBConfig, PuppetDBTagMapping

    registry.add(LazyRegistrar("puppetdb", f"{__name__}.registrar:PuppetDBRegistrar", Config=PuppetDBConfig,
                               TagMapping=PuppetDBTagMapping, requires=["pypuppetdb", "requests"]))
