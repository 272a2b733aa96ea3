"""governord, the Governor: decides, provisions, classifies, registers and retires machines.

Plugins write ``from governord import hookimpl`` and implement the hooks in
:mod:`governord.hookspecs`. Providers subclass :class:`governord.providers.Provider`,
registrars subclass :class:`governord.registrars.Registrar`; both are registered through
the ``governord`` entry-point group.
"""

from __future__ import annotations

import pluggy

__version__ = "0.1.0"

#: Marker for hook implementations in plugins.
hookimpl = pluggy.HookimplMarker("governord")

__all__ = ["__version__", "hookimpl"]
