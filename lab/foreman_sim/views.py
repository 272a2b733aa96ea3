"""JSON views of simulator objects, in the shapes Foreman's rabl templates render."""

from __future__ import annotations

import json
import re
from typing import Any

from .state import State


def module_name(class_name: str) -> str:
    """Foreman's ``Puppetclass#module_name``: the part before the first ``::``."""
    return class_name.split("::", 1)[0]


def typed_value(parameter_type: str, value: str) -> Any:
    """A parameter's value as Foreman renders it: cast by its ``parameter_type``."""
    if parameter_type == "boolean":
        return value.strip().lower() in {"true", "1", "yes", "y", "t", "on"}
    if parameter_type == "integer":
        return int(value)
    if parameter_type == "real":
        return float(value)
    if parameter_type in {"array", "hash", "json"}:
        return json.loads(value)
    return value


def parameter_view(param: dict[str, Any]) -> dict[str, Any]:
    return {
        "priority": 70,
        "created_at": param["created_at"],
        "updated_at": param["updated_at"],
        "id": param["id"],
        "name": param["name"],
        "parameter_type": param["parameter_type"],
        "associated_type": "host",
        "hidden_value?": param["hidden_value"],
        "value": typed_value(param["parameter_type"], param["value"]),
    }


def puppetclass_brief(state: State, class_id: int) -> dict[str, Any]:
    klass = state.objects["puppetclasses"][class_id]
    return {"id": klass["id"], "name": klass["name"], "module_name": module_name(klass["name"])}


def _name(state: State, kind: str, ident: int | None, key: str = "name") -> Any:
    record = state.get(kind, ident) if ident is not None else None
    return record[key] if record else None


def host_main(state: State, host: dict[str, Any]) -> dict[str, Any]:
    """The host attributes of Foreman's ``api/v2/hosts/main`` view (index and show)."""
    group = state.get("hostgroups", host["hostgroup_id"]) if host["hostgroup_id"] else None
    owner = state.users.get(host["owner_id"]) if host["owner_type"] == "User" else None
    view = {
        "ip": host["ip"],
        "ip6": None,
        "last_report": None,
        "mac": host["mac"],
        "realm_id": None,
        "realm_name": None,
        "sp_mac": None,
        "sp_ip": None,
        "sp_name": None,
        "domain_id": host["domain_id"],
        "domain_name": _name(state, "domains", host["domain_id"]),
        "architecture_id": host["architecture_id"],
        "architecture_name": _name(state, "architectures", host["architecture_id"]),
        "operatingsystem_id": host["operatingsystem_id"],
        "operatingsystem_name": _name(state, "operatingsystems", host["operatingsystem_id"], "title"),
        "subnet_id": None,
        "subnet_name": None,
        "subnet6_id": None,
        "subnet6_name": None,
        "sp_subnet_id": None,
        "ptable_id": None,
        "ptable_name": None,
        "medium_id": None,
        "medium_name": None,
        "pxe_loader": None,
        "build": host["build"],
        "comment": host["comment"],
        "disk": None,
        "initiated_at": None,
        "installed_at": None,
        "model_id": None,
        "hostgroup_id": host["hostgroup_id"],
        "owner_id": host["owner_id"],
        "owner_name": owner["name"] if owner else None,
        "owner_type": host["owner_type"],
        "enabled": host["enabled"],
        "managed": host["managed"],
        "use_image": None,
        "image_file": "",
        "uuid": None,
        "compute_resource_id": None,
        "compute_resource_name": None,
        "compute_profile_id": None,
        "compute_profile_name": None,
        "capabilities": ["build"],
        "provision_method": "build",
        "certname": host["name"],
        "image_id": None,
        "image_name": None,
        "created_at": host["created_at"],
        "updated_at": host["updated_at"],
        "last_compile": None,
        "global_status": 0,
        "global_status_label": "OK",
        "bmc_available": False,
        "organization_id": host["organization_id"],
        "organization_name": _name(state, "organizations", host["organization_id"]),
        "location_id": host["location_id"],
        "location_name": _name(state, "locations", host["location_id"]),
        "puppet_status": 0,
        "model_name": None,
        "build_status": 0,
        "build_status_label": "Installed",
        "name": host["name"],
        "id": host["id"],
        "puppet_proxy_id": None,
        "puppet_proxy_name": None,
        "puppet_ca_proxy_id": None,
        "puppet_ca_proxy_name": None,
        "puppet_proxy": None,
        "puppet_ca_proxy": None,
        "hostgroup_name": group["name"] if group else None,
        "hostgroup_title": group["title"] if group else None,
    }
    if host["puppet_facet"]:
        # api/v2/hosts/main.json.rabl renders a facet's list view only for a host that has that
        # facet (``if: definition.facet_record_for(host)``); foreman_puppet's is host_list.json.rabl
        view["environment_id"] = host["environment_id"]
        view["environment_name"] = _name(state, "environments", host["environment_id"])
    return view


def host_full(state: State, host: dict[str, Any], user: dict[str, Any] | None = None) -> dict[str, Any]:
    """Foreman's host show view: main attributes plus parameters, interfaces and Puppet data."""
    parameters = [parameter_view(p) for p in host["parameters"]]
    own_classes = [puppetclass_brief(state, i) for i in host["puppetclass_ids"]]
    all_classes = [puppetclass_brief(state, i) for i in state.all_puppetclass_ids(host)]
    interface = {
        "id": host["interface_id"],
        "name": host["name"],
        "ip": host["ip"],
        "ip6": None,
        "mac": host["mac"],
        "mtu": 1500,
        "fqdn": host["name"],
        "identifier": None,
        "primary": True,
        "provision": True,
        "type": "interface",
        "managed": True,
        "virtual": False,
        "subnet_id": None,
        "subnet_name": None,
        "subnet6_id": None,
        "subnet6_name": None,
        "domain_id": host["domain_id"],
        "domain_name": _name(state, "domains", host["domain_id"]),
    }
    # show.json.rabl's permissions node: each Host permission, as the requesting user holds it
    # (Authorizer#can?; the simulator's users' permissions are unlimited by filters)
    permissions = {name: user is None or bool(user["admin"]) or name in user["permissions"] for name in HOST_PERMISSIONS}
    view = {
        **host_main(state, host),
        "parameters": parameters,
        "all_parameters": parameters,
        "interfaces": [interface],
    }
    if not host["puppet_facet"]:
        # api/v2/hosts/show.json.rabl: a facet's single view only for a host with that facet
        return {**view, "permissions": permissions}
    return {
        **view,
        "puppet": {
            "environment_id": host["environment_id"],
            "environment_name": _name(state, "environments", host["environment_id"]),
            "puppetclasses": own_classes,
            "all_puppetclasses": all_classes,
            "config_groups": [],
        },
        "puppetclasses": own_classes,
        "all_puppetclasses": all_classes,
        "config_groups": [],
        "permissions": permissions,
    }


#: the permissions whose resource type is Host, in the show view's ``permissions`` node
HOST_PERMISSIONS = ("view_hosts", "create_hosts", "edit_hosts", "destroy_hosts", "build_hosts", "power_hosts",
                    "console_hosts", "ipmi_boot_hosts", "forget_status_hosts")


def host_thin(host: dict[str, Any]) -> dict[str, Any]:
    return {"id": host["id"], "name": host["name"]}


def host_raw_row(host: dict[str, Any]) -> dict[str, Any]:
    """The database row, as ``DELETE /api/hosts/:id`` renders it (not the rabl view)."""
    return {
        "id": host["id"],
        "name": host["name"],
        "last_compile": None,
        "last_report": None,
        "updated_at": host["updated_at"],
        "created_at": host["created_at"],
        "root_pass": None,
        "architecture_id": host["architecture_id"],
        "operatingsystem_id": host["operatingsystem_id"],
        "ptable_id": None,
        "medium_id": None,
        "build": host["build"],
        "comment": host["comment"],
        "disk": None,
        "installed_at": None,
        "model_id": None,
        "hostgroup_id": host["hostgroup_id"],
        "owner_id": host["owner_id"],
        "owner_type": host["owner_type"],
        "enabled": host["enabled"],
        "puppet_ca_proxy_id": None,
        "managed": host["managed"],
        "use_image": None,
        "image_file": None,
        "uuid": None,
        "compute_resource_id": None,
        "puppet_proxy_id": None,
        "certname": host["name"],
        "image_id": None,
        "organization_id": host["organization_id"],
        "location_id": host["location_id"],
        "otp": None,
        "realm_id": None,
        "compute_profile_id": None,
        "provision_method": "build",
        "grub_pass": "",
        "global_status": 0,
        "lookup_value_matcher": f"fqdn={host['name']}",
        "pxe_loader": None,
        "initiated_at": None,
        "build_errors": None,
    }


def taxonomy_view(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "ancestry": None,
        "parent_id": None,
        "parent_name": None,
        "id": record["id"],
        "name": record["name"],
        "title": record["title"],
        "description": record["description"],
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
    }


def hostgroup_view(state: State, group: dict[str, Any], *, show: bool = False) -> dict[str, Any]:
    parent = state.get("hostgroups", group["parent_id"]) if group["parent_id"] else None
    view: dict[str, Any] = {
        "subnet_id": None,
        "subnet_name": None,
        "operatingsystem_id": None,
        "operatingsystem_name": None,
        "domain_id": None,
        "domain_name": None,
        "environment_id": group["environment_id"],
        "environment_name": _name(state, "environments", group["environment_id"]),
        "compute_profile_id": None,
        "compute_profile_name": None,
        "ancestry": str(parent["id"]) if parent else None,
        "parent_id": group["parent_id"],
        "parent_name": parent["title"] if parent else None,
        "ptable_id": None,
        "ptable_name": None,
        "medium_id": None,
        "medium_name": None,
        "pxe_loader": None,
        "subnet6_id": None,
        "subnet6_name": None,
        "architecture_id": None,
        "architecture_name": None,
        "realm_id": None,
        "realm_name": None,
        "created_at": group["created_at"],
        "updated_at": group["updated_at"],
        "id": group["id"],
        "name": group["name"],
        "title": group["title"],
        "description": group["description"],
        "puppet_proxy_id": None,
        "puppet_proxy_name": None,
        "puppet_ca_proxy_id": None,
        "puppet_ca_proxy_name": None,
    }
    if show:
        view["parameters"] = []
        view["puppetclasses"] = [puppetclass_brief(state, i) for i in group["puppetclass_ids"]]
    return view


def domain_view(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "fullname": record["fullname"],
        "dns_id": None,
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
        "id": record["id"],
        "name": record["name"],
    }


def environment_view(record: dict[str, Any]) -> dict[str, Any]:
    return {"name": record["name"], "id": record["id"], "created_at": record["created_at"], "updated_at": record["updated_at"]}


def puppetclass_view(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record["id"],
        "name": record["name"],
        "module_name": module_name(record["name"]),
        "created_at": record["created_at"],
        "updated_at": record["updated_at"],
    }


def classes_by_module(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Foreman's ``Puppetclass.classes2hash_v2``: the index groups classes by module name."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(module_name(record["name"]), []).append(
            {"id": record["id"], "name": record["name"], "created_at": record["created_at"], "updated_at": record["updated_at"]}
        )
    return grouped


def smart_class_parameter_view(state: State, parameter: dict[str, Any]) -> dict[str, Any]:
    """foreman_puppet's ``smart_class_parameters/main`` view (index and show)."""
    klass = state.objects["puppetclasses"][parameter["puppetclass_id"]]
    return {
        "parameter": parameter["parameter"],
        "id": parameter["id"],
        "puppetclass_id": klass["id"],
        "override_values_count": len(state.overrides_of(parameter)),
        "description": parameter["description"],
        "override": parameter["override"],
        "parameter_type": parameter["parameter_type"],
        "hidden_value?": parameter["hidden_value"],
        "omit": parameter["omit"],
        "required": parameter["required"],
        "validator_type": parameter["validator_type"],
        "validator_rule": parameter["validator_rule"],
        "merge_overrides": parameter["merge_overrides"],
        "merge_default": parameter["merge_default"],
        "avoid_duplicates": parameter["avoid_duplicates"],
        "override_value_order": state.lookup_path(parameter),
        "created_at": parameter["created_at"],
        "updated_at": parameter["updated_at"],
        "default_value": parameter["default_value"],
        "puppetclass_name": klass["name"],
    }


def override_value_view(value: dict[str, Any]) -> dict[str, Any]:
    """Foreman's ``override_values/main`` view."""
    return {"id": value["id"], "match": value["match"], "value": value["value"], "omit": value["omit"],
            "created_at": value["created_at"], "updated_at": value["updated_at"]}


def class_parameters(state: State, host: dict[str, Any], class_id: int) -> dict[str, Any] | None:
    """The values the ENC gives one of the host's classes: each overridden smart class parameter
    with the value of its first matcher in its lookup order that matches the host, else its
    default (none when omitted); None when there is none (foreman_puppet's ``PuppetInfo``)."""
    group = state.get("hostgroups", host["hostgroup_id"]) if host["hostgroup_id"] else None
    facts = {"fqdn": host["name"], "hostgroup": group["title"] if group else None}
    values: dict[str, Any] = {}
    for parameter in state.all("smart_class_parameters"):
        if parameter["puppetclass_id"] != class_id or not parameter["override"]:
            continue
        overrides = {v["match"]: v for v in state.overrides_of(parameter)}
        chosen: Any = None if parameter["omit"] else parameter["default_value"]
        for element in state.lookup_path(parameter).split():
            if "," in element or facts.get(element) is None:
                continue  # combined matchers and other facts are beyond the simulator
            found = overrides.get(f"{element}={facts[element]}")
            if found is not None:
                chosen = None if found["omit"] else found["value"]
                break
        if chosen is not None:
            values[parameter["parameter"]] = chosen
    return values or None


def enc_info(state: State, host: dict[str, Any]) -> dict[str, Any]:
    """``Host#info``: the classification Foreman gives Puppet (parameters, classes, environment)."""
    group = state.get("hostgroups", host["hostgroup_id"]) if host["hostgroup_id"] else None
    org = state.get("organizations", host["organization_id"])
    loc = state.get("locations", host["location_id"])
    env = state.get("environments", host["environment_id"]) if host["environment_id"] else None
    domain = state.get("domains", host["domain_id"]) if host["domain_id"] else None
    parameters: dict[str, Any] = {
        "foreman_domain_description": domain["fullname"] if domain else None,
        "hostgroup": group["title"] if group else None,
        "location": loc["name"] if loc else None,
        "location_title": loc["title"] if loc else None,
        "organization": org["name"] if org else None,
        "organization_title": org["title"] if org else None,
        "domainname": domain["name"] if domain else None,
        "comment": host["comment"],
    }
    if env:
        parameters["foreman_env"] = env["name"]
    parameters = {k: v for k, v in parameters.items() if v is not None}
    for param in host["parameters"]:
        parameters[param["name"]] = typed_value(param["parameter_type"], param["value"])
    data: dict[str, Any] = {
        "parameters": parameters,
        # foreman_puppet: classes only when the host has an environment, each with its overridden
        # smart class parameters' values
        "classes": {state.objects["puppetclasses"][i]["name"]: class_parameters(state, host, i)
                    for i in state.all_puppetclass_ids(host)} if env else [],
    }
    if env:
        data["environment"] = env["name"]
    return data


_PLAIN = re.compile(r"^[A-Za-z_/][A-Za-z0-9_:./ -]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~"}


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS and not text.endswith((" ", ":")) and ": " not in text:
        return text
    # a JSON string is a valid YAML double-quoted scalar
    return json.dumps(text)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_yaml_scalar(key)}:")
                lines.extend(_yaml_lines(item, indent + 1 if isinstance(item, dict) else indent))
            else:
                rendered = ("{}" if isinstance(item, dict) else "[]") if isinstance(item, (dict, list)) else _yaml_scalar(item)
                lines.append(f"{pad}{_yaml_scalar(key)}:{' ' + rendered if rendered else ''}")
    else:
        for item in value:
            if isinstance(item, (dict, list)) and item:
                nested = _yaml_lines(item, indent + 1)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                rendered = ("{}" if isinstance(item, dict) else "[]") if isinstance(item, (dict, list)) else _yaml_scalar(item)
                lines.append(f"{pad}- {rendered}".rstrip())
    return lines


def to_yaml(data: dict[str, Any]) -> str:
    """Block-style YAML as Ruby's ``to_yaml`` writes it for the ENC (``---`` first, nil as empty)."""
    return "\n".join(["---", *_yaml_lines(data, 0)]) + "\n"
