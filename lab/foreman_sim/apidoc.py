"""The simulator's own apipie description: only what the simulator implements.

The format is apipie's (``{"docs": {"resources": {NAME: {"methods": [...]}}}}``), as served by a
real Foreman at ``/apidoc/v2.json``; apypie reads it to pick routes and validate parameters. The
resource, action and parameter names follow Foreman 3.13 with foreman_puppet, so a client that
works against this description works against a real server, but nothing is listed that the
simulator does not serve.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

API_VERSION = "v2"

_TYPES = {"string": "Must be a String", "numeric": "Must be a number.", "hash": "Must be a Hash"}
_BOOL = "Must be one of: <code>true</code>, <code>false</code>, <code>1</code>, <code>0</code>."
_IDENT = (
    "Must be an identifier, string from 1 to 128 characters containing only alphanumeric characters, "
    "dot(.), space, underscore(_), hypen(-) with no leading or trailing space."
)
_PER_PAGE = "Must match regular expression <code>/\\A([1-9]\\d*|all)\\Z$/</code>."


def param(
    name: str,
    expected_type: str = "string",
    *,
    required: bool = False,
    allow_nil: bool = False,
    validator: str | None = None,
    params: list[dict[str, Any]] | None = None,
    parent: str | None = None,
    description: str = "",
) -> dict[str, Any]:
    """One apipie parameter description; nested ``params`` get their ``full_name`` prefixed."""
    full_name = f"{parent}[{name}]" if parent else name
    if validator is None:
        if expected_type == "boolean":
            validator = _BOOL
        elif expected_type == "array":
            validator = "Must be an Array of nested elements" if params else "Must be an array of any type"
        else:
            validator = _TYPES.get(expected_type, "Must be a String")
    entry: dict[str, Any] = {
        "name": name,
        "full_name": full_name,
        "description": description,
        "required": required,
        "allow_nil": allow_nil,
        "allow_blank": False,
        "validator": validator,
        "expected_type": expected_type,
        "metadata": None,
        "show": True,
        "validations": [],
        "deprecated": False,
    }
    if params is not None:
        entry["params"] = [_reparent(p, full_name) for p in params]
    return entry


def _reparent(entry: dict[str, Any], parent: str) -> dict[str, Any]:
    entry = dict(entry)
    entry["full_name"] = f"{parent}[{entry['name']}]"
    if "params" in entry:
        entry["params"] = [_reparent(p, entry["full_name"]) for p in entry["params"]]
    return entry


def method(
    resource: str,
    name: str,
    apis: list[tuple[str, str, str]],
    params: list[dict[str, Any]],
    *,
    search: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One apipie method: ``apis`` are ``(http_method, api_url, short_description)``."""
    return {
        "doc_url": f"/apidoc/{API_VERSION}/{resource}/{name}",
        "name": name,
        "apis": [
            {"api_url": url, "http_method": verb, "short_description": text, "deprecated": None}
            for verb, url, text in apis
        ],
        "formats": None,
        "full_description": "",
        "errors": [],
        "params": params,
        "returns": [],
        "examples": [],
        "metadata": {"search": search} if search is not None else None,
        "see": [],
        "headers": [],
        "show": True,
    }


def resource(name: str, api_url: str, methods: list[dict[str, Any]]) -> dict[str, Any]:
    """One apipie resource."""
    return {
        "doc_url": f"/apidoc/{API_VERSION}/{name}",
        "id": name,
        "api_url": api_url,
        "name": name.capitalize(),
        "short_description": None,
        "full_description": "",
        "version": API_VERSION,
        "formats": None,
        "metadata": None,
        "headers": [],
        "deprecated": False,
        "methods": methods,
    }


def _taxonomy_context() -> list[dict[str, Any]]:
    return [
        param("location_id", "numeric", validator="Must be a Integer"),
        param("organization_id", "numeric", validator="Must be a Integer"),
    ]


def _search_and_pagination() -> list[dict[str, Any]]:
    return [
        param("search", description="filter results"),
        param("order", description="Sort field and order, eg. 'id DESC'"),
        param("page", "numeric", description="Page number, starting at 1"),
        param("per_page", validator=_PER_PAGE, description="Number of results per page to return"),
    ]


def _fields(*pairs: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"name": name, "type": kind} for name, kind in sorted(pairs)]


#: Scoped-search fields the simulator understands, per resource (a subset of Foreman's).
SEARCH_FIELDS: dict[str, list[dict[str, Any]]] = {
    "hosts": _fields(
        ("name", "string"), ("id", "integer"), ("comment", "text"), ("hostgroup", "string"),
        ("hostgroup_id", "integer"), ("hostgroup_name", "string"), ("hostgroup_title", "string"),
        ("hostgroup_fullname", "string"), ("domain", "string"), ("domain_id", "integer"), ("ip", "string"),
        ("location", "string"), ("location_id", "integer"), ("organization", "string"),
        ("organization_id", "integer"), ("environment", "string"), ("puppetclass", "string"),
        ("params_name", "string"),
    )
    + [{"name": "managed", "values": ["true", "false"]}, {"name": "build", "values": ["true", "false"]}],
    "hostgroups": _fields(("id", "integer"), ("name", "string"), ("title", "string"), ("label", "string")),
    "organizations": _fields(("id", "integer"), ("name", "string"), ("title", "string"), ("description", "text")),
    "locations": _fields(("id", "integer"), ("name", "string"), ("title", "string"), ("description", "text")),
    "domains": _fields(("id", "integer"), ("name", "string"), ("fullname", "string")),
    "environments": _fields(("name", "string")),
    "puppetclasses": _fields(("name", "string"), ("environment", "string")),
    "smart_class_parameters": _fields(("key", "string"), ("parameter", "string"), ("puppetclass", "string"),
                                      ("puppetclass_name", "string"))
    + [{"name": "override", "values": ["true", "false"]}],
}
_ANY_TYPE = ("Must be one of types: <code>string</code>, <code>boolean</code>, <code>integer</code>, <code>real</code>, "
             "<code>array</code>, <code>hash</code>, <code>yaml</code>, <code>json</code>")


def _host_attributes(create: bool) -> list[dict[str, Any]]:
    nil = {"allow_nil": True}
    parameters = [
        param("name", required=create),
        param("value", required=create),
        param(
            "parameter_type",
            allow_nil=True,
            validator="Must be one of: <code>string</code>, <code>boolean</code>, <code>integer</code>, "
            "<code>real</code>, <code>array</code>, <code>hash</code>, <code>yaml</code>, <code>json</code>.",
        ),
        param("hidden_value", "boolean", allow_nil=True),
    ]
    return [
        param("name", required=create),
        param("location_id", "numeric", required=create),
        param("organization_id", "numeric", required=create),
        param("ip", **nil),
        param("mac", **nil),
        param("architecture_id", "numeric", **nil),
        param("domain_id", "numeric", **nil),
        param("operatingsystem_id", "numeric", **nil),
        param("hostgroup_id", "numeric", **nil),
        param("host_parameters_attributes", "array", params=parameters, **nil),
        param("build", "boolean", **nil),
        param("enabled", "boolean", **nil),
        param("managed", "boolean", **nil),
        param("comment", **nil),
        param("environment_id"),
        param("puppetclass_ids", "array"),
        param(
            "puppet_attributes",
            "hash",
            params=[param("environment_id"), param("puppetclass_ids", "array")],
        ),
    ]


def _id_param(description: str = "") -> dict[str, Any]:
    return param("id", required=True, validator=_IDENT, description=description)


def _lookup_resource(name: str, singular: str, base: str = "/api") -> dict[str, Any]:
    return resource(
        name,
        base,
        [
            method(
                name,
                "index",
                [("GET", f"{base}/{name}", f"List all {name}")],
                ([] if base != "/api" else _taxonomy_context()) + _search_and_pagination(),
                search=SEARCH_FIELDS[name],
            ),
            method(
                name,
                "show",
                [("GET", f"{base}/{name}/:id", f"Show {'an' if singular[0] in 'aeiou' else 'a'} {singular}")],
                ([] if base != "/api" else _taxonomy_context()) + [_id_param()],
            ),
        ],
    )


def build_apidoc() -> dict[str, Any]:
    """The whole description the simulator serves at ``/apidoc/v2.json``."""
    puppet = "/foreman_puppet/api"
    hosts = resource(
        "hosts",
        "/api",
        [
            method(
                "hosts",
                "index",
                [("GET", "/api/hosts", "List all hosts"),
                 ("GET", "/api/hostgroups/:hostgroup_id/hosts", "List all hosts for a host group")],
                [param("thin", "boolean", description="Only list ID and name of hosts"), param("hostgroup_id"),
                 *_taxonomy_context(), *_search_and_pagination()],
                search=SEARCH_FIELDS["hosts"],
            ),
            method("hosts", "show", [("GET", "/api/hosts/:id", "Show a host")], [*_taxonomy_context(), _id_param()]),
            method(
                "hosts",
                "create",
                [("POST", "/api/hosts", "Create a host")],
                [*_taxonomy_context(), param("host", "hash", required=True, params=_host_attributes(True))],
            ),
            method(
                "hosts",
                "update",
                [("PUT", "/api/hosts/:id", "Update a host")],
                [*_taxonomy_context(), _id_param(), param("host", "hash", required=True, params=_host_attributes(False))],
            ),
            method("hosts", "destroy", [("DELETE", "/api/hosts/:id", "Delete a host")], [*_taxonomy_context(), _id_param()]),
            method("hosts", "enc", [("GET", "/api/hosts/:id/enc", "Get ENC values of host")], [*_taxonomy_context(), _id_param()]),
        ],
    )
    puppetclasses = resource(
        "puppetclasses",
        puppet,
        [
            method(
                "puppetclasses",
                "index",
                [
                    ("GET", f"{puppet}/puppetclasses", "List all Puppet classes"),
                    ("GET", f"{puppet}/hosts/:host_id/puppetclasses", "List all Puppet classes for a host"),
                    ("GET", f"{puppet}/environments/:environment_id/puppetclasses", "List all Puppet classes for an environment"),
                ],
                [param("host_id"), param("environment_id"), *_search_and_pagination()],
                search=SEARCH_FIELDS["puppetclasses"],
            ),
            method(
                "puppetclasses",
                "show",
                [("GET", f"{puppet}/puppetclasses/:id", "Show a Puppet class")],
                [param("id", required=True)],
            ),
        ],
    )
    host_classes = resource(
        "host_classes",
        puppet,
        [
            method("host_classes", "index",
                   [("GET", f"{puppet}/hosts/:host_id/puppetclass_ids", "List all Puppet class IDs for host")], []),
            method("host_classes", "create",
                   [("POST", f"{puppet}/hosts/:host_id/puppetclass_ids", "Add a Puppet class to host")],
                   [param("host_id", required=True), param("puppetclass_id", required=True)]),
            method("host_classes", "destroy",
                   [("DELETE", f"{puppet}/hosts/:host_id/puppetclass_ids/:id", "Remove a Puppet class from host")],
                   [param("host_id", required=True), param("id", required=True)]),
        ],
    )
    smart_parameter_id = param("smart_class_parameter_id", validator=_IDENT)
    smart_class_parameters = resource(
        "smart_class_parameters",
        puppet,
        [
            method(
                "smart_class_parameters",
                "index",
                [("GET", f"{puppet}/smart_class_parameters", "List all smart class parameters")],
                [param("show_hidden", "boolean", description="Display hidden values"), *_search_and_pagination()],
                search=SEARCH_FIELDS["smart_class_parameters"],
            ),
            method(
                "smart_class_parameters",
                "show",
                [("GET", f"{puppet}/smart_class_parameters/:id", "Show a smart class parameter")],
                [_id_param(), param("show_hidden", "boolean", description="Display hidden values")],
            ),
        ],
    )

    def override_value(create: bool) -> dict[str, Any]:
        return param("override_value", "hash", required=True, params=[
            param("match", required=create, description="Override match"),
            param("value", "any_type", allow_nil=True, validator=_ANY_TYPE,
                  description="Override value, required if omit is false"),
            param("omit", "boolean", allow_nil=True,
                  description="Foreman will not send this parameter in classification output"),
        ])

    values_url = f"{puppet}/smart_class_parameters/:smart_class_parameter_id/override_values"
    override_values = resource(
        "override_values",
        puppet,
        [
            method("override_values", "index",
                   [("GET", values_url, "List of override values for a specific smart class parameter")],
                   [smart_parameter_id, param("show_hidden", "boolean"), param("page", "numeric"),
                    param("per_page", validator=_PER_PAGE)]),
            method("override_values", "show",
                   [("GET", f"{values_url}/:id", "Show an override value for a specific smart class parameter")],
                   [smart_parameter_id, _id_param()]),
            method("override_values", "create",
                   [("POST", values_url, "Create an override value for a specific smart class parameter")],
                   [smart_parameter_id, override_value(True)]),
            method("override_values", "update",
                   [("PUT", f"{values_url}/:id", "Update an override value for a specific smart class parameter")],
                   [smart_parameter_id, _id_param(), override_value(False)]),
            method("override_values", "destroy",
                   [("DELETE", f"{values_url}/:id", "Delete an override value for a specific smart class parameter")],
                   [smart_parameter_id, _id_param()]),
        ],
    )
    resources = {
        "home": resource("home", "/api", [method("home", "status", [("GET", "/api/status", "Show status")], [])]),
        "ping": resource(
            "ping", "/api",
            [method("ping", "ping", [("GET", "/api/ping", "Shows status of Foreman system and it's subcomponents")],
                    _taxonomy_context())],
        ),
        "hosts": hosts,
        "hostgroups": _lookup_resource("hostgroups", "host group"),
        "organizations": _lookup_resource("organizations", "organization"),
        "locations": _lookup_resource("locations", "location"),
        "domains": _lookup_resource("domains", "domain"),
        "environments": _lookup_resource("environments", "environment", puppet),
        "puppetclasses": puppetclasses,
        "host_classes": host_classes,
        "smart_class_parameters": smart_class_parameters,
        "override_values": override_values,
    }
    return {
        "docs": {
            "name": "Foreman",
            "info": "\n<p>Foreman API v2 simulator (governord lab): a subset of the real API.</p>\n",
            "copyright": "",
            "doc_url": f"/apidoc/{API_VERSION}",
            "api_url": "/api",
            "resources": resources,
        }
    }


def serialise(apidoc: dict[str, Any]) -> tuple[bytes, str]:
    """The body served for the apidoc and its checksum (the ``Apipie-Checksum`` header)."""
    body = json.dumps(apidoc, sort_keys=False).encode()
    return body, hashlib.md5(body, usedforsecurity=False).hexdigest()
