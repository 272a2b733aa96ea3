"""Request and response bodies of both APIs. Requests are validated with these models (an
unknown or wrong field is a 422 naming it); the OpenAPI documents are generated from them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from ..errors import FieldError

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
#: an http(s) URL the notifier can POST to: a host name or IPv4 address, an optional port
#: (1-65535) and printable ASCII after it. Kept to ASCII, where JSON Schema's and pydantic's
#: regular expressions agree, and strict, so a URL no client can send to is refused up front.
#: stored text a client chooses: no control characters (PostgreSQL, which the store is written
#: for, refuses NUL in text and JSON); a comment may have tabs and line breaks
KEY_TEXT = r"^[^\x00-\x1f\x7f]+$"
COMMENT_TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+$"
CALLBACK_URL = rf"^https?://{_LABEL}(\.{_LABEL})*(:{_PORT})?([/?#][!-~]*)?$"


def _exactly_one(types: dict[str, str]) -> dict[str, Any]:
    """JSON Schema for "exactly one of these optional fields is given (not null)", so the
    OpenAPI document says what the model's validator enforces."""
    return {"oneOf": [{"required": [name], "properties": {name: {"type": kind}}} for name, kind in types.items()]}


def _next_cursor() -> Any:
    """A paged list's ``next_cursor`` (see governord.api.paging): always sent, null on the last page."""
    return Field(description="where the next page starts (pass it as cursor); null on the last page")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScaleRequest(Body):
    """Ask for more hosts of a role (``add``), or for a total (``count``)."""

    model_config = ConfigDict(json_schema_extra=_exactly_one({"add": "integer", "count": "integer"}))

    role: str = Field(pattern=NAME)
    add: int | None = Field(default=None, ge=1, le=1000)
    count: int | None = Field(default=None, ge=0, le=10000)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255, pattern=KEY_TEXT)
    #: where the outcome is POSTed, signed with the application's webhook secret, when the
    #: request is done
    callback_url: str | None = Field(default=None, max_length=2048, pattern=CALLBACK_URL)

    @model_validator(mode="after")
    def _one_of(self) -> ScaleRequest:
        if (self.add is None) == (self.count is None):
            raise FieldError("add", "give exactly one of add and count")
        return self


class ReleaseRequest(Body):
    """Hand hosts back: the named ones, or ``count`` of them (of ``role``), newest first."""

    model_config = ConfigDict(json_schema_extra=_exactly_one({"hosts": "array", "count": "integer"}))

    hosts: list[Annotated[str, Field(min_length=1, max_length=255, pattern=KEY_TEXT)]] | None = Field(
        default=None, min_length=1, max_length=1000)
    role: str | None = Field(default=None, pattern=NAME)
    count: int | None = Field(default=None, ge=1, le=1000)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255, pattern=KEY_TEXT)

    @model_validator(mode="after")
    def _one_of(self) -> ReleaseRequest:
        if (self.hosts is None) == (self.count is None):
            raise FieldError("hosts", "give exactly one of hosts and count")
        return self


class TagRequest(Body):
    """Add or remove tags. A host governord does not know is adopted only with ``adopt`` (its
    fully qualified name in the path, its ``address`` here); otherwise it is a 404."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": [name], "properties": {name: {"minItems": 1}}} for name in ("add", "remove")]})

    add: list[str] = Field(default_factory=list, max_length=64)
    remove: list[str] = Field(default_factory=list, max_length=64)
    address: str | None = None
    #: adopt the host if governord does not know it (registered, never destroyed)
    adopt: bool = False

    @model_validator(mode="after")
    def _something(self) -> TagRequest:
        if not self.add and not self.remove:
            raise FieldError("add", "give tags to add or to remove")
        return self


class Host(BaseModel):
    id: str
    name: str
    fqdn: str
    app: str | None
    role: str | None
    component: str | None = Field(None, description="the deployed component (NAMESPACE/NAME) whose webhook "
                                  "rule made the host, if one did")
    origin: str
    state: str
    failed_step: str | None
    error: str | None
    provider: str | None
    machine_id: str | None
    tags: list[str]
    addresses: list[str]
    classification: dict[str, Any]
    registrations: dict[str, Any]
    retire_requested: bool
    created_at: float
    updated_at: float


class HostList(BaseModel):
    hosts: list[Host]
    next_cursor: str | None = _next_cursor()


class Request(BaseModel):
    id: str
    app: str | None
    kind: str
    params: dict[str, Any]
    reason: str | None
    actor: str
    idempotency_key: str | None
    created_at: float
    decision: str = Field(description="accepted or declined")
    status: str = Field(description="in-progress, completed, failed or declined")
    hosts: list[Host]


class RequestList(BaseModel):
    requests: list[Request]
    next_cursor: str | None = _next_cursor()


class Event(BaseModel):
    id: int
    ts: float
    host_id: str | None
    #: the FQDN of the event's host (None: an event of no one host)
    host: str | None = None
    request_id: str | None
    kind: str
    #: who: an application, ``operator:USER`` (the Unix user on the admin socket), governord, ...
    actor: str | None
    detail: dict[str, Any]


class EventList(BaseModel):
    events: list[Event]
    next_cursor: str | None = _next_cursor()


class Error(BaseModel):
    error: str
    field: str | None = None


class Health(BaseModel):
    """Whether this instance can serve: ``ok``, or ``unhealthy`` (HTTP 503) while its store
    cannot be reached."""

    status: Literal["ok", "unhealthy"]
    #: ``ok``, or why the store cannot be reached
    store: str


class Peer(BaseModel):
    """A provider or registrar instance as this instance's last probe found it."""

    kind: Literal["provider", "registrar"]
    name: str
    type: str
    #: unknown (not probed yet), up, down (failed or timed out) or unchecked (nobody can ask it)
    state: Literal["unknown", "up", "down", "unchecked"]
    #: why it is down
    error: str | None = None
    #: when the last probe ended, and since when the peer has been in this state (Unix time)
    checked_at: float | None = None
    since: float | None = None
    #: how long the last probe took
    seconds: float | None = None


class Readiness(BaseModel):
    """Whether this instance can do its work: ``ready``, or ``not ready`` (HTTP 503) while its store
    cannot be reached, a provider or registrar instance is down, or its peers have not all been
    probed since the start or the last reload."""

    status: Literal["ready", "not ready"]
    #: ``ok``, or why the store cannot be reached
    store: str
    #: why it is not ready (empty: ready)
    reasons: list[str]
    #: each peer (the operators' socket only)
    peers: list[Peer] | None = None


class Instance(BaseModel):
    """One instance of the fleet sharing the store."""

    name: str
    #: its running incarnation (the owner of its host leases)
    owner: str
    hostname: str
    pid: int
    version: str
    started_at: float
    heartbeat_at: float
    #: seconds since its last heartbeat
    heartbeat_age: float
    stopped_at: float | None
    #: up; lost (no heartbeat for three heartbeats); stopped (cleanly)
    status: Literal["up", "lost", "stopped"]
    leader: bool
    #: host steps it was running at its last heartbeat
    in_flight: int
    #: the instance that answered
    this: bool


class Status(BaseModel):
    node: str
    #: the instance that answered holds the fleet's leader lease (it runs the periodic jobs)
    leader: bool
    instances: list[Instance]
    in_flight: int
    providers: dict[str, str]
    registrars: dict[str, str]
    applications: list[str]
    tags: list[str]
    config: str
    #: the last reload of the config (SIGHUP, systemctl reload): when, and why it was refused (None: taken)
    last_reload: dict[str, Any] | None = None
    #: each provider and registrar instance as this instance's last probe found it
    peers: list[Peer] = []
    #: why this instance is not ready as far as its peers go (empty: ready; /readyz says more)
    not_ready: list[str] = []
    #: the last check of the tags' mappings at the registrars (at start, and after each reload
    #: taken): what is missing there
    #: ("key: why"), and the registrars that could not be asked
    mappings: dict[str, Any] | None = None
    hosts: dict[str, int]
    version: str


class Reloaded(BaseModel):
    config: str


class CA(BaseModel):
    """governord's CA certificate (public): what issues the applications' client certificates,
    and the API's server certificate unless ``api.tls.certificate`` is the site's own."""

    ca_pem: str
    subject: str
    #: when it expires (Unix time)
    not_after: float
    #: whether it also issued the application API's server certificate (False: the site's is used)
    signs_server_certificate: bool


class AutoscaleRule(BaseModel):
    """A role's autoscale rule and its last evaluation, as the answering instance saw it."""

    app: str
    role: str
    query: str
    scale_up_above: float
    scale_down_below: float
    dry_run: bool
    #: the answering instance evaluates the rules (it leads the fleet)
    evaluating: bool
    value: float | None
    #: above, below, within, holding, cooldown, acted, dry_run, no_data, error (None: not evaluated yet)
    outcome: str | None
    error: str | None
    evaluated_at: float | None
    above_since: float | None
    below_since: float | None
    last_action: float | None


class AutoscaleStatus(BaseModel):
    rules: list[AutoscaleRule]


class Plugin(BaseModel):
    name: str
    distribution: str | None
    version: str | None
    loaded: bool
    error: str | None
    hooks: list[str]


class PluginList(BaseModel):
    plugins: list[Plugin]
    next_cursor: str | None = _next_cursor()


class Certificate(BaseModel):
    """A client certificate just issued, with its private key: the only copy of the key (governord
    keeps none), for governord-ctl to write to a file the operator hands to the application."""

    app: str
    common_name: str
    certificate_pem: str
    key_pem: str
    ca_pem: str
    serial: str
    issuer: str
    revoked: list[str] = Field(default_factory=list, description="serials revoked by a rotation")


class IssuedCertificate(BaseModel):
    serial: str
    issuer: str
    common_name: str
    issued_at: float
    not_after: float
    revoked_at: float | None
    revoked_by: str | None


class SiteRevocation(BaseModel):
    """A certificate of a site CA (api.tls.client_ca) revoked by `apps revoke --serial`."""

    serial: str
    issuer: str
    revoked_at: float
    revoked_by: str


class Application(BaseModel):
    name: str
    description: str
    common_name: str
    max_hosts: int
    min_hosts: int
    approval: str | int
    roles: list[str]
    hosts: int
    certificates: list[IssuedCertificate]
    site_revocations: list[SiteRevocation] = Field(default_factory=list)


class ApplicationList(BaseModel):
    applications: list[Application]
    next_cursor: str | None = _next_cursor()


class RevokeRequest(Body):
    """Revoke one certificate (by serial) or, without one, every certificate governord issued
    the application. A serial that is none of governord's names a site CA's certificate (with
    ``api.tls.client_ca``): of ``issuer`` (RFC 4514, e.g. ``CN=Site CA,O=Example``), which may be
    left out when client_ca holds one CA."""

    serial: str | None = Field(default=None, pattern=r"^(0x)?[0-9A-Fa-f]{1,40}$|^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){0,19}$",
                               description="hex, as governord and `openssl x509 -serial` print it (colons allowed)")
    issuer: str | None = Field(default=None, min_length=1, max_length=1024, pattern=KEY_TEXT)

    @model_validator(mode="after")
    def _normalise(self) -> RevokeRequest:
        if self.serial is not None:
            digits = self.serial.lower().removeprefix("0x").replace(":", "").lstrip("0") or "0"
            object.__setattr__(self, "serial", digits)
        if self.issuer is not None and self.serial is None:
            raise FieldError("issuer", "an issuer goes with a serial")
        return self


class Revoked(BaseModel):
    app: str
    revoked: list[str]
    #: the issuer of the certificate revoked by serial
    issuer: str | None = None


class AutosignRequest(Body):
    """What Puppet's autosign policy hands over: the certificate name and the CSR (PEM)."""

    certname: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
    csr: str = Field(min_length=64, max_length=65536)


class AutosignDecision(BaseModel):
    sign: bool
    reason: str
    host: str | None = None


class PlanRequest(Body):
    """A scale request to plan, not to make."""

    model_config = ConfigDict(json_schema_extra=_exactly_one({"add": "integer", "count": "integer"}))

    role: str = Field(pattern=NAME)
    add: int | None = Field(default=None, ge=1, le=1000)
    count: int | None = Field(default=None, ge=0, le=10000)

    @model_validator(mode="after")
    def _one_of(self) -> PlanRequest:
        if (self.add is None) == (self.count is None):
            raise FieldError("add", "give exactly one of add and count")
        return self


class PlannedHost(BaseModel):
    name: str
    fqdn: str
    provider: str
    network: str | None
    profile: dict[str, Any]
    tags: list[str]
    classification: dict[str, Any]
    registrars: list[str]


class PlanReply(BaseModel):
    app: str
    role: str
    decision: str = Field(description="accepted, declined or pending")
    rule: str = Field(description="the rule that decided")
    reason: str | None
    hosts: list[PlannedHost]
    release: list[str]


class DecisionRequest(Body):
    """An operator's approval or denial of a pending request."""

    comment: str = Field(min_length=1, max_length=2000, pattern=COMMENT_TEXT)


class WebhookReply(BaseModel):
    delivery: str
    decision: str = Field(description="accepted, declined, pending or ignored; for a drained event: drained, "
                          "repeated (confirmed before) or refused (the host is not draining)")
    reason: str | None
    message: str = Field(description="the outcome in one line, for a person reading the hook's log: the "
                         "decision, the request's id and the reason (for one held for approval, the "
                         "governord-ctl command that decides it)")
    request: Request | None


class SweepRequest(Body):
    """Compare governord's records with what exists now; ``dry_run`` lists and changes nothing."""

    dry_run: StrictBool = False


class SweepFinding(BaseModel):
    kind: str = Field(description="leaked, vanished or orphaned")
    where: str = Field(description="the provider or registrar instance")
    host_id: str = Field(description="the governord host id (from the ownership marker or the host's record)")
    name: str
    ident: str = Field(description="the machine id, or the system's own id of the entry")
    record: str = Field(description="the host's state in governord's records, or none")
    reason: str
    action: str = Field(description="what was done (or, in a dry run, would be)")


class SweepError(BaseModel):
    where: str
    error: str


class SweepReport(BaseModel):
    dry_run: bool
    started_at: float
    finished_at: float
    policy: dict[str, str] = Field(description="what the real run does per kind ([sweep.policy])")
    findings: list[SweepFinding]
    errors: list[SweepError] = Field(description="listings that failed (nothing in them was judged absent) "
                                                 "and actions that failed")
    checked: dict[str, dict[str, int]] = Field(description="marked machines per provider, entries per registrar")
