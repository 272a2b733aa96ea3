"""A simulator of the Satellite 5 / Spacewalk / Uyuni XML-RPC API (``/rpc/api``), owned by governord.

No Satellite can run in the lab, so the Satellite registrar is tested against this. It follows
the facts in ``reference/satellite/``: session keys and their faults, dispatch by method name and
parameter count (with beanified names), fault codes and fault strings as redstone writes them,
``system.getId`` returning an array, org-prefixed activation keys, and an asynchronous
``system.deleteSystems``. It covers the ``auth``, ``system``, ``systemgroup`` and ``activationkey``
methods governord uses, nothing else.
"""

from __future__ import annotations

from .server import SatelliteSimulator

__all__ = ["SatelliteSimulator"]
