"""Built-in plugins: the bridge from the hooks to the configured provider and registrar
instances. They are registered explicitly (never through entry points) and cannot be disabled.

Provisioning is a hook so that a site plugin can take over for some hosts; the built-in
implementation runs ``trylast`` and hands the work to the host's provider instance.
Each registrar instance gets its own plugin object, named ``registrar:NAME``, so that the
dispatcher attributes every registration result and failure to that instance. Both also answer
the sweep's hooks: listing what carries the ownership marker, and removing an orphaned entry.
``[drain.command]`` registers one more, ``builtin:drain-command``: it answers
``governord_drain_host`` by running the configured command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from .. import hookimpl
from ..errors import PermanentError

if TYPE_CHECKING:
    from ..config import Config, DrainCommand
    from ..models import HostView, Machine, MachineSpec
    from ..providers import Provider
    from ..registrars import Registrar, Registration


log = logging.getLogger(__name__)


class DrainCommandPlugin:
    """``[drain.command]``: a host drained when the command exits 0. Run without a shell, with the
    host in the environment (GOVERNORD_HOST, GOVERNORD_FQDN, GOVERNORD_HOST_ID, GOVERNORD_APP,
    GOVERNORD_ROLE) and no input; killed after its timeout (then: not yet). Its output is logged
    (its first 2000 characters), never sent anywhere."""

    name = "builtin:drain-command"

    def __init__(self, command: DrainCommand) -> None:
        self.command = command

    @hookimpl
    async def governord_drain_host(self, host: HostView) -> bool | None:
        if self.command.applications is not None and host.app not in self.command.applications:
            return None
        env = {**os.environ, "GOVERNORD_HOST": host.name, "GOVERNORD_FQDN": host.fqdn, "GOVERNORD_HOST_ID": host.id,
               "GOVERNORD_APP": host.app or "", "GOVERNORD_ROLE": host.role or ""}
        process = await asyncio.create_subprocess_exec(
            *self.command.argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        try:
            async with asyncio.timeout(self.command.timeout):
                output, _ = await process.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)  # its children too (the session it leads)
            await process.wait()
            log.warning("drain command for %s ran past %gs: killed (not drained yet)", host.name,
                        self.command.timeout, extra={"host": host.name})
            return False
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            raise
        text = output.decode(errors="replace")[:2000].strip()
        log.info("drain command for %s exited %d%s", host.name, process.returncode, f": {text}" if text else "",
                 extra={"host": host.name, "exit": process.returncode})
        return process.returncode == 0


class ProvisioningPlugin:
    """Provision and deprovision through the provider instance a host names."""

    name = "builtin:provisioning"

    def __init__(self, providers: dict[str, Provider]) -> None:
        self.providers = providers

    def _provider(self, host: HostView) -> Provider:
        if host.provider is None or host.provider not in self.providers:
            raise PermanentError(f"host {host.name}: no provider instance {host.provider!r} is configured")
        return self.providers[host.provider]

    @hookimpl(trylast=True)
    async def governord_provision_host(self, host: HostView, spec: MachineSpec) -> Machine:
        provider = self._provider(host)
        await provider.ensure_started()
        machine = await provider.create_or_find(spec)
        return await provider.wait_ready(machine, provider.config.ready_timeout)

    @hookimpl(trylast=True)
    async def governord_deprovision_host(self, host: HostView) -> bool:
        provider = self._provider(host)
        await provider.ensure_started()
        await provider.destroy(host.id)
        return True

    @hookimpl
    async def governord_probe_peer(self, kind: str, name: str) -> bool | None:
        instance = self.providers.get(name) if kind == "provider" else None
        return None if instance is None else (await instance.probe()) or None

    @hookimpl
    async def governord_list_machines(self, provider: str) -> list[Machine] | None:
        instance = self.providers.get(provider)
        if instance is None:
            return None
        await instance.ensure_started()
        return await instance.list_owned()


class RegistrarPlugin:
    """One configured registrar instance, speaking the hooks."""

    def __init__(self, registrar: Registrar, config: Config) -> None:
        self.registrar = registrar
        self.config = config

    @property
    def name(self) -> str:
        return f"registrar:{self.registrar.name}"

    @hookimpl
    def governord_classify_host(self, host: HostView, tags: tuple[str, ...]) -> dict[str, Any]:
        mappings = []
        for tag in tags:
            definition = self.config.tags.get(tag)
            if definition is None:
                raise PermanentError(f"unknown tag {tag!r}")
            mapping = definition.mappings.get(self.registrar.name)
            if mapping is not None:
                mappings.append((tag, mapping))
        return {self.registrar.name: self.registrar.classify(mappings)}

    @hookimpl
    async def governord_prepare_host(self, host: HostView) -> dict[str, Any] | None:
        await self.registrar.ensure_started()
        record = await self.registrar.prepare(host, host.classification.get(self.registrar.name, {}))
        return None if record is None else {self.registrar.name: record}

    @hookimpl
    async def governord_register_host(self, host: HostView) -> dict[str, Any]:
        await self.registrar.ensure_started()
        classification = host.classification.get(self.registrar.name, {})
        record = await self.registrar.register(host, classification)
        return {self.registrar.name: record}

    @hookimpl
    async def governord_check_host_ready(self, host: HostView, waited: float) -> dict[str, bool] | None:
        await self.registrar.ensure_started()
        ready = await self.registrar.check_ready(host, waited)
        return None if ready is None else {self.registrar.name: ready}

    @hookimpl
    async def governord_deregister_host(self, host: HostView, phase: str) -> None:
        if phase != self.registrar.deregister_phase.value:
            return
        await self.registrar.ensure_started()
        await self.registrar.deregister(host)

    @hookimpl
    async def governord_probe_peer(self, kind: str, name: str) -> bool | None:
        if kind != "registrar" or name != self.registrar.name:
            return None
        return (await self.registrar.probe()) or None

    @hookimpl
    async def governord_list_registrations(self, system: str) -> list[Registration] | None:
        if system != self.registrar.name:
            return None
        await self.registrar.ensure_started()
        return await self.registrar.list_owned()

    @hookimpl
    async def governord_remove_registration(self, registration: Registration) -> bool | None:
        if registration.system != self.registrar.name:
            return None
        await self.registrar.ensure_started()
        return await self.registrar.remove_owned(registration)
