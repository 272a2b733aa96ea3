"""The plugin API of governord: every hook a plugin can implement.

Plugins are modules or objects registered under the ``governord`` entry-point group, with
functions marked ``@governord.hookimpl``. Implementations may be plain functions or
``async def``. Only :mod:`governord.dispatch` calls these hooks; it runs implementations one by
one in pluggy's order (``tryfirst`` first, ``trylast`` last, otherwise last-registered first),
awaits each under a timeout, and attributes every result and failure to the plugin behind it.

Dispatch modes named below:

collect
    every implementation runs; results are gathered; a failing plugin is logged and skipped.
first
    implementations run in order until one returns something other than ``None``; a failure
    stops the call and fails the step, naming the plugin.
broadcast
    every implementation runs; if any fails, the step fails naming each failing plugin (the
    others' work stands, which is why these hooks must be idempotent).
notify
    every implementation runs; failures are logged and counted, never fail the caller.

No spec uses pluggy's ``firstresult`` or hook wrappers: with ``async def`` implementations
pluggy would return the first coroutine object instead of the first result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .models import HostView, Machine, MachineSpec
    from .providers import ProviderRegistry
    from .registrars import RegistrarRegistry, Registration

hookspec = pluggy.HookspecMarker("governord")

# -- start-up: making types known -------------------------------------------------------------


@hookspec
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make provider types known: call ``registry.add(...)`` for each, with a
    :class:`~governord.providers.LazyProvider` (the type's name and config models; its class and
    vendor SDK are imported only when a config uses the type) or the class itself.

    :param registry: the process's provider-type registry.
    :returns: nothing.

    Dispatch: called once at start-up, synchronously; a failure stops the daemon. Must be a
    plain ``def``. Idempotent: may be called again on reload.

    .. versionadded:: 0.1
    """


@hookspec
def governord_register_registrars(registry: RegistrarRegistry) -> None:
    """Make registrar types known: call ``registry.add(...)`` for each, with a
    :class:`~governord.registrars.LazyRegistrar` (the type's name and config models; its class
    and client library are imported only when a config uses the type) or the class itself.

    :param registry: the process's registrar-type registry.
    :returns: nothing.

    Dispatch: called once at start-up, synchronously; a failure stops the daemon. Must be a
    plain ``def``. Idempotent: may be called again on reload.

    .. versionadded:: 0.1
    """


# -- the pipeline: tag -> classify -> provision -> register ... deregister -> deprovision --------


@hookspec
def governord_tag_host(host: HostView, tags: tuple[str, ...]) -> list[str] | None:
    """A host's tags are being set to ``tags``; return further tags it should carry, or None.

    Lets a site derive tags (``broker`` hosts are also ``monitored``). Returned tags are added
    (unknown tags are refused later by classification, naming the tag).

    :param host: the host before the change.
    :param tags: the tags asked for.
    :returns: extra tags, or None.

    Dispatch: collect. May be ``async def``. Must be pure (no external side effects): it is
    called again whenever tags change.

    .. versionadded:: 0.1
    """


@hookspec
def governord_classify_host(host: HostView, tags: tuple[str, ...]) -> dict[str, Any] | None:
    """Say what the host's tags mean to one system: ``{system_name: classification}``.

    The core implements this once per configured registrar from its ``[tags.TAG.NAME]``
    tables; a plugin may add a system of its own. Results are merged into
    ``HostView.classification``; two plugins answering for the same system is an error.

    :param host: the host being classified.
    :param tags: its tags, in the order the config declares them.
    :returns: a mapping with JSON-serialisable values, or None.

    Dispatch: collect (but a failure fails the step: a half classification is never applied).
    May be ``async def``. Must be pure.

    .. versionadded:: 0.1
    """


@hookspec
def governord_prepare_host(host: HostView) -> dict[str, Any] | None:
    """Before the machine exists, authorise it in advance in a system (e.g. a one-time Puppet
    autosign token for exactly its certificate name); return ``{system_name: record}``.

    The record is stored in ``HostView.registrations``; a ``"cloud_config"`` mapping in it is
    merged into the cloud-init user data the machine is created with.

    :param host: the host, classified, before provisioning; ``host.address`` is the address
        leased for it from an address pool, if any (e.g. DNS records made before the machine).
    :returns: a JSON-serialisable record per system, or None.

    Dispatch: broadcast. May be ``async def``. Must be idempotent: after a crash it is called
    again and must return what it made the first time (``host.registrations`` holds it).

    .. versionadded:: 0.2
    """


@hookspec
def governord_provision_host(host: HostView, spec: MachineSpec) -> Machine | None:
    """Create or find the machine for ``host`` and wait until it is up with an address.

    The core implements this (``trylast``) by calling the host's provider instance; a plugin
    may take over for some hosts by answering first and returning None for the others.

    :param host: the host, with ``provider`` naming the provider instance.
    :param spec: what to create; ``spec.host_id`` is the ownership marker to set and find by.
    :returns: the running machine, or None to let the next implementation answer.

    Dispatch: first. May be ``async def``. Must be idempotent: after a crash it is called
    again for the same host and must find the machine made the first time.

    .. versionadded:: 0.1
    """


@hookspec
def governord_deprovision_host(host: HostView) -> bool | None:
    """Destroy (or release) the host's machine and verify that it is gone.

    :param host: the host, with ``provider`` and ``machine_id`` as recorded.
    :returns: True when this implementation handled it, None to let the next one answer.

    Dispatch: first. May be ``async def``. Must be idempotent: "already gone" is success.

    .. versionadded:: 0.1
    """


@hookspec
def governord_register_host(host: HostView) -> dict[str, Any] | None:
    """Register the host in a system with its classification (create, or update after a tag
    change); return ``{system_name: record}`` describing what now exists.

    :param host: the host, with ``addresses`` and ``classification`` filled in.
    :returns: a JSON-serialisable record per system, stored in ``HostView.registrations``.

    Dispatch: broadcast. May be ``async def``. Must be idempotent (an upsert): events are
    delivered again after a restart.

    .. versionadded:: 0.1
    """


@hookspec
def governord_check_host_ready(host: HostView, waited: float) -> dict[str, bool] | None:
    """Is the registered host configured as its classification demands (e.g. PuppetDB has a
    successful report with the classes its tags need)? Return ``{system_name: ready}``.

    The host is handed back only when no system answers False; it is asked again every
    ``[engine] ready_poll_interval`` seconds. Raise PermanentError (with the reason) to fail the
    host, e.g. when it has waited too long.

    :param host: the host, registered.
    :param waited: seconds since the host started waiting (since registration).
    :returns: readiness per system, or None for no opinion.

    Dispatch: collect (a failure fails the step). May be ``async def``. Must be side-effect free.

    .. versionadded:: 0.2
    """


@hookspec
def governord_deregister_host(host: HostView, phase: str) -> None:
    """Remove the host from a system and verify that it is gone.

    Called twice on retirement: with ``phase="before-machine"`` before the machine is
    destroyed, and with ``phase="after-machine"`` after it, for records the machine could bring
    back while it runs (a PuppetDB node reactivates when it reports). An implementation acts in
    one of the two phases.

    :param host: the host, with ``registrations`` as recorded.
    :param phase: ``"before-machine"`` or ``"after-machine"``.
    :returns: nothing.

    Dispatch: broadcast. May be ``async def``. Must be idempotent: "not found" is success.

    .. versionadded:: 0.1
    """


@hookspec
def governord_drain_host(host: HostView) -> bool | None:
    """Has the host drained: may it be retired now? Asked of a host in ``draining`` (picked by a
    scale-down of an application with ``[applications.APP.drain]``): when it starts draining,
    then every ``[engine] ready_poll_interval`` seconds until one implementation says True, the
    application confirms, or the application's drain timeout passes. A site plugs in its own
    drain here (``kubectl drain``, ``oc adm drain``); the built-in ``[drain.command]`` runs a
    command.

    Start the drain on the first call and answer from then on whether it is done; the call is
    repeated, so it must be idempotent, and it should return quickly (start long work and
    report on it later): it runs in the engine's step, under ``[engine] hook_timeout``. Sync
    work belongs in a thread (``asyncio.to_thread``), never on the event loop.

    :param host: the host, draining.
    :returns: None when the host is not this plugin's to drain; True when it drained; False
        when not yet.

    Dispatch: collect. A failure is logged and read as "not yet". May be ``async def``.

    .. versionadded:: 0.4
    """


# -- events --------------------------------------------------------------------------------


@hookspec
def governord_host_event(host: HostView, event: str, detail: dict[str, Any]) -> None:
    """Something happened to a host: a state transition (``event`` is the new state, e.g.
    ``ready``, ``draining`` or ``gone``) or a step failure (``step-failed``).

    :param host: the host after the change.
    :param event: what happened.
    :param detail: JSON-serialisable particulars (previous state, step, error, ...).
    :returns: nothing.

    Dispatch: notify, after the transition is committed. May be ``async def``. Delivery is
    at-least-once: implementations must tolerate duplicates.

    .. versionadded:: 0.1
    """


# -- the sweep: what exists, compared with what governord recorded -----------------------------


@hookspec
def governord_list_machines(provider: str) -> list[Machine] | None:
    """List every machine on the provider instance named ``provider`` that carries governord's
    ownership marker (``Machine.host_id``), whether or not governord still has a record of it.

    The core implements this for every configured provider instance (its ``list_owned``); a
    plugin that provisions some hosts itself answers for the provider names it serves.

    :param provider: a provider instance name (a ``[providers.NAME]`` section, or a name a
        plugin serves).
    :returns: the marked machines, or None when this implementation does not serve ``provider``.

    Dispatch: collect, by the sweep, once per provider instance. The lists of all answering
    implementations are joined. If any implementation fails, the listing of that provider is
    incomplete: the sweep then judges no record on it to have vanished (a failure is never read
    as "the machine is gone"). May be ``async def``. Must be side-effect free.

    .. versionadded:: 0.3
    """


@hookspec
def governord_list_registrations(system: str) -> list[Registration] | None:
    """List every entry in the system ``system`` (a registrar instance name) that carries
    governord's ownership marker, e.g. Foreman hosts whose comment, or Satellite profiles whose
    description, names a governord host id.

    :param system: a registrar instance name (a ``[registrars.NAME]`` section, or a system a
        plugin serves).
    :returns: the marked entries (``Registration.system`` is ``system``), or None when this
        implementation does not serve ``system`` or cannot list it.

    Dispatch: collect, by the sweep, once per system. If any implementation fails, the system's
    listing is reported as an error and nothing in it is judged. May be ``async def``. Must be
    side-effect free.

    .. versionadded:: 0.3
    """


@hookspec
def governord_remove_registration(registration: Registration) -> bool | None:
    """Remove one listed entry (an orphan: its host is gone or was never governord's), by the
    system's own id, and verify that it is gone.

    The entry is removed only if it still carries the marker of ``registration.host_id``: between
    listing and removal a newer host may have taken the name over.

    :param registration: an entry as ``governord_list_registrations`` returned it.
    :returns: True when removed, False when there was nothing to remove (already gone, or it
        belongs to another host now), None when this implementation does not serve
        ``registration.system``.

    Dispatch: first. May be ``async def``. Must be idempotent.

    .. versionadded:: 0.3
    """


# -- health: can the peers be reached ----------------------------------------------------------


@hookspec
def governord_probe_peer(kind: str, name: str) -> bool | None:
    """Can the provider or registrar instance ``name`` be reached, with governord's credentials?

    The core implements this for every configured instance (its ``probe``: one cheap
    authenticated call); a plugin that serves a provider or system name itself answers for it.

    :param kind: ``"provider"`` (a ``[providers.NAME]`` section, or a name a plugin provisions
        on) or ``"registrar"`` (a ``[registrars.NAME]`` section, or a system a plugin serves).
    :param name: the instance's name.
    :returns: True when the peer answered; None when this implementation does not serve
        ``name``, or cannot ask it. Raise when it cannot be reached or refuses: the exception's
        message is what `governord-ctl status` and ``/readyz`` show.

    Dispatch: collect, by the health checks (``[health]``), once per instance and interval,
    under ``[health] timeout``. Any failure makes the peer down; otherwise any True makes it up;
    answers of None only leave it unchecked (it does not count against readiness). May be
    ``async def``. Must be side-effect free.

    .. versionadded:: 0.5
    """
