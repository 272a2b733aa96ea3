"""Satellite 5 / Spacewalk / Uyuni registrar: system profiles, system groups and activation keys.

Configured by ``[registrars.NAME]`` sections with ``type = "satellite"``::

    [registrars.satellite]
    type = "satellite"
    url = "https://satellite.example.com/rpc/api"
    username = "governord"
    password = { env = "GOVERNORD_SATELLITE_PASSWORD" }
    # verify_tls = true
    # ca_file = "/etc/pki/tls/certs/satellite-ca.pem"
    # call_tries = 3          # tries of one read-only call that failed in transit
    # call_backoff = 0.5

and by ``[tags.TAG.NAME]`` tables (``system_group``, ``activation_key``).

Every XML-RPC call is an HTTP POST, so which calls are safe to repeat is the registrar's own list
(``READ_ONLY_METHODS`` in :mod:`.registrar`: ``system.getId``, ``system.getDetails``,
``system.listSystems``, ``system.listGroups``, ``systemgroup.getDetails``,
``activationkey.getDetails``). One of them that fails in transit (no connection, connection cut,
no answer within ``call_timeout``, an unreadable answer, or 502/503/504 from the proxy in front
of Satellite) is repeated, up to ``call_tries`` tries in all, so that one flaky request does not
fail a whole step. A call that creates or changes something (``system.createSystemProfile``,
``system.setDetails``, ``system.setGroupMembership``, ``system.deleteSystem``, ``auth.login``)
is sent once: a connection cut after Satellite acted would make it twice. Its failure goes to
the engine, whose step retries find the profile by name and marker instead.
"""

from __future__ import annotations

from governord import hookimpl
from governord.registrars import LazyRegistrar, RegistrarRegistry


@hookimpl
def governord_register_registrars(registry: RegistrarRegistry) -> None:
    """Make the ``satellite`` registrar type known (its module is imported when a config uses it)."""
    from .config import SatelliteConfig, SatelliteTagMapping

    registry.add(LazyRegistrar("satellite", f"{__name__}.registrar:SatelliteRegistrar", Config=SatelliteConfig,
                               TagMapping=SatelliteTagMapping))
