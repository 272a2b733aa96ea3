"""Satellite 5 / Spacewalk / Uyuni registrar: system profiles, system groups and activation keys.

Configured by ``[registrars.NAME]`` sections with ``type = "satellite"``::

    [registrars.satellite]
    type = "satellite"
    url = "https://satellite.example.com/rpc/api"
    username = "governord"
    password = { env = "GOVERNORD_SATELLITE_PASSWORD" }
    # verify_tls = true
    # ca_file = "/etc/pki/tls/certs/satellite-ca.pem"

and by ``[tags.TAG.NAME]`` tables (``system_group``, ``activation_key``).
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
