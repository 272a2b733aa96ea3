"""The daemon process: validate, start the runtime, listen, notify systemd, handle signals.

Order of start-up: plugins are loaded and the config is validated before anything is written
(a bad config exits 2 naming the file and key, leaving the state directory untouched); then
the state directory is locked, the store opened and migrated, the engine started, the
listeners opened (the Cluster Autoscaler's gRPC one too when [autoscaler] is set), and only then
READY=1 is sent.

SIGHUP reloads the config (an invalid one is refused and the old one stays) and the site CA's
CRL (a bad one is logged and the old one stays). SIGTERM stops
taking requests, lets running steps finish for ``shutdown_grace`` seconds, parks the rest
(they resume at the next start) and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, group_id, load_config, read_toml
from .descriptors import raise_descriptor_limit
from .dispatch.pluginmanager import PluginLoadError, PluginManager
from .errors import ConfigError, ConfigErrors
from .logs import setup_logging
from .pki import RevocationListError
from .systemd import keep_watchdog_alive, notify, watchdog_interval

if TYPE_CHECKING:
    from .api.tls import ApplicationTLS
    from .runtime import Runtime

log = logging.getLogger("governord")

EXIT_CONFIG = 2
#: the daemon's umask (systemd's unit sets the same, UMask=0027)
STATE_UMASK = 0o027


def _disabled_plugins(path: str) -> list[str]:
    # Needed before validation (validation needs the plugins' types); validated properly later.
    try:
        section = read_toml(path).get("daemon", {})
    except ConfigError:
        return []
    value = section.get("disabled_plugins", []) if isinstance(section, dict) else []
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def prepare(config_path: str, *, resolve_secrets: bool = True) -> tuple[PluginManager, Config]:
    """Load plugins and validate the config; raises ConfigError (every error found) or PluginLoadError."""
    plugins = PluginManager(disabled=_disabled_plugins(config_path))
    plugins.load_entry_points()
    plugins.collect_types()
    config = load_config(config_path, plugins.providers, plugins.registrars, unavailable=plugins.unavailable_types(),
                         resolve_secrets=resolve_secrets)
    return plugins, config


def run(config_path: str, *, check_only: bool = False, resolve_secrets: bool = True) -> int:
    setup_logging("info")
    try:
        plugins, config = prepare(config_path, resolve_secrets=resolve_secrets)
    except ConfigError as exc:
        for error in ConfigErrors.each(exc):
            print(f"governord: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except PluginLoadError as exc:
        print(f"governord: plugin error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if check_only:
        print(f"governord: {config_path}: valid" + ("" if resolve_secrets else " (secrets not read)"))
        return 0
    setup_logging(config.daemon.log_level)
    # whatever the daemon writes (the database and its -wal/-shm, the CA's and issued keys,
    # api.port, a plugin's state) is for governord and its group at most: never world-readable,
    # and group-writable never (a stricter umask from the caller stays)
    os.umask(os.umask(STATE_UMASK) | STATE_UMASK)
    return asyncio.run(Daemon(config_path, plugins, config).run())


class Daemon:
    def __init__(self, config_path: str, plugins: PluginManager, config: Config) -> None:
        self.config_path = config_path
        self.plugins = plugins
        self.config = config
        self.stopping = asyncio.Event()
        self.runtime: Runtime | None = None
        self._lock_fd: int | None = None
        self._reloading: asyncio.Task[str | None] | None = None
        self._reload_lock = asyncio.Lock()
        self.tls: ApplicationTLS | None = None

    def _lock_state_dir(self, state_dir: Path) -> bool:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(state_dir / "governord.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return True

    def _tls_files(self, runtime: Runtime) -> tuple[str, str, str]:
        tls = self.config.api.tls
        client_ca = str(tls.client_ca or runtime.ca.cert_path)
        if tls.certificate and tls.key:
            return str(tls.certificate), str(tls.key), client_ca
        pair = runtime.ca.issue(self.config.api.server_names[0], server_names=self.config.api.server_names,
                                stem="server")
        assert pair.key is not None  # the server's own key is kept
        return str(pair.certificate), str(pair.key), client_ca

    async def run(self) -> int:
        # imported here, not at the top: `governord --check` and a refused config need none of it
        from aiohttp import web
        from sqlalchemy.exc import DBAPIError

        from .api.admin_api import create_admin_api
        from .api.app_api import create_app_api
        from .api.autosign_api import create_autosign_api
        from .api.connections import (
            ConnectionLimits,
            GuardedSite,
            install_exception_handler,
        )
        from .api.tls import ApplicationTLS
        from .fleet import DuplicateInstance
        from .runtime import Runtime
        from .store import SchemaTooNew

        state_dir = self.config.daemon.state_dir
        try:
            locked = self._lock_state_dir(state_dir)
        except OSError as exc:  # not ours to write, or on a read-only file system
            print(f"governord: cannot use daemon.state_dir {state_dir}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if not locked:
            print(f"governord: another governord is using {state_dir}", file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        descriptors = raise_descriptor_limit()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_reload)

        try:
            runtime = self.runtime = await Runtime.open(self.config, self.plugins)
        except DuplicateInstance as exc:
            print(f"governord: configuration error: {ConfigError(self.config_path, 'fleet.instance', str(exc))}",
                  file=sys.stderr)
            return EXIT_CONFIG
        except SchemaTooNew as exc:  # starting again will not help: systemd stops on exit 2
            print(f"governord: cannot use the store: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except DBAPIError as exc:  # the database is down or refuses us: systemd starts us again
            print(f"governord: cannot open the store: {type(exc.orig).__name__}: {str(exc.orig).strip()}",
                  file=sys.stderr)
            return 1
        except OSError as exc:  # the state directory's files (the database, the CA) not ours to use
            print(f"governord: cannot open the state in {state_dir}: {exc}", file=sys.stderr)
            return 1
        runtime.reload_config = self.reload
        await runtime.start()
        #: what has been started, undone in reverse if a later part cannot start
        runners: list[Any] = []
        #: the Unix sockets this start made (removed again by an abort)
        served: set[Path] = set()

        async def abort(message: str) -> int:
            """One line for the operator, everything started stopped again; exit 1."""
            for started in reversed(runners):
                await started.cleanup()
            await runtime.stop()
            for path in (api.admin_socket, api.autosign_socket):
                if path is not None and path in served:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            print(f"governord: {message}", file=sys.stderr)
            return 1

        api = self.config.api
        certificate, key, client_ca = self._tls_files(runtime)
        try:
            self.tls = ApplicationTLS(certificate=certificate, key=key, client_ca=client_ca,
                                      client_crl=api.tls.client_crl, count=runtime.metrics.refused)
        except RevocationListError as exc:  # it changed since the config was checked
            await runtime.stop()
            print(f"governord: configuration error: {ConfigError(self.config_path, 'api.tls.client_crl', str(exc))}",
                  file=sys.stderr)
            return EXIT_CONFIG
        runtime.metrics.tls = self.tls  # its certificates' expiry
        limits = ConnectionLimits.from_config(api, runtime.metrics.refused)
        # one rate-limited line, not a traceback per attempt, when accept() runs out of descriptors
        install_exception_handler(loop, limits)
        app_runner = web.AppRunner(create_app_api(runtime, self.tls, limits), access_log=None,
                                   keepalive_timeout=api.keepalive_timeout)
        admin_runner = web.AppRunner(create_admin_api(runtime), access_log=None,
                                     keepalive_timeout=api.keepalive_timeout)
        for runner in (app_runner, admin_runner):
            await runner.setup()
            runners.append(runner)
        tls_site = GuardedSite(app_runner, api.listen, api.port, ssl_context=self.tls.context, limits=limits)
        try:
            await tls_site.start()
        except OSError as exc:
            return await abort(_listen_failure("api.listen and api.port", api.listen, api.port, exc))
        port = app_runner.addresses[0][1]
        runtime.listeners.add(port)  # callbacks never go there
        (state_dir / "api.port").write_text(f"{port}\n")
        try:
            await _serve_unix(admin_runner, api.admin_socket, api.admin_socket_mode)
        except OSError as exc:  # its directory not ours to make or write in
            return await abort(f"cannot serve api.admin_socket {api.admin_socket}: {exc.strerror or exc}")
        served.add(api.admin_socket)
        autosign_runner = None
        if api.autosign_socket is not None:
            autosign_runner = web.AppRunner(create_autosign_api(runtime), access_log=None,
                                            keepalive_timeout=api.keepalive_timeout)
            await autosign_runner.setup()
            runners.append(autosign_runner)
            try:
                await _serve_unix(autosign_runner, api.autosign_socket, api.autosign_socket_mode,
                                  api.autosign_socket_group)
            except OSError as exc:  # its directory missing or not ours, the group not ours to give
                return await abort(f"cannot serve api.autosign_socket {api.autosign_socket}: {exc.strerror or exc}")

        autoscaler = None
        if self.config.core.autoscaler is not None:
            from .autoscaler.service import AutoscalerListener

            autoscaler = AutoscalerListener(runtime, self.tls, certificate=certificate, key=key, client_ca=client_ca)
            try:
                autoscaler_port = await autoscaler.start()
            except OSError as exc:
                section = self.config.core.autoscaler
                return await abort(_listen_failure("autoscaler.listen and autoscaler.port", section.listen,
                                                   section.port, exc))
            runtime.listeners.add(autoscaler_port)  # callbacks never go there either
            log.info("autoscaler provider listening", extra={"listen": f"{self.config.core.autoscaler.listen}:{autoscaler_port}",
                                                              "node_groups": self.config.core.autoscaler.node_groups})

        watchdog: asyncio.Task[None] | None = None
        interval = watchdog_interval()
        if interval:
            watchdog = asyncio.create_task(keep_watchdog_alive(interval))
        notify("READY=1", f"STATUS=serving on {api.listen}:{port} and {api.admin_socket}", f"MAINPID={os.getpid()}")
        log.info("governord ready", extra={"listen": f"{api.listen}:{port}", "admin": str(api.admin_socket),
                                           "descriptors": descriptors, "max_connections": api.max_connections,
                                           "autosign": str(api.autosign_socket) if api.autosign_socket else None})

        await self.stopping.wait()
        notify("STOPPING=1", "STATUS=stopping: finishing or parking in-flight steps")
        log.info("stopping")
        # stop taking requests first, then let the engine finish or park its steps
        if autoscaler is not None:
            await autoscaler.stop()
        await app_runner.cleanup()
        await admin_runner.cleanup()
        if autosign_runner is not None:
            await autosign_runner.cleanup()
        await runtime.stop()
        if watchdog:
            watchdog.cancel()
        for path in (api.admin_socket, api.autosign_socket):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        log.info("stopped")
        return 0

    def _schedule_reload(self) -> None:
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.create_task(self.reload())

    async def reload(self) -> str | None:
        """Read the config again and take it; None, or why it was refused (the running config
        stays). Reloads take turns (SIGHUP, the admin API's POST /v1/reload). The outcome is
        the runtime's ``last_reload``, which `governord-ctl status` shows."""
        async with self._reload_lock:
            refusal = await self._reload()
        if self.runtime is not None:
            self.runtime.last_reload = {"at": time.time(), "refused": refusal}
        return refusal

    async def _reload(self) -> str | None:
        notify("RELOADING=1")
        try:
            config = load_config(
                self.config_path, self.plugins.providers, self.plugins.registrars,
                unavailable=self.plugins.unavailable_types(),
            )
        except ConfigError as exc:
            errors = ConfigErrors.each(exc)
            log.error("reload refused, keeping the running config: %s", "; ".join(str(e) for e in errors),
                      extra={"config": self.config_path})
            notify("READY=1", f"STATUS=reload refused: {errors[0]}")
            return "; ".join(str(e) for e in errors)
        if self.runtime is not None:
            missing = await self.runtime.check_mappings(config)
            if missing:
                log.error("reload refused, keeping the running config: %s", "; ".join(missing),
                          extra={"config": self.config_path})
                notify("READY=1", f"STATUS=reload refused: {missing[0]}")
                return "; ".join(missing)
        changed = _restart_only(self.config, config)
        if changed:
            log.warning("these settings take effect at the next restart: %s", ", ".join(changed))
        self.config = config
        if self.runtime is not None:
            await self.runtime.reload(config)
        if self.tls is not None:
            self.tls.reload_crl("SIGHUP")
        setup_logging(config.daemon.log_level)
        log.info("configuration reloaded", extra={"config": self.config_path})
        notify("READY=1", "STATUS=configuration reloaded")
        return None


async def _serve_unix(runner: Any, path: Path, mode: str, group: str | None = None) -> None:
    """Listen on the Unix socket ``path`` (a stale one is replaced) with ``mode``, and give it
    ``group`` when set. The directory is made if missing, but never re-permissioned: who may
    reach the socket is its directory's business as much as the socket's."""
    from aiohttp import web

    _clear_socket_path(path)
    site = web.UnixSite(runner, str(path))
    await site.start()
    os.chmod(path, int(mode, 8))
    if group is not None:
        os.chown(path, -1, group_id(group))


def _listen_failure(keys: str, address: str, port: int, exc: OSError) -> str:
    """One line for a TCP listener that could not be opened, with what to check."""
    if exc.errno == errno.EADDRINUSE:
        why = (f"something listens there already (another governord, or another service: "
               f"ss -ltnp 'sport = :{port}'); choose another port or stop it")
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "no interface of this machine has that address"
    elif exc.errno == errno.EACCES:
        why = "ports below 1024 need CAP_NET_BIND_SERVICE (the unit file's AmbientCapabilities)"
    else:
        why = exc.strerror or str(exc)
    return f"cannot listen on {keys} {address}:{port}: {why}"


def _clear_socket_path(path: Path) -> None:
    """Make the socket's directory if missing (its mode is left alone) and remove a stale socket."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _listener(config: Config) -> tuple[Any, ...] | None:
    section = config.core.autoscaler
    return None if section is None else (section.listen, section.port, section.max_concurrent_calls)


def _restart_only(old: Config, new: Config) -> list[str]:
    """Settings a reload cannot apply to a running process."""
    changed: list[str] = []
    pairs: list[tuple[str, Any, Any]] = [
        ("daemon.state_dir", old.daemon.state_dir, new.daemon.state_dir),
        # the gRPC listener's address and limits; its node groups and GPU answers change at once
        ("autoscaler", _listener(old), _listener(new)),
        ("api", old.api, new.api),
        ("daemon.disabled_plugins", old.daemon.disabled_plugins, new.daemon.disabled_plugins),
        # the open store (its engines, pools and writer) stays: a new database needs a restart
        # (how long revocations are kept in memory is taken on reload)
        ("store", old.core.store.model_copy(update={"revocation_refresh": 0.0}),
         new.core.store.model_copy(update={"revocation_refresh": 0.0})),
    ]
    for name, a, b in pairs:
        if a != b:
            changed.append(name)
    return changed
