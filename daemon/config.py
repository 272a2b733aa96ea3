"""Configuration: one TOML file, validated strictly before anything is written.

The core owns the schema of ``[daemon]``, ``[api]``, ``[engine]``, ``[sweep]``, ``[retention]``, ``[store]``, ``[networks.*]``,
``[tags.*]`` and ``[applications.*]``. Provider and registrar types own theirs: a ``[providers.NAME]`` section
is validated by the ``Config`` model of its ``type``, a role's ``profile`` by that provider type's
``Profile`` model, and a ``[tags.TAG.REGISTRAR]`` table by the registrar type's ``TagMapping``.

Any unknown key, wrong type or missing value raises :class:`~governord.errors.ConfigError` naming
the file and the dotted key; the daemon exits 2 on it. Secrets are never written inline: a secret
is a reference, ``{ env = "NAME" }`` or ``{ file = "/path" }``, resolved at load time.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import grp
import ipaddress
import math
import os
import re
import socket
import ssl
import stat
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yarl
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from .descriptors import descriptor_limit, descriptor_shortfall
from .errors import ConfigError, ConfigErrors, FieldError
from .nodetemplate import NodeTemplateSection
from .outbound import Policy, never_reason
from .pki import RevocationListError, load_revocation_lists
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


#: whether a reading of the config resolves its secret references (``governord --check
#: --no-secrets`` checks their shape only, so that an operator can check a config in a shell that
#: has not the daemon's environment nor may read its secret files)
RESOLVE_SECRETS: contextvars.ContextVar[bool] = contextvars.ContextVar("resolve_secrets", default=True)


def _resolve_secret(value: Any) -> Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, dict) or len(value) != 1 or not ({"env", "file"} & set(value)):
        raise ValueError('a secret is given by reference: { env = "NAME" } or { file = "/path" }')
    [(kind, where)] = value.items()
    if not isinstance(where, str) or not where:
        raise ValueError(f'{kind} of a secret reference must be a non-empty string, not {where!r}')
    if not RESOLVE_SECRETS.get():
        return Secret("", f"{kind}:{where} (not read)")
    if kind == "env":
        if where not in os.environ:
            raise ValueError(f"environment variable {where} is not set")
        if not os.environ[where]:
            raise ValueError(f"environment variable {where} is empty")
        return Secret(os.environ[where], f"env:{where}")
    path = Path(where)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"secret file {path} is not UTF-8 text") from None
    if not text.rstrip("\r\n"):
        raise ValueError(f"secret file {path} is empty")
    return Secret(text.rstrip("\r\n"), f"file:{path}")


#: A config field holding a secret reference (the same as annotating it ``Secret``).
SecretRef = Secret


def _path_given(value: Any) -> Any:
    if isinstance(value, str) and not value:
        raise ValueError("an empty path")
    return value


def _readable_file(path: Path) -> Path:
    """``path`` if it names a regular file this process can open for reading; otherwise the
    reason, in the operating system's words (``No such file or directory``, ``Permission
    denied``, ``Is a directory``). Opened without blocking, so a FIFO cannot hang the load."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if stat.S_ISDIR(mode):
        raise ValueError(f"cannot read {path}: {os.strerror(errno.EISDIR)}")
    if not stat.S_ISREG(mode):
        raise ValueError(f"cannot read {path}: not a regular file")
    return path


#: A config field naming a file governord reads (a CA bundle, a client certificate or key):
#: it must exist and be readable when the config is loaded, so a typo stops the daemon at once
#: (exit 2, naming the file and the full key, e.g. ``registrars.foreman.ca_file``) instead of
#: failing the first host that needs it. Plugins use it for their path keys; what the file
#: holds is checked by the code that uses it.
ReadableFile = Annotated[Path, BeforeValidator(_path_given), AfterValidator(_readable_file)]


def _no_credentials(value: str) -> str:
    """``value`` if it names no user or password: credentials inside a URL would be echoed by
    every error and log line that shows the URL, and they are not secret references."""
    parts = urllib.parse.urlsplit(value)
    if "@" in parts.netloc or (not parts.netloc and "@" in value):
        # the value itself is not repeated: it holds a password
        raise ValueError("a URL with a user name or password in it (user:password@host): give the user "
                         "in the section's username key and the password as a secret reference "
                         '({ env = "NAME" } or { file = "/path" }), never inside the URL')
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError("a URL with a space or a control character in it")
    return value


#: A config field holding the URL of a service governord calls (a plugin's ``url``,
#: ``auth_url``, ``endpoint_url``...): a URL with ``user:password@`` in it is refused at load,
#: naming the key, without repeating the URL. Every URL-valued key of every plugin's config uses
#: it (tests/meta/test_conventions.py checks); the plugin's own validator then checks the scheme
#: and the shape.
ServiceURL = Annotated[str, AfterValidator(_no_credentials)]


class DaemonSection(StrictModel):
    #: where the database, the CA and the generated certificates live
    state_dir: Path = Path("/var/lib/governord")
    #: log threshold
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: entry-point plugins not to load (by entry-point name)
    disabled_plugins: list[str] = Field(default_factory=list)
    #: seconds SIGTERM waits for in-flight steps before parking them
    shutdown_grace: float = Field(default=20.0, ge=0)


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: sun_path holds 108 bytes on Linux, with the terminating NUL
_MAX_SOCKET_PATH = 107


class TLSSection(StrictModel):
    #: server certificate (PEM); empty: one issued by governord's own CA
    certificate: Path | None = None
    #: its key (PEM)
    key: Path | None = None
    #: CA that application client certificates must chain to; empty: governord's own CA
    client_ca: Path | None = None
    #: that CA's certificate revocation list(s), PEM; re-read on SIGHUP and when the file changes
    client_crl: Path | None = None
    #: what in a client certificate names the application: "cn" (its one common name),
    #: "san-dns" (its one DNS subject alternative name) or "san-uri" (its one URI one, e.g. a
    #: SPIFFE ID); matched against each application's certificate_identity. A certificate with
    #: more than one such value is refused as ambiguous.
    identity: Literal["cn", "san-dns", "san-uri"] = "cn"

    @field_validator("client_crl")
    @classmethod
    def _usable_crl(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None:
            return None
        client_ca = info.data.get("client_ca")
        if client_ca is None:
            raise ValueError("a CRL needs the site CA that signed it: set client_ca as well "
                             "(governord's own CA revokes through `governord-ctl apps revoke`)")
        try:
            load_revocation_lists(value, client_ca)
        except RevocationListError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSSection:
        if (self.certificate is None) != (self.key is None):
            missing = "key" if self.key is None else "certificate"
            raise FieldError(missing, "give both certificate and key, or neither")
        return self


def listen_address(value: str) -> str:
    """An address to listen on: an IP address or a host name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"not an IP address or host name: {value!r}") from None
    return value


def group_id(group: str) -> int:
    """The id of a group given by name or number. :raises ValueError: no such group."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"no group named {group!r} on this host") from None


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
    #: Unix socket of Puppet's autosign policy (``governord-autosign``): it decides certificate
    #: signing requests and answers nothing else. None: no such socket, nothing is autosigned
    autosign_socket: Path | None = None
    #: its permissions (octal string): whoever can open it may ask whether a CSR is signed
    autosign_socket_mode: str = "0660"
    #: the group (name or number) the socket is given when set, e.g. ``puppet``; the daemon
    #: must be allowed to give it (root, or a member). None: the group the directory gives it
    #: (the packaged layout: /run/governord-autosign is setgid puppet, see governord-autosign.tmpfiles.conf)
    autosign_socket_group: str | None = None
    #: largest request body accepted, in bytes
    max_body_bytes: int = Field(default=65536, ge=1024)
    #: seconds a client has for its TLS handshake (and a closing connection for its TLS shutdown)
    handshake_timeout: float = Field(default=10.0, gt=0, le=300)
    #: seconds a client has for its first request's head after the handshake, and for every
    #: request body after its head; a connection that misses either is closed
    request_timeout: float = Field(default=10.0, gt=0, le=300)
    #: seconds an idle connection waits for its next request (one half sent then is closed too)
    keepalive_timeout: float = Field(default=15.0, gt=0, le=3600)
    #: connections open at once; one more is closed as soon as it is accepted. With the
    #: descriptors kept for the rest it must fit under the process's descriptor limit
    #: (LimitNOFILE= in the unit)
    max_connections: int = Field(default=1024, ge=1)
    #: connections open at once from one address
    max_connections_per_peer: int = Field(default=256, ge=1)
    tls: TLSSection = Field(default_factory=TLSSection)

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        return listen_address(value)

    @field_validator("max_connections")
    @classmethod
    def _fits_the_descriptor_limit(cls, value: int) -> int:
        shortfall = descriptor_shortfall(value, descriptor_limit())
        if shortfall:
            raise ValueError(shortfall)
        return value

    @model_validator(mode="after")
    def _per_peer_within_total(self) -> ApiSection:
        if self.max_connections_per_peer > self.max_connections:
            raise FieldError("max_connections_per_peer",
                             f"{self.max_connections_per_peer} is more than max_connections "
                             f"({self.max_connections})")
        return self

    @field_validator("admin_socket", "autosign_socket")
    @classmethod
    def _socket_path(cls, value: Path | None) -> Path | None:
        if value is not None and len(os.fsencode(value)) > _MAX_SOCKET_PATH:
            raise ValueError(f"longer than a Unix socket path may be ({_MAX_SOCKET_PATH} bytes)")
        return value

    @field_validator("admin_socket_mode", "autosign_socket_mode")
    @classmethod
    def _octal(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f"not an octal mode: {value!r}") from None
        if not 0 <= mode <= 0o7777:
            raise ValueError(f"not a file mode: {value!r}")
        return value

    @field_validator("autosign_socket_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None:
            group_id(value)
        return value

    @model_validator(mode="after")
    def _two_sockets(self) -> ApiSection:
        if self.autosign_socket is not None and self.autosign_socket == self.admin_socket:
            raise FieldError("autosign_socket", "must not be the admin socket: each answers only its own")
        return self


class EngineSection(StrictModel):
    #: hosts whose steps run at once, in this instance. A step mostly waits on its peer (a clone,
    #: a boot), so this, not the instances' max_concurrency (SDK calls at once), is what bounds
    #: how many machines are made at a time: 200 slow clones take ceil(200 / workers) waves
    #: (bench/RESULTS.md, "End to end at a vCenter's pace")
    workers: int = Field(default=64, ge=1, le=1024)
    #: seconds a claimed step stays leased to this instance without renewal (renewed every third
    #: of it): another instance takes over the steps of one that died after this, plus one poll
    lease_seconds: float = Field(default=60.0, gt=1)
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


class AutoscaleRule(StrictModel):
    """Scale a role on the platform's own load ([prometheus] answers the query): a PromQL query
    that returns one number, a threshold above which hosts are added and one below which hosts
    are released, each held for a while before anything is asked. What is asked is an ordinary
    scale request, decided by the application's rules (caps, cooldown, approval, minimum, deletion
    policy, drain). A query that fails or returns no data never scales (README, "Autoscaling on
    Prometheus thresholds")."""

    #: PromQL giving one number for the role, e.g. ``avg(...)`` over the role's nodes
    query: str = Field(min_length=1)
    #: add hosts once the value has stayed above this for ``scale_up_for`` seconds
    scale_up_above: float
    #: release hosts once the value has stayed below this for ``scale_down_for`` seconds
    scale_down_below: float
    scale_up_for: float = Field(default=300.0, ge=0)
    scale_down_for: float = Field(default=900.0, ge=0)
    #: hosts added, and released, per action
    scale_up_step: int = Field(default=1, ge=1, le=1000)
    scale_down_step: int = Field(default=1, ge=1, le=1000)
    #: seconds after an action of this rule before it acts again (its hold starts anew as well)
    cooldown: float = Field(default=600.0, ge=0)
    #: seconds between evaluations
    interval: float = Field(default=30.0, ge=0.1, le=86400)
    #: only log and audit what would be asked (and what the rules would decide), ask nothing
    dry_run: bool = False

    @model_validator(mode="after")
    def _hysteresis(self) -> AutoscaleRule:
        if self.scale_down_below >= self.scale_up_above:
            raise FieldError("scale_down_below", f"must be below scale_up_above ({self.scale_up_above:g}): "
                             "between the two thresholds nothing is done, so the role cannot flap")
        if not all(math.isfinite(v) for v in (self.scale_up_above, self.scale_down_below)):
            raise FieldError("scale_up_above", "thresholds must be finite numbers")
        return self


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
    #: what a node of the role looks like in Kubernetes, for the Cluster Autoscaler's scale-up
    #: from zero ([autoscaler] node_groups; README, "Kubernetes Cluster Autoscaler")
    node_template: NodeTemplateSection | None = None
    #: scale on a Prometheus query's value ([prometheus]; README, "Autoscaling on Prometheus thresholds")
    autoscale: AutoscaleRule | None = None

    @model_validator(mode="after")
    def _one_way(self) -> RoleSection:
        if self.placements and (self.provider is not None or self.profile is not None):
            raise FieldError("placements", "give either placements or provider/profile, not both")
        if not self.placements and self.provider is None:
            raise FieldError("provider", "give placements, or provider (and profile)")
        return self

    def effective_placements(self) -> list[PlacementSection]:
        if self.placements:
            return self.placements
        return [PlacementSection(provider=self.provider or "", profile=self.profile or {})]


class WebhookRule(StrictModel):
    """What one kind of deploy-hook event asks for. The *deployed component* of an event is
    ``NAMESPACE/COMPONENT`` (``COMPONENT``: GOVERNORD_COMPONENT in the hook, else the OpenShift
    application or DeploymentConfig); the hosts an ``add`` or ``keep`` rule makes belong to it."""

    #: the event this rule answers: "deploy", "post_deploy", or "teardown" (the component is gone)
    event: Literal["deploy", "post_deploy", "teardown"] = "deploy"
    #: only for this component (GOVERNORD_COMPONENT in the hook); empty: any
    component: str | None = None
    #: the role the request is for
    role: str
    #: ask for this many more hosts, for the deployed component ...
    add: int | None = Field(default=None, ge=1, le=1000)
    #: ... or keep this many hosts of the role in all, whatever component made them ...
    count: int | None = Field(default=None, ge=0, le=10000)
    #: ... or keep this many hosts of the role for the deployed component (adding or releasing
    #: the difference; each component counted on its own); on teardown, 0 releases them
    keep: int | None = Field(default=None, ge=0, le=10000)

    @model_validator(mode="after")
    def _one_of(self) -> WebhookRule:
        given = [name for name in ("add", "count", "keep") if getattr(self, name) is not None]
        if len(given) != 1:
            raise FieldError(given[0] if given else "add",
                             f"give exactly one of add, count and keep (got {', '.join(given) or 'none'})")
        if self.event == "teardown" and self.keep != 0:
            raise FieldError("keep", "a teardown rule releases the component's hosts: give keep = 0")
        return self


class WebhookSection(StrictModel):
    #: shared secrets the deploy hooks sign with (several while one is being rotated)
    secrets: list[SecretRef] = Field(min_length=1)
    #: seconds a delivery's timestamp may be off governord's clock
    tolerance: float = Field(default=300.0, gt=0, le=3600)
    #: what an event asks for; the first rule that matches the event and component applies
    rules: list[WebhookRule] = Field(default_factory=list)

    def rule_for(self, event: str, component: str | None) -> WebhookRule | None:
        """The first rule for ``event`` whose component is ``component`` or unset."""
        return next((r for r in self.rules if r.event == event and r.component in (None, component)), None)


def _can_take_effect(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    """An ``allow_networks`` entry that holds some address callbacks may be allowed to reach: a
    network whose ends are never reached for the same reason lies inside one such range
    (169.254/16, 224/4, a metadata address ...), and no entry overrides those."""
    first, last = never_reason(network.network_address), never_reason(network.broadcast_address)
    if first is not None and first == last:
        raise ValueError(f"{network} holds only addresses callbacks never go to ({first}): "
                         "no allow_networks entry overrides that")
    return network


class CallbackRules(StrictModel):
    """Where the application's callbacks (a scale request's ``callback_url``) may go; see
    :mod:`governord.outbound` for the whole policy. Checked when a request names the URL (422)
    and on the resolved addresses at every delivery."""

    #: take http:// callback URLs (default: https only)
    allow_http: bool = False
    #: deliver to addresses that are not globally reachable: RFC 1918, fc00::/7, 100.64/10 ...
    allow_private: bool = False
    #: networks (CIDR) callbacks may reach although denied by default: loopback (the lab, a
    #: single-host site) and private ranges. Never metadata, link-local, multicast, reserved or
    #: unspecified addresses, nor governord's own listener
    allow_networks: list[Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network,
                                   AfterValidator(_can_take_effect)]] = Field(default_factory=list)


class RateLimitSection(StrictModel):
    """Scale and release requests (application API) and webhook deliveries an application may
    make, together: a token bucket per application, kept by each governord instance on its own."""

    #: sustained rate
    requests_per_second: float = Field(default=5.0, gt=0, le=100000)
    #: how many may come at once after a quiet time
    burst: int = Field(default=20, ge=1, le=100000)


class DrainSection(StrictModel):
    """``[applications.APP.drain]``: a ready host a scale-down picks is drained before it is
    retired. It enters ``draining``, the application is told (a signed ``draining`` callback to
    ``callback_url``, ``governord_host_event`` to plugins), and it waits until the application
    confirms (``POST /v1/hosts/NAME/drained`` or the OpenShift ``drained`` hook), a
    ``governord_drain_host`` plugin says it drained, or ``timeout`` passes. Without the section
    the application's hosts retire at once."""

    #: seconds a host waits in ``draining`` for a confirmation
    timeout: float = Field(default=600.0, gt=0, le=7 * 86400)
    #: what the timeout does: "proceed" retires the host anyway; "keep" puts it back to ready
    #: and drops its retirement (the application is told: ``drain-cancelled``)
    on_timeout: Literal["proceed", "keep"] = "proceed"
    #: where the signed ``draining`` (and ``drain-cancelled``) notifications go, signed with the
    #: application's webhook secret, within its ``[applications.APP.callbacks]`` rules; unset: the
    #: application is not called (plugins and the timeout still apply)
    callback_url: ServiceURL | None = Field(default=None, min_length=1, max_length=2048)


def _drain_url_refusal(url: str, rules: CallbackRules) -> str | None:
    """Why a drain callback_url can never be sent to, as a scale request's callback_url is
    judged (before any lookup), or None."""
    try:
        parsed = yarl.URL(url)
        host, port = parsed.host, parsed.port
    except (ValueError, TypeError) as exc:
        return f"not a URL: {exc}"
    if parsed.scheme not in ("http", "https") or not host or port is None or not parsed.is_absolute():
        return "must be an absolute http(s) URL with a host"
    return Policy.of("APP", rules, ()).url_refusal(url)


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
    approval: Literal["never", "always"] | Annotated[int, Field(ge=0)] = "never"
    #: seconds a request waits for approval before it expires
    approval_expiry: float = Field(default=86400.0, gt=0)
    #: which hosts a scale-down releases: "newest" or "oldest" first (named hosts: release them)
    deletion_policy: Literal["newest", "oldest"] = "newest"
    #: client certificate common name that identifies the application (default: its name)
    certificate_cn: str | None = None
    #: the value of the client certificate field api.tls.identity names that identifies the
    #: application: with "cn" its common name (default: certificate_cn, else the application's
    #: name), with "san-dns" a DNS name, with "san-uri" a URI (both required then)
    certificate_identity: str | None = None
    #: signed deploy-hook events (POST /v1/webhooks/openshift) and what they ask for
    webhook: WebhookSection | None = None
    #: where its callbacks may go
    callbacks: CallbackRules = Field(default_factory=CallbackRules)
    #: how fast it may ask for changes (scale, release, webhook deliveries); 429 beyond it
    rate_limit: RateLimitSection = Field(default_factory=RateLimitSection)
    #: drain a ready host before a scale-down retires it (unset: retire at once)
    drain: DrainSection | None = None
    roles: dict[str, RoleSection] = Field(default_factory=dict)

    @field_validator("approval", mode="before")
    @classmethod
    def _approval(cls, value: Any) -> Any:
        if value in ("never", "always") or (type(value) is int and value >= 0):
            return value
        raise ValueError(f'must be "never", "always" or a number of hosts (0 or more), not {value!r}')

    @model_validator(mode="after")
    def _bounds(self) -> ApplicationSection:
        if self.min_hosts > self.max_hosts:
            raise FieldError("min_hosts", f"min_hosts ({self.min_hosts}) is above max_hosts ({self.max_hosts})")
        for index, rule in enumerate(self.webhook.rules if self.webhook else []):
            if rule.role not in self.roles:
                raise FieldError(f"webhook.rules.{index}.role", f"no role named {rule.role!r} in this application")
        if self.drain is not None and self.drain.callback_url is not None:
            if self.webhook is None:
                raise FieldError("drain.callback_url", "the application has no webhook secret to sign drain "
                                 "notifications with ([applications.APP.webhook] secrets)")
            if (refusal := _drain_url_refusal(self.drain.callback_url, self.callbacks)) is not None:
                raise FieldError("drain.callback_url", refusal)
        return self


class SweepPolicy(StrictModel):
    """What a real sweep does about each kind of finding."""

    #: marked machines without a live record: "report", or "clean" (destroy them, verified)
    leaked: Literal["report", "clean"] = "report"
    #: ready or draining hosts whose machine is gone: "report", "fail" (failed at provision, so
    #: that `governord-ctl retry` makes a new machine; a draining host is retired instead) or
    #: "retire" (deregister everywhere, then gone)
    vanished: Literal["report", "fail", "retire"] = "report"
    #: marked registrations of gone or unknown hosts: "report", or "clean" (remove them, verified)
    orphaned: Literal["report", "clean"] = "report"


class SweepSection(StrictModel):
    """``[sweep]``: the periodic comparison of records with what exists."""

    #: seconds between periodic sweeps; 0: only when asked (`governord-ctl sweep`)
    interval: float = Field(default=3600.0, ge=0)
    #: seconds a host must have rested in its state, and have existed, before the sweep judges it
    grace: float = Field(default=900.0, ge=0)
    policy: SweepPolicy = Field(default_factory=SweepPolicy)


class RetentionSection(StrictModel):
    """``[retention]``: how long what governord records is kept (see :mod:`governord.engine.retention`)."""

    #: days a gone host's record is kept after its last change; 0: for ever
    gone_hosts_days: float = Field(default=30.0, ge=0)
    #: days a finished request (and its idempotency key and callback) is kept after its last change; 0: for ever
    requests_days: float = Field(default=30.0, ge=0)
    #: days an audit event is kept (a live host's are kept while it lives); 0: for ever
    events_days: float = Field(default=365.0, ge=0)
    #: seconds between pruning rounds (the first runs at start); 0: never prune
    interval: float = Field(default=3600.0, ge=0)
    #: rows looked at per transaction: the longest a round holds the store's writer at a time
    batch: int = Field(default=500, ge=1, le=10000)


#: the drivers a ``[store] url`` may name: SQLite (the default, one process) and PostgreSQL through
#: psycopg 3, which serves SQLAlchemy's async engine and the decisions' synchronous connections alike
STORE_SCHEMES = ("sqlite", "postgresql+psycopg")


class StoreSection(StrictModel):
    """``[store]``: where governord keeps its state (see :mod:`governord.store`)."""

    #: SQLAlchemy URL: ``sqlite:////path/governord.db`` or ``postgresql+psycopg://HOST:PORT/DB``
    #: (``postgresql://`` means the same); empty: ``governord.db`` in the state directory. No user
    #: or password in it (ServiceURL): they are the keys below
    url: ServiceURL | None = None
    #: the database user (PostgreSQL only; default: libpq's, the name of the user governord runs as)
    username: str | None = Field(default=None, min_length=1)
    #: the database password, by reference; PostgreSQL only
    password: SecretRef | None = None
    #: PostgreSQL: connections kept open for reads, and as many for the decisions and the engine's
    #: writes (and one more, for the health check)
    pool_size: int = Field(default=10, ge=1, le=500)
    #: seconds the revoked certificates are kept in memory before they are read again. The
    #: bound it sets: a certificate revoked through any instance sharing the database is refused
    #: by every instance for each request checked more than this many seconds after the
    #: revocation was committed (by the instance that revoked it, at once). 0: read on every
    #: request. Takes effect on reload.
    revocation_refresh: float = Field(default=2.0, ge=0, le=3600)

    @field_validator("url")
    @classmethod
    def _usable_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(f"not a database URL: {value!r}") from None
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        if url.drivername not in STORE_SCHEMES:
            raise ValueError(f"unsupported database {url.drivername!r}: use sqlite:///PATH or postgresql+psycopg://...")
        if url.drivername == "sqlite" and not url.database:
            raise ValueError("a SQLite URL needs a file: sqlite:////path/governord.db")
        if url.drivername != "sqlite" and (not url.host or not url.database):
            raise ValueError("a PostgreSQL URL needs a host and a database: postgresql+psycopg://HOST:PORT/DB")
        return url.render_as_string(hide_password=False)

    @model_validator(mode="after")
    def _credentials_where_used(self) -> StoreSection:
        for key in ("username", "password"):
            if getattr(self, key) is not None and (self.url is None or self.url.startswith("sqlite")):
                raise ValueError(f"{key}: SQLite has none; set url to a PostgreSQL database")
        return self

    def effective_url(self, state_dir: Path) -> str:
        """The URL the store opens (synchronous driver form), with the password resolved in."""
        if self.url is None:
            return f"sqlite:///{state_dir / 'governord.db'}"
        url = make_url(self.url)
        if self.username is not None:
            url = url.set(username=self.username)
        if self.password is not None:
            url = url.set(password=self.password.reveal())
        return url.render_as_string(hide_password=False)


def _default_instance() -> str:
    return os.environ.get("GOVERNORD_NODE_ID") or socket.gethostname()


class FleetSection(StrictModel):
    """``[fleet]``: this instance among the instances sharing one store (see :mod:`governord.fleet`).
    Nothing to set for one instance on SQLite."""

    #: this instance's name, unique in the fleet: its leases are ``NAME/<incarnation>``, and a
    #: restart under the same name takes over what the previous incarnation held at once.
    #: Default: the host name (GOVERNORD_NODE_ID overrides it)
    instance: str = Field(default_factory=_default_instance, min_length=1, max_length=128,
                          pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    #: seconds between this instance's heartbeats (``governord-ctl status`` shows the last one)
    heartbeat: float = Field(default=5.0, gt=0, le=300)
    #: seconds the leader's lease lasts without renewal (it renews every third of it): the
    #: fleet-wide jobs (sweep, callbacks, approval expiry, retention, the fleet's metrics) move to
    #: another instance at most this long, plus one heartbeat, after the leader dies
    leader_lease: float = Field(default=30.0, ge=1, le=3600)

    @model_validator(mode="after")
    def _beats_within_lease(self) -> FleetSection:
        if self.heartbeat > self.leader_lease / 3:
            raise FieldError("heartbeat", f"must be at most a third of leader_lease ({self.leader_lease / 3:g}s): "
                             "the leader renews its lease at each heartbeat")
        return self


_NODE_GROUP = re.compile(r"([^/\s]+)/([^/\s]+)")


class AutoscalerSection(StrictModel):
    """The Kubernetes Cluster Autoscaler's ``externalgrpc`` cloud provider (gRPC, mutual TLS with
    the server certificate and client CA of [api.tls]): which application roles it may scale.
    Absent: no such listener."""

    #: address of the gRPC listener
    listen: str = "0.0.0.0"
    #: its port; 0 picks a free one (written to STATE_DIR/autoscaler.port)
    port: int = Field(default=8086, ge=0, le=65535)
    #: the node groups, each an application's role as ``APP/ROLE``; a client certificate
    #: identifying APP (as on the HTTPS API) sees and scales only its application's groups
    node_groups: list[str] = Field(min_length=1)
    #: the node label the autoscaler reads as "this node has a GPU" (GPULabel)
    gpu_label: str = "nvidia.com/gpu"
    #: GPU types the sites' machines can have (GetAvailableGPUTypes); empty: none
    gpu_types: list[str] = Field(default_factory=list)
    #: calls a client may have in flight at once (further ones wait)
    max_concurrent_calls: int = Field(default=64, ge=1, le=10000)

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        return listen_address(value)

    @field_validator("node_groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        for index, group in enumerate(value):
            if not _NODE_GROUP.fullmatch(group):
                raise FieldError(str(index), f"not APP/ROLE: {group!r}")
            if value.index(group) != index:
                raise FieldError(str(index), f"{group!r} is listed twice")
        return value

    def groups(self) -> list[tuple[str, str]]:
        """The node groups as (application, role)."""
        return [tuple(g.split("/", 1)) for g in self.node_groups]  # type: ignore[misc]


class PrometheusSection(StrictModel):
    """The Prometheus server the roles' ``autoscale`` queries ask (its HTTP API, ``/api/v1/query``)."""

    #: its base URL, e.g. https://prometheus.example.com:9090 (a path prefix is kept)
    url: ServiceURL
    #: CA bundle to verify an https server with (default: the system's)
    ca_file: ReadableFile | None = None
    #: sent as ``Authorization: Bearer ...`` (a secret reference)
    bearer_token: SecretRef | None = None
    #: seconds a query may take
    timeout: float = Field(default=10.0, gt=0, le=300)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL with a host: {value!r}")
        return value


class DrainCommand(StrictModel):
    """``[drain.command]``: the built-in ``governord_drain_host`` plugin. A command run for each
    draining host (when it starts draining, then every ``[engine] ready_poll_interval``) with the
    host in its environment (``GOVERNORD_HOST``, ``GOVERNORD_FQDN``, ``GOVERNORD_HOST_ID``,
    ``GOVERNORD_APP``, ``GOVERNORD_ROLE``): exit 0 says the host is drained, any other exit (or
    running past ``timeout``) not yet. E.g. a script running ``oc adm drain "$GOVERNORD_FQDN"``."""

    #: the program (an absolute path) and its arguments; no shell runs it
    argv: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    #: seconds one run may take; it is killed after that and counts as "not yet"
    timeout: float = Field(default=300.0, gt=0, le=3600)
    #: only these applications' hosts (default: every application with a drain section)
    applications: list[str] | None = None

    @field_validator("argv")
    @classmethod
    def _program(cls, value: list[str]) -> list[str]:
        program = Path(value[0])
        if not program.is_absolute():
            raise ValueError(f"the program must be an absolute path, not {value[0]!r}")
        if not program.is_file() or not os.access(program, os.X_OK):
            raise ValueError(f"{value[0]} is not an executable file")
        return value


class DrainHooksSection(StrictModel):
    """``[drain]``: the built-in ways of telling that a host drained (see DrainCommand)."""

    command: DrainCommand | None = None


class HealthSection(StrictModel):
    """``[health]``: this instance's checks of its peers (every provider and registrar instance),
    which `governord-ctl status`, ``/readyz`` and ``governord_peer_up`` show."""

    #: seconds between two rounds of probes (one cheap authenticated call per instance)
    interval: float = Field(default=30.0, gt=0, le=3600)
    #: seconds one probe may take before its peer counts as down
    timeout: float = Field(default=10.0, gt=0, le=300)
    #: ask the registrars whether what the tags name exists there (hostgroups, Puppet classes,
    #: system groups, activation keys) at start (a warning) and before a reload (refused if not)
    check_mappings: bool = True


class CoreConfig(StrictModel):
    daemon: DaemonSection = Field(default_factory=DaemonSection)
    api: ApiSection = Field(default_factory=ApiSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    sweep: SweepSection = Field(default_factory=SweepSection)
    retention: RetentionSection = Field(default_factory=RetentionSection)
    store: StoreSection = Field(default_factory=StoreSection)
    fleet: FleetSection = Field(default_factory=FleetSection)
    autoscaler: AutoscalerSection | None = None
    prometheus: PrometheusSection | None = None
    drain: DrainHooksSection = Field(default_factory=DrainHooksSection)
    health: HealthSection = Field(default_factory=HealthSection)
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
    def sweep(self) -> SweepSection:
        return self.core.sweep

    @property
    def retention(self) -> RetentionSection:
        return self.core.retention

    @property
    def fleet(self) -> FleetSection:
        return self.core.fleet

    @property
    def networks(self) -> dict[str, NetworkSection]:
        return self.core.networks

    def tag_order(self) -> list[str]:
        """Tags in the order the config declares them: earlier tags win where one value is chosen."""
        return list(self.tags)


_UNION_MEMBER = re.compile(r"function-.*|constrained-[a-z]+|[a-z-]+\[.*\]")


def _config_error(path: str, prefix: str, err: Any) -> ConfigError:
    """One of pydantic's errors as a ConfigError naming the key."""
    # pydantic names the member of a union it tried ("literal['a','b']", "constrained-int",
    # "function-after[...]"); those are no keys of the file
    loc = [str(part) for part in err["loc"] if not _UNION_MEMBER.fullmatch(str(part))]
    cause = err.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):  # a rule over several keys names the one to fix
        loc.append(cause.field)
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


def _all_errors(path: str, prefix: str, exc: ValidationError) -> ConfigError:
    """Every key pydantic refused (the first refusal of each: a union tries each of its members)."""
    found: dict[str, ConfigError] = {}
    for err in exc.errors():
        error = _config_error(path, prefix, err)
        found.setdefault(error.key, error)
    errors = list(found.values())
    return errors[0] if len(errors) == 1 else ConfigErrors(errors)


def _validate(model: type[BaseModel], data: Any, path: str, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _all_errors(path, prefix, exc) from None


class _Problems:
    """The errors of one reading of the config, collected so that all are reported at once."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    @contextlib.contextmanager
    def checking(self) -> Iterator[None]:
        """Run a check; its ConfigError is noted, and the reading goes on."""
        try:
            yield
        except ConfigError as exc:
            self.errors += ConfigErrors.each(exc)

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = str(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except OSError as exc:  # a directory, a device that cannot be read, ...
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None


def load_config(
    path: str | os.PathLike[str],
    providers: ProviderRegistry,
    registrars: RegistrarRegistry,
    *,
    unavailable: dict[str, str] | None = None,
    resolve_secrets: bool = True,
) -> Config:
    """Read and validate the config at ``path``.

    :param unavailable: provider or registrar type -> why its plugin did not load; a section
        using such a type is reported with that reason.
    :param resolve_secrets: False: secret references are checked for their shape only (nothing
        is read: the config is for checking, not for running).
    :raises ConfigError: naming the file and the key (ConfigErrors: every error found).
    """
    path = str(path)
    raw = read_toml(path)
    token = RESOLVE_SECRETS.set(resolve_secrets)
    try:
        return build_config(path, raw, providers, registrars, unavailable=unavailable or {})
    finally:
        RESOLVE_SECRETS.reset(token)


def load_store_section(path: str | os.PathLike[str]) -> tuple[Path, StoreSection]:
    """The state directory and the ``[store]`` section of the config at ``path``, validated as
    the daemon validates them, and nothing else of the file: no plugin is loaded and no other
    section's secret is read (the operator's shell need not have the daemon's environment). For
    commands that work on the store without the daemon (``governord-ctl store move``).

    :raises ConfigError: naming the file and the key.
    """
    path = str(path)
    raw = read_toml(path)
    daemon: DaemonSection = _validate(DaemonSection, raw.get("daemon", {}), path, "daemon")
    store: StoreSection = _validate(StoreSection, raw.get("store", {}), path, "store")
    return daemon.state_dir, store


def _type_of(path: str, prefix: str, section: dict[str, Any], known: list[str], unavailable: dict[str, str]) -> str:
    kind = section.get("type")
    if not isinstance(kind, str):
        raise ConfigError(path, f"{prefix}.type", "required key is missing" if kind is None else "must be a string")
    if kind in unavailable:
        raise ConfigError(path, f"{prefix}.type", f"type {kind!r} is unavailable: {unavailable[kind]}")
    if kind not in known:
        raise ConfigError(path, f"{prefix}.type", f"unknown type {kind!r} (known: {', '.join(known) or 'none'})")
    return kind


def _load_type(path: str, prefix: str, kind: str, load: Callable[[str], Any]) -> None:
    """Import the class of a type the config uses, now: a type registered lazily has not
    imported its SDK yet, and an SDK that fails to import must stop the daemon here, naming
    the section, before anything is written (not when the instances are built)."""
    try:
        load(kind)
    except Exception as exc:  # noqa: BLE001 - ImportError, or an SDK's own failure at import
        raise ConfigError(path, f"{prefix}.type", f"type {kind!r} is unavailable: {type(exc).__name__}: {exc}") from None


def build_config(
    path: str,
    raw: dict[str, Any],
    providers: ProviderRegistry,
    registrars: RegistrarRegistry,
    *,
    unavailable: dict[str, str],
) -> Config:
    """Validate the whole config; every error found is reported at once (ConfigErrors), each
    naming its key. A section that is wrong is left out of the checks that would only repeat it
    (a role on a provider whose section is wrong is not also told that the provider is missing)."""
    problems = _Problems()
    core: CoreConfig | None = None
    with problems.checking():
        core = _validate(CoreConfig, raw, path, "")
    if core is not None:
        for check in (_check_places, _check_identities, _check_node_groups, _check_autoscale, _check_drain_command):
            with problems.checking():
                check(path, core)
    sections: dict[str, dict[str, Any]] = {}
    for kind in ("providers", "registrars"):
        found = raw.get(kind)
        sections[kind] = found if isinstance(found, dict) else {}

    provider_configs: dict[str, ProviderConfig] = _plugin_sections(
        path, "providers", sections["providers"], providers, unavailable, problems)
    registrar_configs: dict[str, RegistrarConfig] = _plugin_sections(
        path, "registrars", sections["registrars"], registrars, unavailable, problems)
    if core is None:  # the rest reads the validated sections
        problems.raise_any()
    assert core is not None
    mappings = {name: registrars.get(c.type).TagMapping for name, c in registrar_configs.items()}  # type: ignore[union-attr]
    for name, registrar_config in registrar_configs.items():
        try:
            registrar_config.check_peers(registrar_configs, mappings)
        except FieldError as exc:
            problems.errors.append(ConfigError(path, f"registrars.{name}.{exc.field}", str(exc)))

    tags: dict[str, TagDefinition] = {}
    for tag, table in core.tags.items():
        description = ""
        tag_mappings: dict[str, TagMapping] = {}
        for key, value in table.items():
            prefix = f"tags.{tag}.{key}"
            with problems.checking():
                if key == "description":
                    if not isinstance(value, str):
                        raise ConfigError(path, prefix, "must be a string")
                    description = value
                elif key in registrar_configs:
                    registrar_type = registrars.get(registrar_configs[key].type)
                    tag_mappings[key] = _validate(registrar_type.TagMapping, value, path, prefix)  # type: ignore[union-attr]
                elif key not in sections["registrars"]:  # (one whose section is wrong is reported there)
                    raise ConfigError(path, prefix, "unknown key (not a registrar: "
                                      f"{', '.join(registrar_configs) or 'none configured'})")
        tags[tag] = TagDefinition(tag, description, tag_mappings)

    for name, network in core.networks.items():
        for attr in ("first", "last", "gateway"):
            address = getattr(network, attr)
            if address is not None and address not in network.cidr:
                problems.errors.append(ConfigError(path, f"networks.{name}.{attr}", f"{address} is not in {network.cidr}"))
        if network.first is not None and network.last is not None and network.last < network.first:
            problems.errors.append(ConfigError(path, f"networks.{name}.last",
                                               f"{network.last} is before first ({network.first})"))

    placements: dict[tuple[str, str], list[Placement]] = {}
    #: the first host names a role makes -> the role, so two roles cannot make the same names
    named: dict[tuple[str, str], str] = {}
    for app_name, app in core.applications.items():
        for role_name, role in app.roles.items():
            prefix = f"applications.{app_name}.roles.{role_name}"
            with problems.checking():
                placements[(app_name, role_name)] = _role_placements(
                    path, prefix, role, app_name, role_name, core, tags, named, provider_configs,
                    set(sections["providers"]), providers)

    problems.raise_any()
    return Config(path, core, provider_configs, registrar_configs, tags, placements)


def _plugin_sections(path: str, kind: str, sections: dict[str, Any], registry: Any, unavailable: dict[str, str],
                     problems: _Problems) -> dict[str, Any]:
    """The ``[providers.NAME]`` or ``[registrars.NAME]`` sections, each validated by its type's
    own model (its type imported now); a wrong one is noted in ``problems`` and left out."""
    configs: dict[str, Any] = {}
    for name, section in sections.items():
        prefix = f"{kind}.{name}"
        with problems.checking():
            if not isinstance(section, dict):
                raise ConfigError(path, prefix, "must be a table")
            type_name = _type_of(path, prefix, section, registry.names(), unavailable)
            _load_type(path, prefix, type_name, registry.load)
            configs[name] = _validate(registry.get(type_name).Config, section, path, prefix)
    return configs


def _role_placements(path: str, prefix: str, role: RoleSection, app_name: str, role_name: str, core: CoreConfig,
                     tags: dict[str, TagDefinition], named: dict[tuple[str, str], str],
                     provider_configs: dict[str, ProviderConfig], provider_sections: set[str],
                     providers: ProviderRegistry) -> list[Placement]:
    """A role's placements, its references checked (the first wrong one is the role's error)."""
    if role.network is not None and role.network not in core.networks:
        raise ConfigError(path, f"{prefix}.network", f"no network named {role.network!r}")
    for tag in role.tags:
        if tag not in tags:
            raise ConfigError(path, f"{prefix}.tags", f"no tag named {tag!r}")
    samples = _names(path, f"{prefix}.name_pattern", role.name_pattern, app_name, role_name)
    if samples in named:
        raise ConfigError(path, f"{prefix}.name_pattern",
                          f"makes the same host names as {named[samples]}.name_pattern ({samples[0]}, ...)")
    named[samples] = prefix
    chosen: list[Placement] = []
    for index, placement in enumerate(role.effective_placements()):
        where = f"{prefix}.placements.{index}" if role.placements else prefix
        if placement.provider not in provider_configs:
            if placement.provider in provider_sections:
                continue  # its section is wrong, and reported there
            known = ", ".join(sorted(provider_sections)) or "none: add a [providers.NAME] section"
            raise ConfigError(path, f"{where}.provider", f"no provider named {placement.provider!r} (known: {known})")
        if any(p.provider == placement.provider for p in chosen):
            raise ConfigError(path, f"{where}.provider", f"provider {placement.provider!r} is listed twice")
        network_name = placement.network or role.network
        if network_name is not None and network_name not in core.networks:
            raise ConfigError(path, f"{where}.network", f"no network named {network_name!r}")
        provider_type = providers.get(provider_configs[placement.provider].type)
        profile = _validate(provider_type.Profile, placement.profile, path, f"{where}.profile")  # type: ignore[union-attr]
        chosen.append(Placement(placement.provider, placement.cap, network_name, profile))
    return chosen


def _names(path: str, key: str, pattern: str, app: str, role: str) -> tuple[str, str]:
    """The first two host names ``pattern`` makes; each must be a DNS label."""
    try:
        samples = (pattern.format(app=app, role=role, seq=1), pattern.format(app=app, role=role, seq=2))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(path, key, f"invalid pattern: {type(exc).__name__}: {exc}") from None
    for sample in samples:
        if not _DNS_LABEL.fullmatch(sample):
            raise ConfigError(path, key, f"makes host names like {sample!r}, which is no DNS label "
                              "(letters, digits and hyphens, at most 63)")
    if samples[0] == samples[1]:
        raise ConfigError(path, key, f"makes the same name ({samples[0]!r}) for every host: use {{seq}}")
    return samples


def _check_places(path: str, core: CoreConfig) -> None:
    """Files and directories the daemon will use must be usable, found now and not after the
    state directory has been written to."""
    state_dir = core.daemon.state_dir
    try:
        not_a_directory = state_dir.exists() and not state_dir.is_dir()
    except OSError:  # cannot even look: the daemon says so when it creates it
        not_a_directory = False
    if not_a_directory:
        raise ConfigError(path, "daemon.state_dir", f"{state_dir} exists and is not a directory")
    tls = core.api.tls
    for name in ("certificate", "key", "client_ca"):
        file = getattr(tls, name)
        if file is None:
            continue
        try:
            with open(file, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(path, f"api.tls.{name}", f"cannot read {file}: {exc.strerror}") from None
    try:
        if tls.certificate is not None and tls.key is not None:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.certificate, tls.key)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(path, "api.tls.certificate", f"not a certificate and key that go together: {exc}") from None
    try:
        if tls.client_ca is not None:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.client_ca))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(path, "api.tls.client_ca", f"not a PEM CA certificate: {exc}") from None


def _check_node_groups(path: str, core: CoreConfig) -> None:
    """Each of [autoscaler] node_groups is a configured application's configured role."""
    if core.autoscaler is None:
        return
    for index, (app, role) in enumerate(core.autoscaler.groups()):
        key = f"autoscaler.node_groups.{index}"
        if app not in core.applications:
            raise ConfigError(path, key, f"no application named {app!r}")
        if role not in core.applications[app].roles:
            raise ConfigError(path, key, f"application {app!r} has no role {role!r}")


def _check_autoscale(path: str, core: CoreConfig) -> None:
    """A role that scales on a query needs the Prometheus server to ask."""
    if core.prometheus is not None:
        return
    for app_name, app in core.applications.items():
        for role_name, role in app.roles.items():
            if role.autoscale is not None:
                raise ConfigError(path, f"applications.{app_name}.roles.{role_name}.autoscale",
                                  "needs a [prometheus] section (url) to ask its query")


def _check_drain_command(path: str, core: CoreConfig) -> None:
    """[drain.command] applications: configured applications, each with a drain section (only
    their hosts are ever drained)."""
    command = core.drain.command
    for index, app in enumerate(command.applications or []) if command is not None else ():
        key = f"drain.command.applications.{index}"
        if app not in core.applications:
            raise ConfigError(path, key, f"no application named {app!r} (configured: "
                              f"{', '.join(sorted(core.applications)) or 'none'})")
        if core.applications[app].drain is None:
            raise ConfigError(path, key, f"application {app!r} has no [applications.{app}.drain] section: "
                              "its hosts are never drained")


def identity_of(name: str, app: ApplicationSection, mode: str) -> str | None:
    """The value that identifies application ``name`` in its client certificate's ``mode`` field
    (``api.tls.identity``): compared as it is for a CN or URI, in lower case for a DNS name."""
    if mode == "cn":
        return app.certificate_identity or app.certificate_cn or name
    if app.certificate_identity is None:
        return None
    return app.certificate_identity.lower() if mode == "san-dns" else app.certificate_identity


def _check_identities(path: str, core: CoreConfig) -> None:
    """A client certificate's identity (its CN, or a SAN as api.tls.identity says) identifies
    one application, never two, and is of the field's form."""
    mode = core.api.tls.identity
    owner: dict[str, str] = {}
    for name, app in core.applications.items():
        key = f"applications.{name}.certificate_identity"
        value = identity_of(name, app, mode)
        if mode == "cn" and app.certificate_identity and app.certificate_cn \
                and app.certificate_identity != app.certificate_cn:
            raise ConfigError(path, key, "with api.tls.identity = \"cn\" it is the common name: give "
                              "certificate_cn or certificate_identity, not two different ones")
        if value is None:
            raise ConfigError(path, key, f"required with api.tls.identity = {mode!r}: the "
                              f"{'DNS name' if mode == 'san-dns' else 'URI'} in the application's certificate")
        if mode == "san-dns" and not _HOSTNAME.fullmatch(value):
            raise ConfigError(path, key, f"not a DNS name: {value!r}")
        if mode == "san-uri":
            parts = urllib.parse.urlsplit(value)
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", parts.scheme) or any(c.isspace() for c in value) \
                    or not (parts.netloc or parts.path):
                raise ConfigError(path, key, f"not a URI like spiffe://example.org/ns/shop: {value!r}")
        if value in owner:
            where = key if app.certificate_identity or mode != "cn" else f"applications.{name}.certificate_cn"
            raise ConfigError(path, where, f"{value!r} already identifies application {owner[value]}")
        owner[value] = name


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
