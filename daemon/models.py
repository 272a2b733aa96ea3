"""Value objects shared by the engine, the plugins and the API.

They are plain frozen dataclasses: the engine hands snapshots of persisted rows to plugins,
and a plugin can never change engine state by mutating what it was given.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class HostState(str, enum.Enum):
    """Where a host is in its lifecycle. Persisted; the values are part of the store's format."""

    #: accepted and planned; nothing external has happened yet
    REQUESTED = "requested"
    #: the provider is creating (or finding) the machine and waiting for it to come up
    PROVISIONING = "provisioning"
    #: classification is applied in Foreman, Satellite, ... (also after a tag change)
    REGISTERING = "registering"
    #: registered; waiting until the host is configured (e.g. a good Puppet report)
    CONFIGURING = "configuring"
    #: provisioned, registered and handed back to the application
    READY = "ready"
    #: picked for retirement by a scale-down; the application was told and the host waits until
    #: the application (or a drain hook) confirms it drained, or ``[applications.APP.drain]``
    #: timeout passes. Live (counts against caps), but on its way out for the rules
    DRAINING = "draining"
    #: retirement accepted; nothing external has happened yet
    RETIRING = "retiring"
    #: registrations are being removed, each verified gone
    DEREGISTERING = "deregistering"
    #: the machine is being destroyed (or released), verified gone
    DEPROVISIONING = "deprovisioning"
    #: the machine is gone; records it could have brought back (PuppetDB) are removed
    CLEANING = "cleaning"
    #: everything is undone; the record stays for the audit trail ([retention] gone_hosts_days)
    GONE = "gone"
    #: a step failed for good; ``failed_step`` names it and ``governord-ctl retry`` resumes it
    FAILED = "failed"


#: States in which the engine still has work to do.
ACTIVE_STATES = frozenset(
    {
        HostState.REQUESTED,
        HostState.PROVISIONING,
        HostState.REGISTERING,
        HostState.CONFIGURING,
        HostState.DRAINING,
        HostState.RETIRING,
        HostState.DEREGISTERING,
        HostState.DEPROVISIONING,
        HostState.CLEANING,
    }
)

#: States that count against an application's capacity (the machine exists or is about to).
LIVE_STATES = frozenset(HostState) - {HostState.GONE}


class HostOrigin(str, enum.Enum):
    """How governord came to manage a host."""

    #: governord created the machine and will destroy it on retirement
    PROVISIONED = "provisioned"
    #: an operator tagged an existing machine; retirement deregisters it but never destroys it
    ADOPTED = "adopted"


class PowerState(str, enum.Enum):
    """Normalised power state, as a provider reports it."""

    ON = "on"
    OFF = "off"
    SUSPENDED = "suspended"
    UNKNOWN = "unknown"


#: The ownership marker every provider stores on the machine it creates.
OWNERSHIP_KEY = "governord:host-id"

#: What a governord host's providerID starts with (its id follows): the Kubernetes node's
#: spec.providerID, by which the Cluster Autoscaler matches the node with governord's instance.
PROVIDER_ID_PREFIX = "governord://"
#: Where the providerID reaches the machine besides its cloud-init file: the Foreman host
#: parameter (and so the top-scope Puppet variable of Foreman's ENC) that carries it.
PROVIDER_ID_PARAMETER = "governord_provider_id"
#: The file cloud-init writes it to on the machine.
PROVIDER_ID_FILE = "/etc/governord/provider-id"


def provider_id(host_id: str) -> str:
    """The providerID of the host ``host_id``."""
    return f"{PROVIDER_ID_PREFIX}{host_id}"


@dataclass(frozen=True)
class NetworkAssignment:
    """Static addressing the engine allocated for a host (empty where the provider assigns)."""

    address: str | None = None
    prefix_length: int | None = None
    gateway: str | None = None
    dns_servers: tuple[str, ...] = ()
    domain: str | None = None


@dataclass(frozen=True)
class MachineSpec:
    """What a provider is asked to create.

    ``profile`` was validated against the provider's ``Profile`` model when the config loaded.
    """

    host_id: str
    hostname: str
    fqdn: str
    profile: dict[str, Any]
    network: NetworkAssignment = field(default_factory=NetworkAssignment)
    tags: tuple[str, ...] = ()
    user_data: str | None = None


@dataclass(frozen=True)
class Machine:
    """A machine as the provider sees it."""

    provider: str
    machine_id: str
    name: str
    host_id: str | None
    power: PowerState
    addresses: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HostView:
    """A read-only snapshot of one host record, as given to plugins."""

    id: str
    name: str
    fqdn: str
    app: str | None
    role: str | None
    origin: HostOrigin
    state: HostState
    provider: str | None
    machine_id: str | None
    tags: tuple[str, ...]
    addresses: tuple[str, ...]
    #: per-registrar classification, e.g. ``{"foreman": {"hostgroup": ..., "puppet_classes": [...]}}``
    classification: dict[str, Any]
    #: per-registrar record of what was registered, e.g. ``{"foreman": {"id": 12}}``
    registrations: dict[str, Any]
    failed_step: str | None = None
    error: str | None = None
    #: the address leased for it from a ``[networks.NAME]`` pool, known before the machine exists
    #: (None: the platform assigns one); once provisioned, ``addresses`` has it first
    address: str | None = None

    @property
    def primary_address(self) -> str | None:
        return self.addresses[0] if self.addresses else None
