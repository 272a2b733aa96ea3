"""The Foreman registrar: hosts, hostgroups, Puppet classes and parameters through apypie.

A host governord registers carries its ownership marker as a line of the host's comment
(``governord:host-id=<uuid>``); the sweep finds every such host with Foreman's own search
(``comment ~ "governord:host-id="``) and removes one by its id, only while it carries that marker.

Every apypie call is synchronous and runs in a thread through :meth:`Registrar.call_sync`; each
network round trip is one such call, so a slow Foreman holds a thread for one request at most
``call_timeout`` seconds per try. A safe request (GET, HEAD, OPTIONS) that fails in transit is
repeated by the session itself (urllib3's ``Retry``, ``call_tries`` tries in all), never a create,
update or delete once sent. Errors are sorted for the engine: no connection, timeouts and 5xx are
:class:`RetryableError`, other 4xx and unknown names are :class:`PermanentError`; both keep
Foreman's own message.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import requests
from apypie import ForemanApi
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from governord.errors import MissingAtPeer, PermanentError, RetryableError, http_error
from governord.models import OWNERSHIP_KEY, PROVIDER_ID_PARAMETER, HostView
from governord.providers import call_budget
from governord.registrars import Registrar, RegistrarConfig, Registration, marker_of

from .config import ForemanConfig, ForemanTagMapping, ParamValue

T = TypeVar("T")

#: apypie's "fetch everything" page size (Foreman echoes it back).
PER_PAGE = 2 << 31

#: requests repeated when they fail in transit: only those that change nothing (RFC 9110 9.2.1).
#: PUT and DELETE are idempotent by HTTP's definition, but not Foreman's: a PUT with new nested
#: parameters adds them again, a repeated DELETE of a Puppet class link answers 404.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: what the reverse proxy in front of Foreman answers when Foreman (Passenger/Puma) fails
RETRY_STATUSES = frozenset({502, 503, 504})
#: how Foreman's 500 for a record its model refused begins (ActiveRecord::RecordInvalid)
VALIDATION_FAILED = "Validation failed: "


def call_retry(tries: int, backoff: float) -> Retry:
    """urllib3's retry policy for one Foreman request: ``tries`` in all for a safe request that
    failed in transit (connection refused or cut, read timeout, 502/503/504); an unsafe one only
    when its connection could not be opened (nothing was sent). After the last try a 5xx answer
    is returned as it is, so that Foreman's (or its proxy's) own message reaches the error."""
    retries = tries - 1
    return Retry(
        total=retries, connect=retries, read=retries, status=retries, other=0, redirect=0,
        allowed_methods=SAFE_METHODS, status_forcelist=RETRY_STATUSES, backoff_factor=backoff,
        # a Retry-After could ask for any wait; the engine's step backoff is the place for long ones
        raise_on_status=False, respect_retry_after_header=False,
    )


class _TimeoutSession(requests.Session):
    """A requests session whose requests time out (apypie sets none of its own), and whose safe
    requests are repeated at the call level when they fail in transit (:func:`call_retry`)."""

    def __init__(self, timeout: float, tries: int = 1, backoff: float = 0.0) -> None:
        super().__init__()
        self._timeout = timeout
        self._tries = tries
        adapter = HTTPAdapter(max_retries=call_retry(tries, backoff))
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._timeout)
        verb = method.decode() if isinstance(method, bytes) else method
        tries = self._tries if verb.upper() in SAFE_METHODS and not kwargs.get("stream") else 1
        for attempt in range(1, tries + 1):
            try:
                return super().request(verb, url, *args, **kwargs)
            except requests.exceptions.ChunkedEncodingError:
                # the answer was cut after its headers: urllib3's Retry ends once headers arrived
                # (requests reads the body later), so a safe request is repeated here
                if attempt >= tries:
                    raise
        raise AssertionError("unreachable")


def _http_error(exc: BaseException) -> BaseException | None:
    """The requests exception behind an apypie error (apypie wraps them in its own)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, requests.RequestException):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _status(exc: BaseException) -> int | None:
    """The HTTP status behind a translated error, if it came from a response."""
    return getattr(exc, "http_status", None)


def _foreman_message(response: requests.Response) -> str:
    """Foreman's own words from an error response, whichever of its error shapes it has."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        if error.get("full_messages"):
            return "; ".join(str(m) for m in error["full_messages"])
        if error.get("message"):
            # a 403's details name the permissions the user lacks ("Access denied" alone does not)
            details = error.get("details")
            return f"{error['message']}: {details}" if details else str(error["message"])
    return str(error)


def _missing_permissions(response: requests.Response) -> list[str]:
    """The permissions a 403 from Foreman's authorize names (api/v2/errors/access_denied)."""
    try:
        body = response.json()
    except ValueError:
        return []
    error = body.get("error") if isinstance(body, dict) else None
    missing = error.get("missing_permissions") if isinstance(error, dict) else None
    return [str(p) for p in missing] if isinstance(missing, list) else []


def search_value(value: str) -> str:
    """``value`` as one quoted value of Foreman's search (scoped_search): in double quotes, with
    each backslash and double quote escaped by a backslash, so a name or title holding either
    is searched for as it is and cannot end the value early."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameter(value: ParamValue) -> tuple[str, str]:
    """A parameter value as Foreman stores it: text plus its ``parameter_type``."""
    if isinstance(value, bool):
        return ("true" if value else "false"), "boolean"
    if isinstance(value, int):
        return str(value), "integer"
    if isinstance(value, float):
        return repr(value), "real"
    return value, "string"


class AccessDenied(PermanentError):
    """Foreman's 403: the API user's roles lack a permission the request needs."""

    http_status = 403

    def __init__(self, message: str, missing_permissions: list[str], *, source: str | None) -> None:
        super().__init__(message, source=source)
        #: what Foreman named as missing (api/v2/errors/access_denied's missing_permissions)
        self.missing_permissions = missing_permissions


class ForemanRegistrar(Registrar):
    """Registers hosts in Foreman (with foreman_puppet for Puppet environments and classes)."""

    type_name = "foreman"
    Config = ForemanConfig
    TagMapping = ForemanTagMapping
    #: an application sees where its host is classified; parameter values (the classification's
    #: ``parameters``) are the operators' business and stay with them
    application_keys: ClassVar[frozenset[str]] = frozenset({"id", "hostgroup", "puppet_classes"})

    config: ForemanConfig

    def __init__(self, name: str, config: RegistrarConfig, *, state_dir: Path | None = None) -> None:
        super().__init__(name, config, state_dir=state_dir)
        # call_timeout bounds each try of a request; the thread running the call gets room for all
        self._call_timeout = call_budget(self.config.call_timeout, self.config.call_tries, self.config.call_backoff)
        self._api: ForemanApi | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._session: requests.Session | None = None
        self._context: dict[str, int | None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the apypie client, load Foreman's API description and check ``/api/status``."""
        await self._ensure_api()

    async def close(self) -> None:
        """Drop the client and any temporary apidoc cache."""
        if self._session is not None:
            self._session.close()
        self._api = None
        self._session = None
        self._context = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _cache_dir(self) -> Path:
        if self.state_dir is not None:
            return Path(self.state_dir) / "cache" / "apypie"
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="governord-apypie-")
        return Path(self._tmp.name)

    def _connect(self) -> ForemanApi:
        cfg = self.config
        cache = self._cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        session = self._session = _TimeoutSession(cfg.call_timeout, cfg.call_tries, cfg.call_backoff)
        verify: bool | str = str(cfg.ca_file) if cfg.ca_file is not None and cfg.verify_tls else cfg.verify_tls
        api = ForemanApi(
            uri=cfg.url.rstrip("/"),
            username=cfg.username,
            password=cfg.password.reveal(),
            verify_ssl=verify,
            apidoc_cache_base_dir=str(cache),
            session=session,
        )
        # loads (or re-loads) the apidoc, then proves the credentials work
        api.resource_action("home", "status", {})
        return api

    async def _ensure_api(self) -> ForemanApi:
        if self._api is None:
            self._api = await self._call(self._connect)
        return self._api

    async def _call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking apypie call in a thread, translating its failures for the engine."""
        try:
            return await self.call_sync(func, *args, **kwargs)
        except (RetryableError, PermanentError):
            raise
        except Exception as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> RetryableError | PermanentError:
        cause = _http_error(exc)
        where = f"Foreman at {self.config.url}"
        if isinstance(cause, requests.HTTPError) and cause.response is not None:
            response = cause.response
            said = _foreman_message(response)
            message = f"{where}: HTTP {response.status_code} on {response.request.method} {response.url}: {said}"
            if response.status_code == 500 and said.startswith(VALIDATION_FAILED):
                # a model's create!/update! refused the record (RecordInvalid, which Foreman's API
                # rescues only as a 500): the same request fails the same way every time
                refused = PermanentError(message, source=self.name)
                refused.http_status = 500
                return refused
            if response.status_code == 403:
                return AccessDenied(message, _missing_permissions(response), source=self.name)
            return http_error(response.status_code, message, source=self.name)
        if isinstance(cause, (requests.ConnectionError, requests.Timeout)):
            return RetryableError(f"{where} is unreachable: {cause}", source=self.name)
        if isinstance(cause, requests.RequestException):
            return RetryableError(f"{where}: {cause}", source=self.name)
        return PermanentError(f"{where}: {exc}", source=self.name)

    # -- one round trip each ------------------------------------------------------------------

    async def _list(self, resource: str, search: str | None = None, **params: Any) -> Any:
        api = await self._ensure_api()
        payload: dict[str, Any] = {"per_page": PER_PAGE, **params}
        if search is not None:
            payload["search"] = search
        result = await self._call(api.resource_action, resource, "index", payload)
        return result["results"] if result else []

    async def _action(self, resource: str, action: str, params: dict[str, Any]) -> Any:
        api = await self._ensure_api()
        return await self._call(api.resource_action, resource, action, params)

    async def _has(self, resource: str) -> bool:
        api = await self._ensure_api()
        return resource in api.resources

    async def _find_one(self, resource: str, field: str, value: str, what: str, **params: Any) -> dict[str, Any]:
        results = await self._list(resource, f"{field}={search_value(value)}", **params)
        if isinstance(results, dict):
            # the Puppet class index groups its results by module name
            results = [item for group in results.values() for item in group]
        matches = [r for r in results if r.get(field) == value]
        if not matches:
            raise MissingAtPeer(f"Foreman at {self.config.url} has no {what} {value!r}", source=self.name)
        return matches[0]

    async def _ids(self) -> dict[str, int | None]:
        """Organization, location and Puppet environment ids, resolved once."""
        if self._context is None:
            org = await self._find_one("organizations", "name", self.config.organization, "organization")
            loc = await self._find_one("locations", "title", self.config.location, "location")
            env_id = None
            if await self._has("environments"):
                env = await self._find_one("environments", "name", self.config.puppet_environment, "Puppet environment")
                env_id = env["id"]
            self._context = {"organization_id": org["id"], "location_id": loc["id"], "environment_id": env_id}
        return self._context

    async def _find_host(self, fqdn: str) -> dict[str, Any] | None:
        results = await self._list("hosts", f"name={search_value(fqdn)}", thin=True)
        matches = [r for r in results if r.get("name") == fqdn]
        if not matches:
            return None
        try:
            host: dict[str, Any] = await self._action("hosts", "show", {"id": matches[0]["id"]})
        except PermanentError as exc:
            if _status(exc) == 404:
                return None  # deleted between the search and the read
            raise
        return host

    # -- the contract ---------------------------------------------------------------------------

    async def check_mappings(self, mappings: Mapping[str, Any]) -> dict[tuple[str, str], str]:
        """Each tag's hostgroup (by title) and Puppet classes (in the Puppet environment) exist."""
        found: dict[tuple[str, str], str] = {}
        for tag, mapping in mappings.items():
            if mapping.hostgroup:
                try:
                    await self._find_one("hostgroups", "title", mapping.hostgroup, "hostgroup")
                except MissingAtPeer as exc:
                    found[(tag, "hostgroup")] = str(exc)
            if not mapping.puppet_classes:
                continue
            if not await self._has("host_classes"):
                found[(tag, "puppet_classes")] = "Foreman has no foreman_puppet plugin, so Puppet classes cannot be set"
                continue
            ids = await self._ids()
            scope = {"environment_id": ids["environment_id"]} if ids["environment_id"] else {}
            missing = []
            for name in mapping.puppet_classes:
                try:
                    await self._find_one("puppetclasses", "name", name, "Puppet class", **scope)
                except MissingAtPeer:
                    missing.append(name)
            if missing:
                where = f" in Puppet environment {self.config.puppet_environment!r}" if scope else ""
                found[(tag, "puppet_classes")] = (f"Foreman at {self.config.url} has no Puppet class "
                                                  f"{', '.join(map(repr, missing))}{where}")
        return found

    def classify(self, mappings: list[tuple[str, Any]]) -> dict[str, Any]:
        """First hostgroup named, the union of classes in order, parameters with earlier tags winning."""
        hostgroup: str | None = None
        classes: list[str] = []
        parameters: dict[str, ParamValue] = {}
        for _tag, mapping in mappings:
            if hostgroup is None and mapping.hostgroup:
                hostgroup = mapping.hostgroup
            classes.extend(c for c in mapping.puppet_classes if c not in classes)
            for key, value in mapping.parameters.items():
                parameters.setdefault(key, value)
        return {"hostgroup": hostgroup, "puppet_classes": classes, "parameters": parameters}

    async def register(self, host: HostView, classification: dict[str, Any]) -> dict[str, Any]:
        """Create or update the host in Foreman, then set its Puppet classes to exactly these (when
        its tags name any, or governord set some before)."""
        ids = await self._ids()
        title: str | None = classification.get("hostgroup")
        hostgroup_id = (await self._find_one("hostgroups", "title", title, "hostgroup"))["id"] if title else None
        class_names: list[str] = list(classification.get("puppet_classes", []))
        class_ids: dict[str, int] = {}
        if class_names:
            if not await self._has("host_classes"):
                raise PermanentError("Foreman has no foreman_puppet plugin, so Puppet classes cannot be set", source=self.name)
            scope = {"environment_id": ids["environment_id"]} if ids["environment_id"] else {}
            for name in class_names:
                class_ids[name] = (await self._find_one("puppetclasses", "name", name, "Puppet class", **scope))["id"]
        wanted_params: dict[str, tuple[str, str]] = {
            k: _parameter(v) for k, v in classification.get("parameters", {}).items()
        }
        previous = (host.registrations.get(self.name) or {}).get("parameters", [])

        marker = f"{OWNERSHIP_KEY}={host.id}"
        current = await self._find_host(_fqdn(host))
        if current is None:
            attrs: dict[str, Any] = {
                "name": _fqdn(host),
                "organization_id": ids["organization_id"],
                "location_id": ids["location_id"],
                "hostgroup_id": hostgroup_id,
                "managed": False,
                "build": False,
                "comment": marker,
                "host_parameters_attributes": [
                    {"name": k, "value": v, "parameter_type": t} for k, (v, t) in wanted_params.items()
                ],
            }
            if host.primary_address:
                attrs["ip"] = host.primary_address
            if ids["environment_id"]:
                attrs["environment_id"] = str(ids["environment_id"])
            current = await self._action(
                "hosts", "create",
                {"organization_id": ids["organization_id"], "location_id": ids["location_id"], "host": attrs},
            )
        else:
            changes = self._changes(host, current, ids, hostgroup_id, marker, wanted_params, previous)
            if changes:
                current = await self._action("hosts", "update", {"id": current["id"], "host": changes})
        assert current is not None
        host_id: int = current["id"]

        # the host's own classes are governord's to keep exact once a tag names some, or it set
        # some before (a re-tag that drops them removes them); otherwise they are not touched,
        # so that an API user without edit_classes can register hosts whose tags name none
        earlier = (host.registrations.get(self.name) or {}).get("puppet_classes")
        if class_ids or (earlier and await self._has("host_classes")):
            try:
                await self._set_classes(host_id, list(class_ids.values()))
            except AccessDenied as exc:
                raise self._denied(exc, f"read and set host {_fqdn(host)}'s Puppet classes") from exc
        record: dict[str, Any] = {"id": host_id, "hostgroup": title, "puppet_classes": class_names,
                                  "parameters": list(wanted_params)}
        target = self.config.provider_id_target()
        provider_id = classification.get("parameters", {}).get(PROVIDER_ID_PARAMETER)
        if target is not None and isinstance(provider_id, str):
            inherited = [c.get("name") for c in current.get("all_puppetclasses", []) if isinstance(c, dict)]
            classes = list(dict.fromkeys([*class_names, *(n for n in inherited if isinstance(n, str))]))
            record["provider_id_override"] = await self._set_provider_id(host, target, provider_id, classes)
        return record

    async def _set_classes(self, host_id: int, wanted_ids: list[int]) -> None:
        """Make the host's own Puppet classes exactly ``wanted_ids``: foreman_puppet's host class
        routes, which need the permission edit_classes (without it each answers 403, so what the
        host has is never guessed from an empty list)."""
        have = await self._action("host_classes", "index", {"host_id": host_id})
        have_ids = list(have["results"] if isinstance(have, dict) else have or [])
        for class_id in wanted_ids:
            if class_id not in have_ids:
                await self._action("host_classes", "create", {"host_id": host_id, "puppetclass_id": class_id})
        for class_id in have_ids:
            if class_id not in wanted_ids:
                await self._action("host_classes", "destroy", {"host_id": host_id, "id": class_id})

    def _denied(self, exc: AccessDenied, doing: str) -> AccessDenied:
        """A 403 as an operator can act on it: which user lacks which permission, for what."""
        missing = ", ".join(exc.missing_permissions) or "(Foreman named none)"
        return AccessDenied(
            f"Foreman at {self.config.url}: user {self.config.username} lacks the permission {missing}, "
            f"needed to {doing}; add it to one of the user's roles ({exc})", exc.missing_permissions, source=self.name)

    async def _set_provider_id(self, host: HostView, target: tuple[str, str], value: str,
                               classes: list[str]) -> dict[str, Any]:
        """The host's providerID as the value of the smart class parameter ``target`` for this
        host alone: an override value matching ``fqdn=HOST`` (created, or corrected), which
        Foreman's ENC hands Puppet as the class's parameter. Foreman removes it with the host.

        Checked first, as permanent errors, what Foreman would refuse (a 500 "Validation failed")
        or what would keep the value from Puppet: the class is one of the host's, the parameter
        exists, takes a string and is matched by ``fqdn``."""
        klass, name = target
        fqdn = _fqdn(host)
        where = f"Foreman at {self.config.url}: provider_id_parameter {klass}::{name}"
        if klass not in classes:
            raise PermanentError(f"{where}: {klass} is not one of host {fqdn}'s Puppet classes ({', '.join(classes) or 'none'}), "
                                 "so Foreman's ENC would not give Puppet the providerID; give the node group's tag "
                                 "that class, or name a parameter of a class it has", source=self.name)
        if not await self._has("override_values"):
            raise PermanentError(f"{where}: Foreman has no foreman_puppet plugin, so there are no smart class "
                                 "parameters", source=self.name)
        found = [p for p in await self._list("smart_class_parameters", f"puppetclass_name = {search_value(klass)} and key = {search_value(name)}")
                 if p.get("parameter") == name and p.get("puppetclass_name") == klass]
        if not found:
            raise PermanentError(f"{where}: Foreman has no smart class parameter {name} of Puppet class {klass}; "
                                 "declare it in the class and import the class from the Puppet environment",
                                 source=self.name)
        parameter = found[0]
        if parameter.get("parameter_type", "string") != "string":
            raise PermanentError(f"{where}: the parameter's type is {parameter.get('parameter_type')}, not string",
                                 source=self.name)
        order = [line.split(",") for line in str(parameter.get("override_value_order") or "").split()]
        if ["fqdn"] not in order:
            raise PermanentError(f"{where}: its order of override matchers ({' '.join(','.join(o) for o in order)}) has "
                                 "no fqdn, so no value can be set for one host; add fqdn to it", source=self.name)
        match = f"fqdn={fqdn}"
        values = await self._list("override_values", smart_class_parameter_id=parameter["id"])
        mine = next((v for v in values if isinstance(v, dict) and v.get("match") == match), None)
        if mine is None:
            mine = await self._action("override_values", "create", {
                "smart_class_parameter_id": parameter["id"], "override_value": {"match": match, "value": value}})
        elif mine.get("value") != value or mine.get("omit"):
            mine = await self._action("override_values", "update", {
                "smart_class_parameter_id": parameter["id"], "id": mine["id"],
                "override_value": {"value": value, "omit": False}})
        assert mine is not None
        return {"parameter_id": parameter["id"], "override_id": mine["id"], "match": match}

    @staticmethod
    def _changes(
        host: HostView,
        current: dict[str, Any],
        ids: dict[str, int | None],
        hostgroup_id: int | None,
        marker: str,
        wanted_params: dict[str, tuple[str, str]],
        previous: list[str],
    ) -> dict[str, Any]:
        """Only the attributes of ``current`` that differ from what they should be."""
        changes: dict[str, Any] = {}
        if current.get("hostgroup_id") != hostgroup_id:
            changes["hostgroup_id"] = hostgroup_id
        for key in ("organization_id", "location_id"):
            if current.get(key) != ids[key]:
                changes[key] = ids[key]
        if ids["environment_id"] and current.get("environment_id") != ids["environment_id"]:
            changes["environment_id"] = str(ids["environment_id"])
        if host.primary_address and current.get("ip") != host.primary_address:
            changes["ip"] = host.primary_address
        comment = current.get("comment") or ""
        if marker not in comment.splitlines():
            # keep what an operator wrote; only a stale marker line is replaced
            kept = [line for line in comment.splitlines() if not line.startswith(f"{OWNERSHIP_KEY}=")]
            changes["comment"] = "\n".join([*kept, marker])
        entries: list[dict[str, Any]] = []
        existing = {p["name"]: p for p in current.get("parameters", [])}
        for name, (value, kind) in wanted_params.items():
            have = existing.get(name)
            if have is None:
                entries.append({"name": name, "value": value, "parameter_type": kind})
            elif have.get("parameter_type") != kind or _parameter_text(have.get("value"), kind) != value:
                entries.append({"id": have["id"], "name": name, "value": value, "parameter_type": kind})
        for name in previous:
            # parameters governord set before and no tag asks for any more
            if name not in wanted_params and name in existing:
                entries.append({"id": existing[name]["id"], "_destroy": True})
        if entries:
            changes["host_parameters_attributes"] = entries
        return changes

    async def deregister(self, host: HostView) -> None:
        """Delete the host by name, then verify: no search hit, and its id reads 404."""
        results = await self._list("hosts", f"name={search_value(_fqdn(host))}", thin=True)
        known = [r["id"] for r in results if r.get("name") == _fqdn(host)]
        recorded = (host.registrations.get(self.name) or {}).get("id")
        if recorded is not None and recorded not in known:
            # renamed since registration? delete by the recorded id only if it is still ours
            try:
                other = await self._action("hosts", "show", {"id": recorded})
            except PermanentError as exc:
                if _status(exc) != 404:
                    raise
            else:
                if f"{OWNERSHIP_KEY}={host.id}" in (other.get("comment") or "").splitlines():
                    known.append(recorded)
        for host_id in known:
            try:
                await self._action("hosts", "destroy", {"id": host_id})
            except PermanentError as exc:
                if _status(exc) != 404:
                    raise
        if [r for r in await self._list("hosts", f"name={search_value(_fqdn(host))}", thin=True) if r.get("name") == _fqdn(host)]:
            raise RetryableError(f"host {_fqdn(host)} is still in Foreman after deletion", source=self.name)
        for host_id in known:
            try:
                await self._action("hosts", "show", {"id": host_id})
            except PermanentError as exc:
                if _status(exc) == 404:
                    continue
                raise
            raise RetryableError(f"host {_fqdn(host)} (id {host_id}) is still readable after deletion", source=self.name)
        override = (host.registrations.get(self.name) or {}).get("provider_id_override")
        if isinstance(override, dict):
            await self._remove_provider_id(override)

    async def _remove_provider_id(self, override: dict[str, Any]) -> None:
        """Foreman deletes a host's ``fqdn=`` override values with the host; verify it did (and
        delete the one recorded, while it still matches that host, if it did not)."""
        where = {"smart_class_parameter_id": override["parameter_id"], "id": override["override_id"]}
        for attempt in (1, 2):
            try:
                left = await self._action("override_values", "show", where)
            except PermanentError as exc:
                if _status(exc) == 404:
                    return
                raise
            if left.get("match") != override.get("match") or attempt == 2:
                break
            try:
                await self._action("override_values", "destroy", where)
            except PermanentError as exc:
                if _status(exc) != 404:
                    raise
        if left.get("match") == override.get("match"):
            raise RetryableError(f"the providerID override {override.get('match')} is still in Foreman after deletion",
                                 source=self.name)

    async def list_owned(self) -> list[Registration]:
        """Every Foreman host whose comment carries a governord ownership marker line."""
        found: list[Registration] = []
        # no thin parameter: Foreman treats any value of it, even "false", as thin (no comment)
        for entry in await self._list("hosts", f"comment ~ {search_value(OWNERSHIP_KEY + '=')}"):
            host_id = marker_of(entry.get("comment"))
            if host_id is not None:
                found.append(Registration(self.name, str(entry["id"]), str(entry["name"]), host_id,
                                          {"hostgroup": entry.get("hostgroup_title")}))
        return found

    async def remove_owned(self, entry: Registration) -> bool:
        """Delete the host with this id if its comment still names ``entry.host_id``; verify 404."""
        foreman_id = int(entry.entry_id)
        try:
            current = await self._action("hosts", "show", {"id": foreman_id})
        except PermanentError as exc:
            if _status(exc) == 404:
                return False
            raise
        if marker_of(current.get("comment")) != entry.host_id:
            return False  # someone else's now (a newer host of that name re-marked it)
        try:
            await self._action("hosts", "destroy", {"id": foreman_id})
        except PermanentError as exc:
            if _status(exc) != 404:
                raise
        try:
            await self._action("hosts", "show", {"id": foreman_id})
        except PermanentError as exc:
            if _status(exc) == 404:
                return True
            raise
        raise RetryableError(f"host {entry.name} (id {foreman_id}) is still readable after deletion", source=self.name)

    async def lookup(self, host: HostView) -> dict[str, Any] | None:
        """The host as Foreman has it now, or None."""
        current = await self._find_host(_fqdn(host))
        if current is None:
            return None
        return {
            "id": current["id"],
            "name": current["name"],
            "hostgroup": current.get("hostgroup_title"),
            "puppet_classes": [c["name"] for c in current.get("puppetclasses", [])],
            "parameters": {p["name"]: p.get("value") for p in current.get("parameters", [])},
            "comment": current.get("comment"),
        }


def _fqdn(host: HostView) -> str:
    """The name Foreman knows the host by: Foreman lower-cases host names."""
    return host.fqdn.lower()


def _parameter_text(value: Any, kind: str) -> str:
    """Foreman returns parameter values cast by type; compare them as the text we send."""
    if kind == "boolean" and isinstance(value, bool):
        return "true" if value else "false"
    if kind == "real" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return str(value)
