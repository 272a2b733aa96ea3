"""The running daemon's parts, built from one validated config and rebuilt on reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .api.ratelimit import RateLimits
from .autoscaler.thresholds import ThresholdScaler
from .config import Config
from .dispatch import Dispatcher
from .dispatch.builtin import DrainCommandPlugin, ProvisioningPlugin, RegistrarPlugin
from .dispatch.health import PeerHealth
from .dispatch.pluginmanager import PluginManager
from .engine import Engine
from .engine.callbacks import Notifier
from .engine.retention import Pruner
from .engine.sweep import Sweeper
from .fleet import Fleet
from .metrics import Metrics
from .pki import CertificateAuthority
from .providers import Provider
from .registrars import Registrar, declared_keys
from .rules import Governor
from .store import CertificateStore, Store

log = logging.getLogger(__name__)


class Runtime:
    """Config, plugins, store, provider and registrar instances, engine, the Governor, the sweep and the
    retention."""

    def __init__(self, config: Config, plugins: PluginManager, store: Store) -> None:
        self.config = config
        self.plugins = plugins
        self.store = store
        self.providers: dict[str, Provider] = {}
        self.registrars: dict[str, Registrar] = {}
        self.dispatcher = Dispatcher(plugins.pm, timeout=config.engine.hook_timeout)
        #: this instance among those sharing the store: heartbeat, leader lease, job leases
        self.fleet = Fleet(store, config)
        self.engine = Engine(store, self.dispatcher, config, owner=self.fleet.owner)
        self.fleet.in_flight = lambda: self.engine.in_flight
        #: TCP ports this daemon listens on (its application API), where callbacks never go:
        #: the configured port now, the one bound added when the listener starts
        self.listeners: set[int] = {config.api.port} - {0}
        self.governor = Governor(store, self.engine, config, listeners=self.listeners)
        self.metrics = Metrics(store, self.dispatcher, self.engine, self.fleet)
        self.governor.on_decision.append(self.metrics.decided)
        #: each application's rate limit on scale, release and webhook requests (per instance)
        self.rate_limits = RateLimits(config, self.metrics.registry)
        self.ca = CertificateAuthority(config.daemon.state_dir / "pki")
        self.metrics.ca_path = self.ca.cert_path
        self.certificates = CertificateStore(store, refresh=config.core.store.revocation_refresh)
        #: closing the instances a reload replaced, once their steps are done
        self._retiring: set[asyncio.Task[None]] = set()
        self.notifier = Notifier(store, self.governor.request_status, config, self.listeners, self.fleet)
        self.sweeper = Sweeper(store, self.dispatcher, self.engine, config, self.metrics.registry, self.fleet)
        self.pruner = Pruner(store, self.governor, config, self.fleet)
        #: the roles' autoscale rules on Prometheus queries
        self.thresholds = ThresholdScaler(self.governor, store, config, self.fleet, self.metrics.registry)
        #: this instance's probes of its providers and registrars, and the check of the tags' mappings
        self.health = PeerHealth(self.dispatcher, config, self.metrics.registry)
        self._instance_plugins: list[str] = []
        #: the daemon's "read the config again" (POST /v1/reload): None, or why it was refused
        self.reload_config: Callable[[], Awaitable[str | None]] | None = None
        #: the last reload: when, and why it was refused (None: taken)
        self.last_reload: dict[str, Any] | None = None
        self._build_instances(config)

    @property
    def state_dir(self) -> Path:
        return self.config.daemon.state_dir

    @classmethod
    async def open(cls, config: Config, plugins: PluginManager) -> Runtime:
        section = config.core.store
        store = await Store.open(section.effective_url(config.daemon.state_dir), pool_size=section.pool_size)
        runtime = cls(config, plugins, store)
        try:
            await runtime.fleet.join()
        except BaseException:
            await store.close()
            raise
        runtime.ca.ensure()
        return runtime

    def _build_instances(self, config: Config) -> None:
        """Instantiate providers and registrars and register their bridge plugins."""
        state_dir = config.daemon.state_dir
        self.providers = {
            name: self.plugins.providers.load(cfg.type)(name, cfg, state_dir=state_dir)
            for name, cfg in config.providers.items()
        }
        self.registrars = {
            name: self.plugins.registrars.load(cfg.type)(name, cfg, state_dir=state_dir)
            for name, cfg in config.registrars.items()
        }
        self.governor.application_keys = {name: declared_keys(type(registrar))
                                          for name, registrar in self.registrars.items()}
        for name in self._instance_plugins:
            self.plugins.unregister(name)
        self._instance_plugins = []
        provisioning = ProvisioningPlugin(self.providers)
        self.plugins.register(provisioning, provisioning.name)
        self._instance_plugins.append(provisioning.name)
        for registrar in self.registrars.values():
            plugin = RegistrarPlugin(registrar, config)
            self.plugins.register(plugin, plugin.name)
            self._instance_plugins.append(plugin.name)
        if config.core.drain.command is not None:
            drain = DrainCommandPlugin(config.core.drain.command)
            self.plugins.register(drain, drain.name)
            self._instance_plugins.append(drain.name)

    async def start(self) -> None:
        for instance in [*self.providers.values(), *self.registrars.values()]:
            try:
                await instance.ensure_started()
            except Exception as exc:  # noqa: BLE001 - a peer down at boot is retried on first use
                log.warning("could not connect %s at start: %s", instance.name, exc)
        await self.governor.number_hosts()
        try:
            await self.fleet.beat()  # the leader lease first, if free: the periodic jobs need it
        except Exception as exc:  # noqa: BLE001 - the heartbeat goes on trying
            log.warning("first heartbeat failed: %s", exc)
        self.fleet.start()
        await self.engine.start()
        await self.notifier.start()
        self.sweeper.start()
        self.pruner.start()
        self.thresholds.start()
        self.health.start(lambda: self.registrars)

    async def reload(self, config: Config) -> None:
        """Take a new, already validated config. Instances are rebuilt; work in flight keeps
        the instances it started with until its step ends."""
        old = [*self.providers.values(), *self.registrars.values()]
        self.config = config
        self.engine.config = config
        self.governor.config = config
        self.metrics.configure(config)
        await self.governor.number_hosts()  # a role's new name pattern
        self.sweeper.reconfigure(config)
        self.rate_limits.configure(config)
        self.notifier.reconfigure(config)
        self.pruner.reconfigure(config)
        await self.thresholds.reconfigure(config)
        self.certificates.refresh = config.core.store.revocation_refresh
        self.fleet.reconfigure(config)
        self.dispatcher.timeout = config.engine.hook_timeout
        self._build_instances(config)
        self.health.configure(config)
        # Closing an instance ends its sessions (a vCenter logout), which would fail a clone
        # still running on it: the old instances are closed once the steps in flight now are
        # done (new steps already use the new instances), or after the hook timeout.
        in_flight = self.engine.tasks_in_flight()
        closing = asyncio.create_task(self._close_after(old, in_flight), name="close-old-instances")
        self._retiring.add(closing)
        closing.add_done_callback(self._retiring.discard)

    async def _close_after(self, instances: list[Any], in_flight: list[asyncio.Task[None]]) -> None:
        if in_flight:
            await asyncio.wait(in_flight, timeout=self.config.engine.hook_timeout)
        await self._close(instances)

    @staticmethod
    async def _close(instances: list[Any]) -> None:
        for instance in instances:
            try:
                await instance.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %s failed", instance.name)

    async def check_mappings(self, config: Config) -> list[str]:
        """Before a reload takes ``config``: what its new or changed tag mappings name that the
        registrars do not have (each "file: key: why"; empty: nothing, or not checked). A
        registrar whose section is unchanged is asked through the running instance, any other
        through one made for the check."""
        if not config.core.health.check_mappings:
            return []
        running, made = {}, []
        for name, section in config.registrars.items():
            current = self.registrars.get(name)
            if current is not None and current.config == section:
                running[name] = current
            else:
                instance = self.plugins.registrars.load(section.type)(name, section, state_dir=config.daemon.state_dir)
                running[name] = instance
                made.append(instance)
        try:
            check = await self.health.check_mappings(running, config, previous=self.config)
        finally:
            await self._close(made)
        return [str(problem) for problem in check.problems]

    async def stop(self) -> None:
        await self.health.stop()
        await self.thresholds.stop()
        await self.pruner.stop()
        await self.sweeper.stop()
        await self.notifier.stop()
        await self.engine.stop(self.config.daemon.shutdown_grace)
        await self.fleet.stop()
        if self._retiring:  # instances of an earlier config: their steps have ended with the engine
            await asyncio.wait(self._retiring)
        await self._close([*self.providers.values(), *self.registrars.values()])
        await self.store.close()

    def status(self) -> dict[str, Any]:
        return {
            "node": self.engine.node,
            "leader": self.fleet.is_leader,
            "in_flight": self.engine.in_flight,
            "providers": {n: p.config.type for n, p in self.providers.items()},
            "registrars": {n: r.config.type for n, r in self.registrars.items()},
            "applications": sorted(self.config.applications),
            "tags": sorted(self.config.tags),
            "config": self.config.path,
            "last_reload": self.last_reload,
            "peers": self.health.view(),
            "not_ready": self.health.readiness(),
            "mappings": None if self.health.mappings is None else self.health.mappings.view(),
        }
