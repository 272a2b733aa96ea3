"""A Foreman API v2 simulator owned by governord's lab (Foreman + foreman_puppet, a subset).

Run it with ``python -m lab.foreman_sim --port 0 --username admin --password PW``; it prints
``LISTENING <url>`` once it accepts connections. In-process use: :func:`create_app`.
"""

from __future__ import annotations

from .app import create_app
from .seed import default_seed

__all__ = ["create_app", "default_seed"]
