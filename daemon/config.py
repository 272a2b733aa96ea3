"""Configuration: one TOML file, validated strictly before anything is written.

The core owns the schema of ``[daemon]``, ``[api]``, ``[engine]``, ``[networks.*]``, ``[tags.*]``
and ``[applications.*]``. Provider and registrar types own theirs: a ``[providers.NAME]`` section
is validated by the ``Config`` model of its ``type``, a role's ``profile`` by that provider type's
``Profile`` model, and a ``[tags.TAG.REGISTRAR]`` table by the registrar type's ``TagMapping``.

Any unknown key, wrong type or missing value raises :class:`~governord.errors.ConfigError` naming
the file and the dotted key; the daemon exits 2 on it. Secrets are never written inline: a secret
is a reference, ``{ env = "NAME" }`` or ``{ file = "/path" }``, resolved at load time.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import core_schema

from .errors import ConfigError
from .providers import ProviderConfig, ProviderProfile, ProviderRegistry, StrictModel
from .registrars import RegistrarConfig, RegistrarRegistry, TagMapping


class Secret:
    """A resolved secret. Its repr and str never show the value."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.source})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        # A config field typed Secret accepts only a reference ({env=...} or {file=...}).
        return core_schema.no_info_plain_validator_function(_resolve_secret)


def _resolve_secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, dict) or len(value) != 1 or not ({"env", "file"} & set(value)):
        raise ValueError('a secret is given by reference: { env = "NAME" } or { file = "/path" }')
    if "env" in value:
        name = value["env"]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return Secret(os.environ[name], f"env:{name}")
    path = Path(value["file"])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    return Secret(text.rstrip("\r\n"), f"file:{path}")


#: A config field holding a secret reference (the same as annotating it ``Secret``).
SecretRef = Secret


class DaemonSection(StrictModel):
    #: where the database, the CA and the generated certificates live
    state_dir: Path = Path("/var/lib/governord")
    #: log threshold
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: entry-point plugins not to load (by entry-point name)
    disabled_plugins: list[str] = Field(default_factory=list)
    #: seconds SIGTERM waits for in-flight steps before parking them
    shutdown_grace: float = Field(default=20.0, ge=0)


class TLSSection(StrictModel):
    #: server certificate (PEM); empty: one issued by governord's own CA
    certificate: Path | None = None
    #: its key (PEM)
    key: Path | None = None
    #: CA that application client certificates must chain to; empty: governord's own CA
    client_ca: Path | None = None


class ApiSection(StrictModel):
    #: address of the application API (HTTPS with client certificates)
    listen: str = "0.0.0.0"
    #: its port; 0 picks a free one (written to STATE_DIR/api.port)
    port: int = Field(default=8443, ge=0, le=65535)
    #: names the server certificate is issued for (when governord issues it)
    server_names: list[str] = Field(default_factory=lambda: ["localhost"])
    #: Unix socket of the admin API used by governord-ctl
    admin_socket: Path = Path("/run/governord/admin.sock")
    #: its permissions (octal string); whoever can open it is an administrator
    admin_socket_mode: str = "0660"
    #: largest request body accepted, in bytes
    max_body_bytes: int = Field(default=65536, ge=1024)
    tls: TLSSection = Field(default_factory=TLSSection)

    @field_validator("admin_socket_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        try:
            int(value, 8)
        except ValueError:
            raise ValueError(f"not an octal mode: {value!r}") from None
        return value


class EngineSection(StrictModel):
    #: hosts worked on at once
    workers: int = Field(default=16, ge=1, le=1024)
    #: seconds a claimed step stays leased to this process without renewal
    lease_seconds: float = Field(default=120.0, gt=1)
    #: tries of a step that fails with a retryable error before the host is failed
    retry_limit: int = Field(default=5, ge=0)
    #: first delay between tries, doubled each time
    retry_backoff: float = Field(default=2.0, ge=0)
    #: longest delay between tries
    retry_backoff_max: float = Field(default=120.0, ge=0)
    #: seconds one plugin hook call may take
    hook_timeout: float = Field(default=900.0, gt=0)
    #: seconds between readiness checks of a registered host (e.g. asking PuppetDB for a report)
    ready_poll_interval: float = Field(default=10.0, gt=0)
    #: what a host that cannot be brought up (a step failed for good, or out of tries) becomes:
    #: "rollback" undoes what was made (registrations, then the machine, each verified gone) and
    #: ends it gone with failed_step and error kept as the reason; "keep" leaves it failed as it
    #: is, for an operator to inspect and retry. A host that was ready once is always kept.
    on_permanent_failure: Literal["rollback", "keep"] = "rollback"


class NetworkSection(StrictModel):
    #: the subnet, e.g. "198.51.100.0/24"
    cidr: ipaddress.IPv4Network
    #: first and last address governord may hand out (default: the whole subnet)
    first: ipaddress.IPv4Address | None = None
    last: ipaddress.IPv4Address | None = None
    gateway: ipaddress.IPv4Address | None = None
    dns_servers: list[ipaddress.IPv4Address] = Field(default_factory=list)
    #: DNS domain of hosts on this network
    domain: str = "localdomain"


class PlacementSection(StrictModel):
    #: provider instance (a [providers.NAME]) the role's machines may be made on
    provider: str
    #: most live hosts of this application on this provider (empty: only the application's cap)
    cap: int | None = Field(default=None, ge=0)
    #: network static addresses come from on this provider (default: the role's)
    network: str | None = None
    #: provider-specific settings, validated by the provider type's Profile
    profile: dict[str, Any] = Field(default_factory=dict)


class RoleSection(StrictModel):
    #: tags every host of this role carries
    tags: list[str] = Field(min_length=1)
    #: where the role's machines may be made, in order of preference (first with room wins)
    placements: list[PlacementSection] = Field(default_factory=list)
    #: shorthand for one placement: the provider instance ...
    provider: str | None = None
    #: ... and its profile
    profile: dict[str, Any] | None = None
    #: network (a [networks.NAME]) the engine allocates static addresses from; empty: provider's DHCP
    network: str | None = None
    #: host names; {app}, {role} and {seq} are filled in
    name_pattern: str = "{app}-{role}-{seq:02d}"
    #: DNS domain of the role's hosts (default: the network's)
    domain: str | None = None

    @model_validator(mode="after")
    def _one_way(self) -> RoleSection:
        if self.placements and (self.provider is not None or self.profile is not None):
            raise ValueError("give either placements or provider/profile, not both")
        if not self.placements and self.provider is None:
            raise ValueError("give placements, or provider (and profile)")
        return self

    def effective_placements(self) -> list[PlacementSection]:
        if self.placements:
            return self.placements
        return [PlacementSection(provider=self.provider or "", profile=self.profile or {})]


class WebhookRule(StrictModel):
    #: the deploy-hook event this rule answers: "deploy" or "post_deploy"
    event: Literal["deploy", "post_deploy"] = "deploy"
    #: only for this deployed component (GOVERNORD_COMPONENT in the hook); empty: any
    component: str | None = None
    #: the role the request is for
    role: str
    #: ask for this many more hosts ...
    add: int | None = Field(default=None, ge=1, le=1000)
    #: ... or keep this many hosts of the role
    count: int | None = Field(default=None, ge=0, le=10000)

    @model_validator(mode="after")
    def _one_of(self) -> WebhookRule:
        if (self.add is None) == (self.count is None):
            raise ValueError("give exactly one of add and count")
        return self


class WebhookSection(StrictModel):
    #: shared secrets the deploy hooks sign with (several while one is being rotated)
    secrets: list[SecretRef] = Field(min_length=1)
    #: seconds a delivery's timestamp may be off governord's clock
    tolerance: float = Field(default=300.0, gt=0, le=3600)
    #: what an event asks for; the first rule that matches the event and component applies
    rules: list[WebhookRule] = Field(default_factory=list)


class ApplicationSection(StrictModel):
    description: str = ""
    #: most live hosts this application may have, over all roles (in flight included)
    max_hosts: int = Field(default=10, ge=0)
    #: fewest hosts: a scale-down or release below it is declined
    min_hosts: int = Field(default=0, ge=0)
    #: seconds after an accepted scale-up before the next one is accepted
    cooldown: float = Field(default=0.0, ge=0)
    #: "never", "always", or a number N: requests that take the application above N hosts wait
    #: for an operator's approval
    approval: Literal["never", "always"] | int = "never"
    #: seconds a request waits for approval before it expires
    approval_expiry: float = Field(default=86400.0, gt=0)
    #: which hosts a scale-down releases: "newest" or "oldest" first (named hosts: release them)
    deletion_policy: Literal["newest", "oldest"] = "newest"
    #: client certificate common name that identifies the application (default: its name)
    certificate_cn: str | None = None
    #: signed deploy-hook events (POST /v1/webhooks/openshift) and what they ask for
    webhook: WebhookSection | None = None
    roles: dict[str, RoleSection] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounds(self) -> ApplicationSection:
        if self.min_hosts > self.max_hosts:
            raise ValueError(f"min_hosts ({self.min_hosts}) is above max_hosts ({self.max_hosts})")
        for rule in self.webhook.rules if self.webhook else []:
            if rule.role not in self.roles:
                raise ValueError(f"webhook rule for role {rule.role!r}: the application has no such role")
        return self


class CoreConfig(StrictModel):
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    api: ApiSection = Field(default_factory=ApiSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    networks: dict[str, NetworkSection] = Field(default_factory=dict)
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    registrars: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tags: dict[str, dict[str, Any]] = Field(default_factory=dict)
    applications: dict[str, ApplicationSection] = Field(default_factory=dict)


@dataclass(frozen=True)
class TagDefinition:
    name: str
    description: str
    #: registrar instance name -> that registrar's TagMapping
    mappings: dict[str, TagMapping]


@dataclass(frozen=True)
class Placement:
    """One provider a role's machines may be made on, validated."""

    provider: str
    #: most live hosts of the application on this provider (None: no cap of its own)
    cap: int | None
    network: str | None
    profile: ProviderProfile


@dataclass(frozen=True)
class Config:
    """The validated configuration, with plugin-owned sections parsed by their owners' models."""

    path: str
    core: CoreConfig
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    registrars: dict[str, RegistrarConfig] = field(default_factory=dict)
    tags: dict[str, TagDefinition] = field(default_factory=dict)
    #: (application, role) -> where its machines may go, in order of preference
    placements: dict[tuple[str, str], list[Placement]] = field(default_factory=dict)

    @property
    def daemon(self) -> DaemonSection:
        return self.core.daemon

    @property
    def api(self) -> ApiSection:
        return self.core.api

    @property
    def engine(self) -> EngineSection:
        return self.core.engine

    @property
    def applications(self) -> dict[str, ApplicationSection]:
        return self.core.applications

    @property
    def networks(self) -> dict[str, NetworkSection]:
        return self.core.networks

    def tag_order(self) -> list[str]:
        """Tags in the order the config declares them: earlier tags win where one value is chosen."""
        return list(self.tags)


def _first_error(path: str, prefix: str, exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    loc = [str(part) for part in err["loc"] if not str(part).startswith("function-")]
    key = ".".join([p for p in [prefix, *loc] if p])
    kind = err["type"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = err["msg"].removeprefix("Value error, ")
        if "input" in err and kind not in {"value_error"} and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
    return ConfigError(path, key, message)


def _validate(model: type[BaseModel], data: Any, path: str, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _first_error(path, prefix, exc) from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None


def load_config(
    path: str | os.PathLike[str],
    providers: ProviderRegistry,
    registrars: RegistrarRegistry,
    *,
    unavailable: dict[str, str] | None = None,
) -> Config:
    """Read and validate the config at ``path``.

    :param unavailable: provider or registrar type -> why its plugin did not load; a section
        using such a type is reported with that reason.
    :raises ConfigError: naming the file and the key.
    """
    path = str(path)
    raw = read_toml(path)
    return build_config(path, raw, providers, registrars, unavailable=unavailable or {})


def _type_of(path: str, prefix: str, section: dict[str, Any], known: list[str], unavailable: dict[str, str]) -> str:
    kind = section.get("type")
    if not isinstance(kind, str):
        raise ConfigError(path, f"{prefix}.type", "required key is missing" if kind is None else "must be a string")
    if kind in unavailable:
        raise ConfigError(path, f"{prefix}.type", f"type {kind!r} is unavailable: {unavailable[kind]}")
    if kind not in known:
        raise ConfigError(path, f"{prefix}.type", f"unknown type {kind!r} (known: {', '.join(known) or 'none'})")
    return kind


def build_config(
    path: str,
    raw: dict[str, Any],
    providers: ProviderRegistry,
    registrars: RegistrarRegistry,
    *,
    unavailable: dict[str, str],
) -> Config:
    core: CoreConfig = _validate(CoreConfig, raw, path, "")

    provider_configs: dict[str, ProviderConfig] = {}
    for name, section in core.providers.items():
        prefix = f"providers.{name}"
        kind = _type_of(path, prefix, section, providers.names(), unavailable)
        provider_configs[name] = _validate(providers.get(kind).Config, section, path, prefix)  # type: ignore[union-attr]

    registrar_configs: dict[str, RegistrarConfig] = {}
    for name, section in core.registrars.items():
        prefix = f"registrars.{name}"
        kind = _type_of(path, prefix, section, registrars.names(), unavailable)
        registrar_configs[name] = _validate(registrars.get(kind).Config, section, path, prefix)  # type: ignore[union-attr]

    tags: dict[str, TagDefinition] = {}
    for tag, table in core.tags.items():
        description = ""
        mappings: dict[str, TagMapping] = {}
        for key, value in table.items():
            prefix = f"tags.{tag}.{key}"
            if key == "description":
                if not isinstance(value, str):
                    raise ConfigError(path, prefix, "must be a string")
                description = value
            elif key in registrar_configs:
                registrar_type = registrars.get(registrar_configs[key].type)
                mappings[key] = _validate(registrar_type.TagMapping, value, path, prefix)  # type: ignore[union-attr]
            else:
                raise ConfigError(path, prefix, f"unknown key (not a registrar: {', '.join(registrar_configs) or 'none configured'})")
        tags[tag] = TagDefinition(tag, description, mappings)

    for name, network in core.networks.items():
        for attr in ("first", "last", "gateway"):
            address = getattr(network, attr)
            if address is not None and address not in network.cidr:
                raise ConfigError(path, f"networks.{name}.{attr}", f"{address} is not in {network.cidr}")

    placements: dict[tuple[str, str], list[Placement]] = {}
    for app_name, app in core.applications.items():
        for role_name, role in app.roles.items():
            prefix = f"applications.{app_name}.roles.{role_name}"
            if role.network is not None and role.network not in core.networks:
                raise ConfigError(path, f"{prefix}.network", f"no network named {role.network!r}")
            for tag in role.tags:
                if tag not in tags:
                    raise ConfigError(path, f"{prefix}.tags", f"no tag named {tag!r}")
            try:
                role.name_pattern.format(app=app_name, role=role_name, seq=1)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(path, f"{prefix}.name_pattern", f"invalid pattern: {exc}") from None
            chosen: list[Placement] = []
            for index, placement in enumerate(role.effective_placements()):
                where = f"{prefix}.placements.{index}" if role.placements else prefix
                if placement.provider not in provider_configs:
                    raise ConfigError(path, f"{where}.provider", f"no provider named {placement.provider!r}")
                if any(p.provider == placement.provider for p in chosen):
                    raise ConfigError(path, f"{where}.provider", f"provider {placement.provider!r} is listed twice")
                network = placement.network or role.network
                if network is not None and network not in core.networks:
                    raise ConfigError(path, f"{where}.network", f"no network named {network!r}")
                provider_type = providers.get(provider_configs[placement.provider].type)
                profile = _validate(provider_type.Profile, placement.profile, path, f"{where}.profile")  # type: ignore[union-attr]
                chosen.append(Placement(placement.provider, placement.cap, network, profile))
            placements[(app_name, role_name)] = chosen

    return Config(path, core, provider_configs, registrar_configs, tags, placements)


def redacted(value: Any) -> Any:
    """A JSON-friendly copy of a config value with secrets replaced by their source."""
    if isinstance(value, Secret):
        return f"<secret {value.source}>"
    if isinstance(value, BaseModel):
        return {k: redacted(getattr(value, k)) for k in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
