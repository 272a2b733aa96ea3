"""Loading plugins: the built-ins explicitly, then the ``governord`` entry points one by one.

A plugin whose import fails (a vendor SDK not installed) is recorded, shown by
``governord-ctl plugins``, and is fatal only if the config uses the type it provides (the
entry-point name is the type name). Plugins register their types lazily
(:class:`~governord.providers.LazyType`): a type's SDK is imported when a config uses it, and
an SDK that fails then is a configuration error naming the section's ``type``. A hook implementation that matches no spec (a misspelled
hook) fails start-up through pluggy's ``check_pending``.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field
from typing import Any

import pluggy

from .. import hookspecs
from ..providers import ProviderRegistry
from ..registrars import RegistrarRegistry
from . import call_startup

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "governord"


class PluginLoadError(Exception):
    """A plugin is broken in a way that must stop the daemon (e.g. a misspelled hook)."""


@dataclass
class PluginStatus:
    """What ``governord-ctl plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    loaded: bool = False
    error: str | None = None
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "loaded": self.loaded,
            "error": self.error,
            "hooks": sorted(self.hooks),
        }


class PluginManager:
    """Owns the pluggy manager. Nothing but :mod:`governord.dispatch` calls its hooks."""

    def __init__(self, *, disabled: list[str] | tuple[str, ...] = ()) -> None:
        self.pm = pluggy.PluginManager("governord")
        self.pm.add_hookspecs(hookspecs)
        self.disabled = set(disabled)
        self.status: dict[str, PluginStatus] = {}
        self.providers = ProviderRegistry()
        self.registrars = RegistrarRegistry()

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for ep in importlib.metadata.entry_points(group=group):
            if ep.name in self.status:
                continue
            dist = ep.dist
            status = PluginStatus(ep.name, dist.name if dist else None, dist.version if dist else None)
            self.status[ep.name] = status
            if ep.name in self.disabled:
                self.pm.set_blocked(ep.name)
                status.error = "disabled by configuration"
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is reported, not fatal
                status.error = f"{type(exc).__name__}: {exc}"
                log.warning("plugin did not load", extra={"plugin": ep.name, "error": status.error})
                continue
            self.register(plugin, ep.name)

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object and check its hook names at once."""
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginLoadError(f"plugin {name}: {exc}") from exc
        status = self.status.setdefault(name, PluginStatus(name))
        status.loaded = True
        status.error = None
        status.hooks = [impl.name for impl in self.pm.get_hookcallers(plugin) or []]

    def unregister(self, name: str) -> None:
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.status.pop(name, None)

    def collect_types(self) -> None:
        """Ask every plugin for its provider and registrar types (start-up; failures are fatal)."""
        for hook_name, registry in (
            ("governord_register_providers", self.providers),
            ("governord_register_registrars", self.registrars),
        ):
            for outcome in call_startup(self.pm, hook_name, registry=registry):
                if outcome.error is None:
                    continue
                if isinstance(outcome.error, ImportError) and outcome.plugin in self.status:
                    # the plugin imports its SDK lazily: same as failing to import at all
                    self._mark_unavailable(outcome.plugin, outcome.error)
                    continue
                raise PluginLoadError(f"plugin {outcome.plugin}: {hook_name} failed: {outcome.error}")

    def _mark_unavailable(self, name: str, error: BaseException) -> None:
        status = self.status[name]
        status.loaded = False
        status.hooks = []
        status.error = f"{type(error).__name__}: {error}"
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        log.warning("plugin unavailable", extra={"plugin": name, "error": status.error})

    def unavailable_types(self) -> dict[str, str]:
        """Entry-point names (= type names) whose plugin did not load, with the reason."""
        return {name: s.error for name, s in self.status.items() if not s.loaded and s.error}

    def describe(self) -> list[dict[str, Any]]:
        return [s.as_dict() for s in sorted(self.status.values(), key=lambda s: s.name)]
