"""Puppet CA registrar: pre-authorises a host's certificate and cleans it on retirement.

Needs the ``puppetca`` extra (``pip install governord[puppetca]``, which brings ``requests``,
imported only when a config uses the type). Configured by a ``[registrars.NAME]`` section with
``type = "puppetca"``::

    [registrars.puppetca]
    type = "puppetca"
    url = "https://puppet.example.com:8140"
    ca_file = "/etc/governord/puppet/ca.pem"           # Puppet's CA bundle
    client_cert = "/etc/governord/puppet/governord.pem" # carries pp_cli_auth (puppetserver ca generate --ca-client)
    client_key = "/etc/governord/puppet/governord.key"
    # verify_tls = true
    # puppet_server = "puppet.example.com"             # what agents connect to (default: the url's host)
    # token_ttl = 7200                                 # seconds an autosign token stays valid

Before a machine exists, the registrar makes a one-time autosign token for exactly its
certificate name and hands cloud-init the ``puppet`` module settings that put the token into the
agent's CSR (``challengePassword``). The puppetserver's autosign policy executable,
``governord-autosign CERTNAME``, asks governord on its autosign socket (``[api]
autosign_socket``) whether that token is right, and the request asks for nothing else.

There are no ``[tags.TAG.NAME]`` keys: the certificate does not depend on the host's tags.
"""

from __future__ import annotations

from governord import hookimpl
from governord.registrars import LazyRegistrar, RegistrarRegistry


@hookimpl
def governord_register_registrars(registry: RegistrarRegistry) -> None:
    """Make the ``puppetca`` registrar type known (requests is imported when a config uses it)."""
    from .config import PuppetCAConfig, PuppetCATagMapping

    registry.add(LazyRegistrar("puppetca", f"{__name__}.registrar:PuppetCARegistrar", Config=PuppetCAConfig,
                               TagMapping=PuppetCATagMapping, requires=["requests", "cryptography"]))
