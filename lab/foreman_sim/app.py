"""The Foreman API v2 simulator: an aiohttp application over an in-memory :class:`State`.

It serves what governord's Foreman registrar needs (hosts, their parameters and Puppet classes,
and the lookups that turn names into ids) with Foreman's status codes, envelopes, error bodies
and quirks, as recorded from real servers and read from Foreman's source.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import views
from .apidoc import SEARCH_FIELDS, build_apidoc, serialise
from .search import Getter, QueryNotSupported, select
from .state import NotFound, State, now

STATE_KEY = web.AppKey("foreman_state", State)
CONFIG_KEY = web.AppKey("foreman_config", dict)
#: the parsed JSON body of a request (empty when it has none)
BODY_KEY = web.RequestKey("foreman_body", dict)
#: the authenticated API user (see :meth:`State.add_user`)
USER_KEY = web.RequestKey("foreman_user", dict)
#: handler -> the permissions any one of which lets a user call it
GUARDS_KEY = web.AppKey("foreman_guards", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Foreman's default ``entries_per_page`` setting.
DEFAULT_PER_PAGE = 20


class FError(Exception):
    """An error response: raised by handlers, rendered by the middleware."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def _error(status: int, message: str) -> FError:
    return FError(status, {"error": {"message": message}})


def _not_found(resource: str, ident: Any) -> FError:
    return _error(404, f"Resource {resource} not found by id '{ident}'")


def _association_not_found(model: str, ident: Any) -> FError:
    # Foreman renders RecordNotFound for another model than the controller's as a 422 custom_error
    return _error(422, f"Couldn't find {model} with 'id'={ident}")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", charset="utf-8")


# -- request plumbing --------------------------------------------------------------------------


def _is_authenticated_path(path: str) -> bool:
    if path in ("/api/ping", "/api/v2/ping"):
        return False  # documented as available to unauthenticated users
    return path == "/api" or path.startswith(("/api/", "/foreman_puppet/api"))


@web.middleware
async def foreman_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Body parsing, authentication and media-type checks in Foreman's order, plus its headers."""
    state = request.app[STATE_KEY]
    config = request.app[CONFIG_KEY]
    if request.match_info.http_exception is not None:
        # ActionDispatch routes before any controller runs (or the body is parsed): an unknown
        # path, or a known one with another method, is a RoutingError whatever the credentials;
        # no controller ran, so none of its headers, only Apipie's middleware's checksum
        response = _routing_error(request)
        if request.path.startswith(("/api/", "/apidoc/")) or request.path == "/api":
            response.headers["Apipie-Checksum"] = config["checksum"]
        return response
    try:
        # Rails parses a JSON body before any before_action runs, so a bad body wins over bad auth
        request[BODY_KEY] = await _parse_body(request)
        if _is_authenticated_path(request.path):
            request[USER_KEY] = _authenticate(request, state)
            # Api::BaseController#authorize runs before Api::V2::BaseController#check_media_type
            _require(request, *request.app[GUARDS_KEY].get(request.match_info.handler, ()))
            if request.method in ("POST", "PUT") and request.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
                content_type = request.headers.get("Content-Type", "")
                raise _error(
                    415,
                    f"Media type in 'Content-Type: {content_type}' is unsupported in API v2 for POST and PUT requests. "
                    "Please use 'Content-Type: application/json'.",
                )
        response = await handler(request)
    except FError as exc:
        response = json_response(exc.body, exc.status)
    except QueryNotSupported as exc:
        response = json_response({"error": {"message": str(exc), "class": "ScopedSearch::QueryNotSupported"}}, 400)
    if request.path.startswith(("/api", "/foreman_puppet/api")):
        response.headers["Foreman_version"] = state.version
        response.headers["Foreman_api_version"] = "2"
        response.headers["Foreman_current_location"] = "; ANY"
        response.headers["Foreman_current_organization"] = "; ANY"
    if request.path.startswith(("/api/", "/apidoc/")) or request.path == "/api":
        response.headers["Apipie-Checksum"] = config["checksum"]
    return response


async def _parse_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.text()
    media = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media != "application/json" or not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FError(
            400,
            {"status": 400, "error": f"There was a problem in the JSON you submitted: {exc.msg} at '{raw[exc.pos:exc.pos + 40]}'"},
        ) from None
    # Rails wraps a non-object body in "_json"; nothing the simulator serves reads it
    return body if isinstance(body, dict) else {}


def _authenticate(request: web.Request, state: State) -> dict[str, Any]:
    """The API user the request's Basic credentials name, or Foreman's 401."""
    header = request.headers.get("Authorization", "")
    login = ""
    if header.lower().startswith("basic "):
        try:
            login, _, given = base64.b64decode(header[6:].strip()).decode("utf-8", "replace").partition(":")
        except (binascii.Error, ValueError):
            login, given = "", ""
        user = state.user_by_login(login)
        if user is not None and user["password"] == given:
            return user
    raise _error(401, f"Unable to authenticate user {login}")


def _require(request: web.Request, *permissions: str) -> None:
    """Api::BaseController#authorize: a user none of whose permissions allows the controller
    action is refused before the action runs (deny_access, 403), and set_error_details names
    every permission that would have (rendered by api/v2/errors/access_denied.json.rabl).
    Administrators may do anything; an action no permission names needs none here."""
    user = request[USER_KEY]
    if not permissions or user["admin"] or any(p in user["permissions"] for p in permissions):
        return
    raise FError(403, {"error": {
        "message": "Access denied",
        "details": f"Missing one of the required permissions: {', '.join(permissions)}",
        "missing_permissions": list(permissions),
    }})


def _routing_error(request: web.Request) -> web.Response:
    """Rails' answer to a request no route matches (ActionController::RoutingError, method
    mismatches included: Rails has no 405), rendered by ActionDispatch::PublicExceptions#call
    in the request's format: ``{status, error}`` as JSON when JSON is asked for (the API
    clients' ``Accept``), else the static public/404.html."""
    accept = request.headers.get("Accept", "")
    if "json" in accept.lower():
        return json_response({"status": 404, "error": "Not Found"}, 404)
    return web.Response(text="<!DOCTYPE html>\n<html><head><title>The page you were looking for doesn't exist (404)</title>"
                             "</head><body><h1>The page you were looking for doesn't exist.</h1></body></html>\n",
                        status=404, content_type="text/html", charset="utf-8")


def _param(request: web.Request, name: str) -> Any:
    """A parameter from the query string or the JSON body, as Rails merges them."""
    if name in request.query:
        return request.query[name]
    return request[BODY_KEY].get(name)


def _int(value: Any) -> int | None:
    """ActiveRecord's integer cast: numbers and numeric strings; anything else is nil."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _bool(value: Any) -> bool | None:
    """ActiveRecord's boolean cast."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() not in {"false", "0", "f", "off", "no", "n"}


# -- index envelope ----------------------------------------------------------------------------


def _index(request: web.Request, total: int, matches: list[Any], render: Callable[[list[Any]], Any],
           sort_keys: dict[str, Callable[[Any], Any]] | None = None) -> web.Response:
    """Foreman's ``index_layout``: pretty-printed metadata with the results on one line."""
    search = _param(request, "search")
    order = _param(request, "order")
    by, direction = None, None
    if order and str(order).split():
        parts = str(order).split()
        by, direction = parts[0], (parts[1] if len(parts) > 1 else "ASC")
        if sort_keys and by in sort_keys:
            matches = sorted(matches, key=sort_keys[by], reverse=direction.upper() == "DESC")
    page_raw = _param(request, "page")
    page = _int(page_raw) if page_raw not in (None, "") else 1
    page = page if page and page > 0 else 1
    per_page_raw = _param(request, "per_page")
    if per_page_raw in (None, ""):
        per_page = DEFAULT_PER_PAGE
    elif str(per_page_raw) == "all":
        per_page = total
    else:
        per_page = _int(per_page_raw) or 0
        if per_page <= 0:
            raise _error(500, f"`per_page` value isn't a valid positive integer: {per_page_raw}")
    subtotal = len(matches) if search not in (None, "") else total
    start = (page - 1) * per_page
    results = render(matches[start:start + per_page] if per_page else [])
    text = (
        "{\n"
        f'  "total": {total},\n'
        f'  "subtotal": {subtotal},\n'
        f'  "page": {page},\n'
        f'  "per_page": {per_page},\n'
        f'  "search": {json.dumps(search)},\n'
        '  "sort": {\n'
        f'    "by": {json.dumps(by)},\n'
        f'    "order": {json.dumps(direction)}\n'
        "  },\n"
        f'  "results": {json.dumps(results)}\n'
        "}\n"
    )
    return web.Response(text=text, content_type="application/json", charset="utf-8")


def _fields(resource: str, getters: dict[str, Getter]) -> dict[str, tuple[str, Getter]]:
    kinds = {f["name"]: ("boolean" if "values" in f else f["type"]) for f in SEARCH_FIELDS[resource]}
    return {name: (kinds[name], getter) for name, getter in getters.items()}


# -- status ------------------------------------------------------------------------------------


async def apidoc(request: web.Request) -> web.Response:
    return web.Response(body=request.app[CONFIG_KEY]["apidoc"], content_type="application/json", charset="utf-8")


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return json_response({"result": "ok", "status": 200, "version": state.version, "api_version": 2})


async def ping(request: web.Request) -> web.Response:
    return json_response({"foreman": {"database": {"active": True, "duration_ms": "0"}}})


# -- hosts -------------------------------------------------------------------------------------


def _host_fields(state: State) -> dict[str, tuple[str, Getter]]:
    def group(host: dict[str, Any], key: str) -> Any:
        record = state.get("hostgroups", host["hostgroup_id"]) if host["hostgroup_id"] else None
        return record[key] if record else None

    def named(kind: str, key: str, attr: str = "name") -> Getter:
        return lambda host: (state.get(kind, host[key]) or {}).get(attr)

    return _fields(
        "hosts",
        {
            "name": lambda h: h["name"],
            "id": lambda h: h["id"],
            "comment": lambda h: h["comment"],
            "hostgroup": lambda h: group(h, "title"),
            "hostgroup_id": lambda h: h["hostgroup_id"],
            "hostgroup_name": lambda h: group(h, "name"),
            "hostgroup_title": lambda h: group(h, "title"),
            "hostgroup_fullname": lambda h: group(h, "title"),
            "domain": named("domains", "domain_id"),
            "domain_id": lambda h: h["domain_id"],
            "ip": lambda h: h["ip"],
            "location": named("locations", "location_id", "title"),
            "location_id": lambda h: h["location_id"],
            "organization": named("organizations", "organization_id", "title"),
            "organization_id": lambda h: h["organization_id"],
            "environment": named("environments", "environment_id"),
            "puppetclass": lambda h: [state.objects["puppetclasses"][i]["name"] for i in state.all_puppetclass_ids(h)],
            "params_name": lambda h: [p["name"] for p in h["parameters"]],
            "managed": lambda h: h["managed"],
            "build": lambda h: h["build"],
        },
    )


def _find_host(state: State, ident: str) -> dict[str, Any]:
    try:
        return state.find("hosts", ident)
    except NotFound:
        raise _not_found("host", ident) from None


async def hosts_index(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    hosts = sorted(state.all("hosts"), key=lambda h: h["name"])
    group_id = request.match_info.get("hostgroup_id") or _param(request, "hostgroup_id")
    if group_id not in (None, ""):
        # a nested id that names nothing is the unwrapped not_found(String) body
        if state.get("hostgroups", group_id) is None:
            raise FError(404, {"message": f"Hostgroup not found by id '{group_id}'"})
        hosts = [h for h in hosts if h["hostgroup_id"] == _int(group_id)]
    matches = select(hosts, _param(request, "search"), _host_fields(state), "name")
    # Foreman tests `if params[:thin]`: any value given, even "false", is truthy in Ruby
    thin = _param(request, "thin") is not None
    if thin:
        return _index(request, len(hosts), matches, lambda page: [views.host_thin(h) for h in page])
    return _index(
        request, len(hosts), matches, lambda page: [views.host_main(state, h) for h in page],
        {"name": lambda h: h["name"], "id": lambda h: h["id"]},
    )


async def hosts_show(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return json_response(views.host_full(state, _find_host(state, request.match_info["id"]), request[USER_KEY]))


class _Validation:
    """Collects model validation errors as Rails does: per attribute, plus full messages."""

    def __init__(self) -> None:
        self.errors: dict[str, list[str]] = {}
        self.full: list[str] = []

    def add(self, attribute: str, message: str, human: str) -> None:
        self.errors.setdefault(attribute, []).append(message)
        self.full.append(f"{human} {message}")

    def raise_if_any(self, record_id: int | None) -> None:
        if self.errors:
            raise FError(422, {"error": {"id": record_id, "errors": self.errors, "full_messages": self.full}})


_PARAMETER_TYPES = {"string", "boolean", "integer", "real", "array", "hash", "yaml", "json"}


def _check_parameter_value(parameter_type: str, value: str) -> bool:
    try:
        if parameter_type == "boolean":
            return value.strip().lower() in {"true", "false", "1", "0", "yes", "no", "y", "n", "t", "f", "on", "off"}
        views.typed_value(parameter_type, value)
    except (ValueError, json.JSONDecodeError):
        return False
    return True


def _apply_parameters(state: State, host: dict[str, Any], given: Any, check: _Validation) -> list[dict[str, Any]]:
    """Rails nested attributes for ``host_parameters_attributes``: create, update by id, ``_destroy``."""
    params = [dict(p) for p in host["parameters"]]
    if given is None:
        return params
    entries = list(given.values()) if isinstance(given, dict) else list(given) if isinstance(given, list) else []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        if entry.get("id") not in (None, ""):
            existing = next((p for p in params if p["id"] == _int(entry["id"])), None)
            if existing is None:
                raise _association_not_found("HostParameter", entry["id"])
            if _bool(entry.get("_destroy")):
                params.remove(existing)
                continue
            target = existing
        else:
            if _bool(entry.get("_destroy")):
                continue
            target = {"id": None, "name": None, "value": "", "parameter_type": "string", "hidden_value": False,
                      "created_at": now()}
            params.append(target)
        for key in ("name", "parameter_type"):
            if key in entry:
                target[key] = None if entry[key] is None else str(entry[key])
        if "value" in entry:
            value = entry["value"]
            target["value"] = json.dumps(value) if isinstance(value, (dict, list)) else (
                str(value).lower() if isinstance(value, bool) else "" if value is None else str(value))
        if "hidden_value" in entry:
            target["hidden_value"] = bool(_bool(entry["hidden_value"]))
        target["updated_at"] = now()
    seen: set[str] = set()
    for p in params:
        if not p["name"]:
            check.add("host_parameters.name", "can't be blank", "Host parameters name")
        elif p["name"] in seen:
            check.add("host_parameters.name", "has already been taken", "Host parameters name")
        seen.add(p["name"] or "")
        if p["parameter_type"] not in _PARAMETER_TYPES:
            check.add("host_parameters.parameter_type", "is not included in the list", "Host parameters parameter type")
        elif not _check_parameter_value(p["parameter_type"], p["value"]):
            check.add("host_parameters.value", f"is invalid {p['parameter_type']}", "Host parameters value")
    return params


def _resolve(state: State, kind: str, model: str, value: Any) -> int | None:
    """A foreign key from the request: nil stays nil, an unknown id is Foreman's 422 custom error."""
    if value in (None, ""):
        return None
    ident = _int(value)
    if ident is None or state.get(kind, ident) is None:
        raise _association_not_found(model, value)
    return ident


def _write_host(state: State, request: web.Request, host: dict[str, Any] | None) -> dict[str, Any]:
    """Create (``host`` None) or update a host from the request body; validation as Foreman's model."""
    body = request[BODY_KEY]
    attrs = body.get("host")
    attrs = attrs if isinstance(attrs, dict) else {}
    creating = host is None
    record: dict[str, Any] = dict(host) if host else {
        "id": None, "name": None, "ip": None, "mac": None, "domain_id": None, "architecture_id": None,
        "operatingsystem_id": None, "hostgroup_id": None, "comment": None, "managed": True, "build": False,
        "enabled": True, "organization_id": None, "location_id": None, "environment_id": None,
        "parameters": [], "puppetclass_ids": [], "puppet_facet": False,
        # Hostext::Ownership#set_default_user (before_validation): no owner given, so the
        # host_owner setting's (unset here), else the user making the request
        "owner_id": request[USER_KEY]["id"], "owner_type": "User",
    }
    check = _Validation()
    for key, kind, model in (
        ("hostgroup_id", "hostgroups", "Hostgroup"),
        ("domain_id", "domains", "Domain"),
        ("architecture_id", "architectures", "Architecture"),
        ("operatingsystem_id", "operatingsystems", "Operatingsystem"),
        ("location_id", "locations", "Location"),
        ("organization_id", "organizations", "Organization"),
    ):
        if key in attrs:
            record[key] = _resolve(state, kind, model, attrs[key])
    if creating:
        # a taxonomy missing from the host hash comes from the request's context, then from
        # Foreman's assign_lone_taxonomies (the only organization/location there is)
        for key, kind, model in (("location_id", "locations", "Location"), ("organization_id", "organizations", "Organization")):
            if record[key] is None and body.get(key) not in (None, ""):
                record[key] = _resolve(state, kind, model, body[key])
            if record[key] is None and key not in attrs and len(state.objects[kind]) == 1:
                record[key] = next(iter(state.objects[kind]))
    puppet = attrs.get("puppet_attributes") if isinstance(attrs.get("puppet_attributes"), dict) else {}
    if any(key in source for source in (attrs, puppet) for key in ("environment_id", "puppetclass_ids")):
        # foreman_puppet keeps these in the host's Puppet facet, made when first given
        record["puppet_facet"] = True
    if attrs.get("hostgroup_id") not in (None, ""):
        # Host::Managed#apply_inherited_attributes (on Host.new, and on update by the API's
        # host_attributes) gives every facet its hostgroup's attributes; foreman_puppet's
        # HostPuppetFacet.inherited_attributes always answers an environment_id (the group's
        # inherited one, maybe none), so a host given a hostgroup gets a Puppet facet
        record["puppet_facet"] = True
        if not any("environment_id" in source for source in (attrs, puppet)):
            record["environment_id"] = next(
                (g["environment_id"] for g in state.hostgroup_chain(record["hostgroup_id"]) if g["environment_id"]), None)
    for source in (attrs, puppet):
        if "environment_id" in source:
            record["environment_id"] = _resolve(state, "environments", "ForemanPuppet::Environment", source["environment_id"])
        if "puppetclass_ids" in source:
            ids = source["puppetclass_ids"] if isinstance(source["puppetclass_ids"], list) else []
            record["puppetclass_ids"] = [
                i for i in dict.fromkeys(
                    _resolve(state, "puppetclasses", "ForemanPuppet::Puppetclass", v) for v in ids if v not in (None, "")
                ) if i is not None
            ]
    for key in ("managed", "build", "enabled"):
        if key in attrs and attrs[key] is not None:
            record[key] = bool(_bool(attrs[key]))
    for key in ("ip", "comment"):
        if key in attrs:
            record[key] = None if attrs[key] is None else str(attrs[key])
    if "mac" in attrs:
        record["mac"] = None if attrs["mac"] in (None, "") else str(attrs["mac"]).lower()
    if "name" in attrs:
        record["name"] = None if attrs["name"] is None else str(attrs["name"]).strip().lower() or None
    if record["name"]:
        if "." in record["name"]:
            suffix = record["name"].split(".", 1)[1]
            domain = next((d for d in state.all("domains") if d["name"] == suffix), None)
            if domain is not None:
                record["domain_id"] = domain["id"]
        elif record["domain_id"] is not None:
            record["name"] = f"{record['name']}.{state.objects['domains'][record['domain_id']]['name']}"
    record["parameters"] = _apply_parameters(state, record, attrs.get("host_parameters_attributes"), check)

    if not record["name"]:
        check.add("name", "can't be blank", "Name")
    elif any(h["name"] == record["name"] and h["id"] != record["id"] for h in state.all("hosts")):
        check.add("name", "has already been taken", "Name")
    if record["location_id"] is None:
        check.add("location_id", "can't be blank", "Location")
    if record["organization_id"] is None:
        check.add("organization_id", "can't be blank", "Organization")
    if record["managed"]:
        # a managed host is provisioned by Foreman, which needs to know what to install where
        if record["architecture_id"] is None:
            check.add("architecture_id", "can't be blank", "Architecture")
        if record["operatingsystem_id"] is None:
            check.add("operatingsystem_id", "can't be blank", "Operatingsystem")
        if record["mac"] is None:
            check.add("interfaces.mac", "can't be blank", "Mac")
    check.raise_if_any(record["id"])

    for param in record["parameters"]:
        if param["id"] is None:
            param["id"] = state.new_parameter_id()
    if creating:
        record.pop("id")
        record["interface_id"] = state.new_interface_id()
        return state.add("hosts", record)
    record["updated_at"] = now()
    state.objects["hosts"][record["id"]] = record
    return record


async def hosts_create(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return json_response(views.host_full(state, _write_host(state, request, None), request[USER_KEY]), 201)


async def hosts_update(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    host = _find_host(state, request.match_info["id"])
    return json_response(views.host_full(state, _write_host(state, request, host), request[USER_KEY]))


async def hosts_destroy(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    host = _find_host(state, request.match_info["id"])
    del state.objects["hosts"][host["id"]]
    # HostCommon: has_many :lookup_values (match "fqdn=NAME"), dependent: :destroy
    for value in [v for v in state.all("override_values") if v["match"] == f"fqdn={host['name']}"]:
        del state.objects["override_values"][value["id"]]
    return json_response(views.host_raw_row(host))


async def hosts_enc(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    host = _find_host(state, request.match_info["id"])
    return json_response({"data": views.enc_info(state, host)})


async def external_nodes(request: web.Request) -> web.Response:
    """``GET /node/:name?format=yml``: HostsController#externalNodes, what Foreman's ENC script asks.

    A UI route, not API v2: found by certname, then name; an unknown node is a bare 404, and the
    classification is rendered as YAML (``format=yml``) or as YAML inside ``<pre>`` (HTML).
    Foreman lets registered smart proxies in by their client certificate and anyone else by
    login; the simulator has no TLS, so Basic auth it is.
    """
    yml = request.query.get("format") == "yml"
    try:
        _authenticate(request, request.app[STATE_KEY])
    except FError as exc:
        return web.Response(text=exc.body["error"]["message"], status=401 if yml else 403,
                            content_type="text/plain", charset="utf-8")
    state = request.app[STATE_KEY]
    name = request.match_info["name"]
    host = next((h for h in state.all("hosts") if h["name"] == name), None)
    if host is None:
        return web.Response(status=404)
    text = views.to_yaml(views.enc_info(state, host))
    if yml:
        return web.Response(text=text, content_type="text/plain", charset="utf-8")
    return web.Response(text=f"<pre>{html.escape(text)}</pre>", content_type="text/html", charset="utf-8")


# -- lookups -----------------------------------------------------------------------------------


def _lookup(kind: str, singular: str, render: Callable[[State, dict[str, Any]], Any],
            getters: Callable[[State], dict[str, Getter]], key: str = "name") -> tuple[Handler, Handler]:
    async def index(request: web.Request) -> web.Response:
        state = request.app[STATE_KEY]
        records = sorted(state.all(kind), key=lambda r: r[key])
        matches = select(records, _param(request, "search"), _fields(kind, getters(state)), "name")
        return _index(request, len(records), matches, lambda page: [render(state, r) for r in page],
                      {"name": lambda r: r["name"], "id": lambda r: r["id"], key: lambda r: r[key]})

    async def show(request: web.Request) -> web.Response:
        state = request.app[STATE_KEY]
        try:
            record = state.find(kind, request.match_info["id"])
        except NotFound:
            raise _not_found(singular, request.match_info["id"]) from None
        view = render(state, record)
        if kind == "hostgroups":
            view = views.hostgroup_view(state, record, show=True)
        return json_response(view)

    return index, show


def _taxonomy_getters(state: State) -> dict[str, Getter]:
    return {"id": lambda r: r["id"], "name": lambda r: r["name"], "title": lambda r: r["title"],
            "description": lambda r: r["description"]}


def _hostgroup_getters(state: State) -> dict[str, Getter]:
    return {"id": lambda r: r["id"], "name": lambda r: r["name"], "title": lambda r: r["title"],
            "label": lambda r: r["title"]}


def _domain_getters(state: State) -> dict[str, Getter]:
    return {"id": lambda r: r["id"], "name": lambda r: r["name"], "fullname": lambda r: r["fullname"]}


def _environment_getters(state: State) -> dict[str, Getter]:
    return {"name": lambda r: r["name"]}


def _puppetclass_getters(state: State) -> dict[str, Getter]:
    return {
        "name": lambda r: r["name"],
        "environment": lambda r: [state.objects["environments"][i]["name"] for i in r["environment_ids"]],
    }


async def puppetclasses_index(request: web.Request) -> web.Response:
    """Foreman's Puppet class index: results are a hash of module name -> classes."""
    state = request.app[STATE_KEY]
    records = sorted(state.all("puppetclasses"), key=lambda r: r["name"])
    fields = _fields("puppetclasses", _puppetclass_getters(state))
    if "host_id" in request.match_info:
        # nested under a host: all its classes (own and inherited), no search applied
        host = _find_host(state, request.match_info["host_id"])
        values = [state.objects["puppetclasses"][i] for i in state.all_puppetclass_ids(host)]
        return _index(request, len(values), values, views.classes_by_module)
    if "environment_id" in request.match_info:
        try:
            env = state.find("environments", request.match_info["environment_id"])
        except NotFound:
            # the unwrapped not_found(String) of a missing nested object
            raise FError(404, {"message": f"Environment not found by id '{request.match_info['environment_id']}'"}) from None
        records = [r for r in records if env["id"] in r["environment_ids"]]
    total = len(records) if "environment_id" in request.match_info else len(state.objects["puppetclasses"])
    matches = select(records, _param(request, "search"), fields, "name")
    return _index(request, total, matches, views.classes_by_module)


async def puppetclasses_show(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        record = state.find("puppetclasses", request.match_info["id"])
    except NotFound:
        raise _not_found("puppetclass", request.match_info["id"]) from None
    return json_response(views.puppetclass_view(record))


# -- host classes (foreman_puppet) ------------------------------------------------------------


def _host_for_classes(state: State, ident: str) -> dict[str, Any]:
    try:
        return state.find("hosts", ident)
    except NotFound:
        # the controller's resource is HostClass, so a missing host is an association error
        raise _association_not_found("Host::Managed", ident) from None


def _puppetclass_for_host(state: State, ident: Any) -> dict[str, Any]:
    try:
        return state.find("puppetclasses", ident)
    except NotFound:
        raise _association_not_found("ForemanPuppet::Puppetclass", ident) from None


def _host_classes_host(request: web.Request) -> dict[str, Any]:
    """HostClassesController#find_host (after authorize: edit_classes, which foreman_puppet's
    lib/foreman_puppet/register.rb gives index, create and destroy), which makes the host a
    Puppet facet if it has none (``@host.puppet || @host.create_puppet``), so from now on the
    host's answers carry Puppet keys."""
    state = request.app[STATE_KEY]
    host = _host_for_classes(state, request.match_info["host_id"])
    host["puppet_facet"] = True
    return host


async def host_classes_index(request: web.Request) -> web.Response:
    host = _host_classes_host(request)
    return json_response({"results": list(host["puppetclass_ids"])})


async def host_classes_create(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    host = _host_classes_host(request)
    klass = _puppetclass_for_host(state, _param(request, "puppetclass_id"))
    if klass["id"] in host["puppetclass_ids"]:
        # HostClass.create! raises RecordInvalid, which nothing rescues but the generic handler
        raise _error(500, "Validation failed: Puppetclass has already been taken")
    host["puppetclass_ids"].append(klass["id"])
    host["updated_at"] = now()
    return json_response({"host_id": host["id"], "puppetclass_id": klass["id"]})


async def host_classes_destroy(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    host = _host_classes_host(request)
    klass = _puppetclass_for_host(state, request.match_info["id"])
    if klass["id"] in host["puppetclass_ids"]:
        host["puppetclass_ids"].remove(klass["id"])
        host["updated_at"] = now()
    # destroy_all's result: the destroyed rows are rendered as an empty array
    return json_response([])


# -- smart class parameters and their override values (foreman_puppet) ---------------------------


def _smart_parameter_fields(state: State) -> dict[str, tuple[str, Getter]]:
    def class_name(parameter: dict[str, Any]) -> str:
        return str(state.objects["puppetclasses"][parameter["puppetclass_id"]]["name"])

    return _fields("smart_class_parameters", {
        "key": lambda p: p["parameter"],
        "parameter": lambda p: p["parameter"],
        "puppetclass": class_name,
        "puppetclass_name": class_name,
        "override": lambda p: p["override"],
    })


async def smart_class_parameters_index(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    records = sorted(state.all("smart_class_parameters"), key=lambda p: p["parameter"])
    matches = select(records, _param(request, "search"), _smart_parameter_fields(state), "parameter")
    return _index(request, len(records), matches, lambda page: [views.smart_class_parameter_view(state, p) for p in page])


def _smart_parameter(state: State, ident: Any, *, nested: bool = True) -> dict[str, Any]:
    """PuppetLookupsCommonController#find_smart_class_parameter: by id, then by parameter name;
    a miss is the controller's unwrapped not_found, whose message (with its stray quote) names
    the id it read: none on the nested routes, where Foreman reads ``smart_variable_id``."""
    number = _int(ident)
    found = state.get("smart_class_parameters", number) if number and number > 0 else None
    if found is None:
        found = next((p for p in state.all("smart_class_parameters") if p["parameter"] == str(ident)), None)
    if found is None:
        raise FError(404, {"message": f"Smart class parameter not found by id '{'' if nested else ident}''"})
    return found


async def smart_class_parameters_show(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    parameter = _smart_parameter(state, request.match_info["id"], nested=False)
    return json_response(views.smart_class_parameter_view(state, parameter))


async def override_values_index(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    parameter = _smart_parameter(state, request.match_info["smart_class_parameter_id"])
    values = sorted(state.overrides_of(parameter), key=lambda v: v["id"])
    return _index(request, len(values), values, lambda page: [views.override_value_view(v) for v in page])


def _override_value(state: State, parameter: dict[str, Any], ident: str) -> dict[str, Any]:
    """By id, then by match (friendly_id), and only one of this parameter's."""
    number = _int(ident)
    found = state.get("override_values", number) if number is not None else None
    if found is None:
        found = next((v for v in state.overrides_of(parameter) if v["match"] == ident), None)
    if found is None or found["lookup_key_id"] != parameter["id"]:
        raise FError(404, {"message": f"Override value not found by id '{ident}'"})
    return found


async def override_values_show(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    parameter = _smart_parameter(state, request.match_info["smart_class_parameter_id"])
    return json_response(views.override_value_view(_override_value(state, parameter, request.match_info["id"])))


_KEY_DELM, _EQ_DELM = ",", "="
#: LookupKey::VALUE_REGEX: matcher=value pairs joined by commas
_MATCH_FORMAT = re.compile(r"\A[^,]+=[^,]+(,[^,]+=[^,]+)*\Z")


def _sanitize_match(match: str) -> str:
    """LookupValue#sanitize_match: each matcher lower-cased and stripped, each value stripped."""
    parts = []
    for element in match.split(_KEY_DELM):
        pieces = element.split(_EQ_DELM)
        parts.append(_EQ_DELM.join([pieces[0].lower().strip(), pieces[-1].strip() if len(pieces) > 1 else ""]))
    return _KEY_DELM.join(parts)


def _cast_value(value: Any) -> Any:
    """The controller's cast_value: any value but a hash becomes its text (Ruby's to_s)."""
    if isinstance(value, dict) or value is None:
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)


def _save_override_value(state: State, parameter: dict[str, Any], value: dict[str, Any]) -> None:
    """LookupValue's validations (with foreman_puppet's), as ``create!``/``update!`` run them:
    a refusal is RecordInvalid, which only Api::BaseController's catch-all rescues, so the client
    gets a 500 whose message is "Validation failed: " and the full messages. A match left blank
    passes them and is then refused by the before_save callback (RecordNotSaved)."""
    errors: list[str] = []
    match = value["match"]
    omit = bool(value["omit"])
    # in the order Rails runs them: the core model's, then foreman_puppet's value_present?
    if match not in (None, ""):
        taken = any(v["match"] == match and v["id"] != value["id"] for v in state.overrides_of(parameter))
        if taken:
            # ensure_match_uniqueness and the uniqueness validation each add it
            errors += ["Match has already been taken", "Match has already been taken"]
        if not _MATCH_FORMAT.match(match):
            errors.append("Match is invalid")
        fqdn = re.search(r"fqdn=(.*)", match)
        if fqdn and not any(h["name"] == fqdn[1].split(_KEY_DELM)[0] for h in state.all("hosts")):
            errors.append(f"Match fqdn={fqdn[1].split(_KEY_DELM)[0]} does not match an existing host")
        group = re.search(r"hostgroup=(.*)", match)
        if group and not any(group[1].split(_KEY_DELM)[0] in (g["name"], g["title"]) for g in state.all("hostgroups")):
            errors.append(f"Match hostgroup={group[1].split(_KEY_DELM)[0]} does not match an existing host group")
        elements = [element.split(_EQ_DELM)[0] for element in match.split(_KEY_DELM)]
        if elements not in [line.split(_KEY_DELM) for line in state.lookup_path(parameter).split()]:
            errors.append(f"Match {','.join(elements)} does not exist in order field")
    if not omit and isinstance(value["value"], str) and not _check_parameter_value(parameter["parameter_type"], value["value"]):
        errors.append(f"Value is invalid {parameter['parameter_type']}")
    if not omit and (value["value"] is None or str(value["value"]) == ""):
        errors.append("Value can't be blank")
    if errors:
        raise _error(500, "Validation failed: " + ", ".join(errors))
    if match in (None, ""):
        raise _error(500, "Failed to save the record")


async def override_values_create(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    parameter = _smart_parameter(state, request.match_info["smart_class_parameter_id"])
    given = request[BODY_KEY].get("override_value")
    if not isinstance(given, dict):
        raise _error(500, "param is missing or the value is empty: override_value")
    value = {"id": None, "lookup_key_id": parameter["id"],
             "match": _sanitize_match(str(given["match"])) if given.get("match") not in (None, "") else given.get("match"),
             "value": _cast_value(given.get("value")), "omit": bool(_bool(given.get("omit")))}
    _save_override_value(state, parameter, value)
    value.pop("id")
    record = state.add("override_values", value)
    # OverrideValuesController#create: a parameter with an override value is overridden from now on
    parameter["override"] = True
    parameter["updated_at"] = now()
    return json_response(views.override_value_view(record), 201)


async def override_values_update(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    parameter = _smart_parameter(state, request.match_info["smart_class_parameter_id"])
    record = _override_value(state, parameter, request.match_info["id"])
    given = request[BODY_KEY].get("override_value")
    if not isinstance(given, dict):
        raise _error(500, "param is missing or the value is empty: override_value")
    changed = dict(record)
    if "match" in given:
        changed["match"] = _sanitize_match(str(given["match"])) if given["match"] not in (None, "") else given["match"]
    if "value" in given:
        changed["value"] = _cast_value(given["value"])
    if "omit" in given:
        changed["omit"] = bool(_bool(given["omit"]))
    _save_override_value(state, parameter, changed)
    changed["updated_at"] = now()
    state.objects["override_values"][record["id"]] = changed
    return json_response(views.override_value_view(changed))


async def override_values_destroy(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    parameter = _smart_parameter(state, request.match_info["smart_class_parameter_id"])
    record = _override_value(state, parameter, request.match_info["id"])
    del state.objects["override_values"][record["id"]]
    return json_response(views.override_value_view(record))


# -- application -------------------------------------------------------------------------------


def create_app(seed: dict[str, Any], username: str, password: str) -> web.Application:
    """The simulator as an aiohttp application, with state from ``seed`` and one API user."""
    body, checksum = serialise(build_apidoc())
    app = web.Application(middlewares=[foreman_middleware])
    app[STATE_KEY] = State(seed, admin=(username, password))
    app[CONFIG_KEY] = {"apidoc": body, "checksum": checksum}
    org_index, org_show = _lookup("organizations", "organization", lambda s, r: views.taxonomy_view(r), _taxonomy_getters, "title")
    loc_index, loc_show = _lookup("locations", "location", lambda s, r: views.taxonomy_view(r), _taxonomy_getters, "title")
    dom_index, dom_show = _lookup("domains", "domain", lambda s, r: views.domain_view(r), _domain_getters)
    hg_index, hg_show = _lookup("hostgroups", "hostgroup", views.hostgroup_view, _hostgroup_getters, "title")
    env_index, env_show = _lookup("environments", "environment", lambda s, r: views.environment_view(r), _environment_getters)
    puppet = "/foreman_puppet/api"
    view_parameters = ("view_external_parameters",)
    # who may call what: the permissions that allow each controller action, in the order Foreman
    # (config/initializers/f_foreman_permissions.rb) and foreman_puppet (lib/foreman_puppet/register.rb)
    # register them; any one of them will do. Unlisted: public (api_status) or not the API.
    app[GUARDS_KEY] = {
        hosts_index: ("view_hosts",), hosts_show: ("view_hosts",), hosts_enc: ("view_hosts",),
        hosts_create: ("create_hosts",), hosts_update: ("edit_hosts",), hosts_destroy: ("destroy_hosts",),
        org_index: ("view_organizations",), org_show: ("view_organizations",),
        loc_index: ("view_locations",), loc_show: ("view_locations",),
        dom_index: ("view_domains",), dom_show: ("view_domains",),
        hg_index: ("view_hostgroups",), hg_show: ("view_hostgroups",),
        env_index: ("view_environments",), env_show: ("view_environments",),
        puppetclasses_index: ("view_puppetclasses",), puppetclasses_show: ("view_puppetclasses",),
        host_classes_index: ("edit_classes",), host_classes_create: ("edit_classes",),
        host_classes_destroy: ("edit_classes",),
        smart_class_parameters_index: ("view_external_parameters", "view_puppetclasses"),
        smart_class_parameters_show: ("view_external_parameters", "view_puppetclasses"),
        override_values_index: view_parameters, override_values_show: view_parameters,
        override_values_create: ("create_external_parameters", "edit_external_parameters", "destroy_external_parameters"),
        override_values_update: ("edit_external_parameters", "destroy_external_parameters"),
        override_values_destroy: ("edit_external_parameters", "destroy_external_parameters"),
    }
    app.add_routes(
        [
            web.get("/apidoc/v2.json", apidoc),
            web.get("/api/status", status),
            web.get("/api/ping", ping),
            web.get("/api/hosts", hosts_index),
            web.get("/api/hostgroups/{hostgroup_id}/hosts", hosts_index),
            web.post("/api/hosts", hosts_create),
            web.get("/api/hosts/{id}", hosts_show),
            web.put("/api/hosts/{id}", hosts_update),
            # Rails' ``resources`` routes PATCH to update as well; check_media_type looks at POST and PUT only
            web.patch("/api/hosts/{id}", hosts_update),
            web.delete("/api/hosts/{id}", hosts_destroy),
            web.get("/api/hosts/{id}/enc", hosts_enc),
            web.get("/node/{name}", external_nodes),
            web.get("/api/organizations", org_index),
            web.get("/api/organizations/{id}", org_show),
            web.get("/api/locations", loc_index),
            web.get("/api/locations/{id}", loc_show),
            web.get("/api/domains", dom_index),
            web.get("/api/domains/{id}", dom_show),
            web.get("/api/hostgroups", hg_index),
            web.get("/api/hostgroups/{id}", hg_show),
            web.get(f"{puppet}/environments", env_index),
            web.get(f"{puppet}/environments/{{id}}", env_show),
            web.get(f"{puppet}/puppetclasses", puppetclasses_index),
            web.get(f"{puppet}/puppetclasses/{{id}}", puppetclasses_show),
            web.get(f"{puppet}/environments/{{environment_id}}/puppetclasses", puppetclasses_index),
            web.get(f"{puppet}/hosts/{{host_id}}/puppetclasses", puppetclasses_index),
            web.get(f"{puppet}/hosts/{{host_id}}/puppetclass_ids", host_classes_index),
            web.post(f"{puppet}/hosts/{{host_id}}/puppetclass_ids", host_classes_create),
            web.delete(f"{puppet}/hosts/{{host_id}}/puppetclass_ids/{{id}}", host_classes_destroy),
            web.get(f"{puppet}/smart_class_parameters", smart_class_parameters_index),
            web.get(f"{puppet}/smart_class_parameters/{{id}}", smart_class_parameters_show),
            web.get(f"{puppet}/smart_class_parameters/{{smart_class_parameter_id}}/override_values", override_values_index),
            web.post(f"{puppet}/smart_class_parameters/{{smart_class_parameter_id}}/override_values", override_values_create),
            web.get(f"{puppet}/smart_class_parameters/{{smart_class_parameter_id}}/override_values/{{id}}",
                    override_values_show),
            web.put(f"{puppet}/smart_class_parameters/{{smart_class_parameter_id}}/override_values/{{id}}",
                    override_values_update),
            web.delete(f"{puppet}/smart_class_parameters/{{smart_class_parameter_id}}/override_values/{{id}}",
                       override_values_destroy),
        ]
    )
    return app
