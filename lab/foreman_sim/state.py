"""The simulator's in-memory data: Foreman objects as plain dicts, filled from a seed."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any


def now() -> str:
    """A timestamp as Foreman renders one."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class NotFound(Exception):
    """An object looked up by id or name does not exist."""


class State:
    """Every object the simulator knows, by kind and id. Not thread-safe: one event loop owns it."""

    KINDS = (
        "organizations", "locations", "domains", "environments", "architectures",
        "operatingsystems", "puppetclasses", "hostgroups", "hosts", "smart_class_parameters", "override_values",
    )
    #: Foreman's Default_parameters_Lookup_Path setting: the order smart class parameter
    #: overrides are matched in when a parameter has no order of its own
    DEFAULT_LOOKUP_PATH = "fqdn\nhostgroup\nos\ndomain"

    def __init__(self, seed: dict[str, Any], admin: tuple[str, str] | None = None) -> None:
        seed = copy.deepcopy(seed)
        self.version: str = seed.get("foreman_version", "3.13.0")
        self.objects: dict[str, dict[int, dict[str, Any]]] = {kind: {} for kind in self.KINDS}
        self._ids: dict[str, Iterator[int]] = {kind: itertools.count(1) for kind in self.KINDS}
        self._parameter_ids = itertools.count(1)
        self._interface_ids = itertools.count(1)
        #: API users by id: the login given on the command line (an administrator) and the
        #: seed's ``users``, which tests use for users with only some permissions
        self.users: dict[int, dict[str, Any]] = {}
        # db/seeds.d/035-admin.rb: three hidden admins (anonymous, console, API) come first, then
        # the installer's administrator, "Admin User" unless SEED_ADMIN_FIRST/LAST_NAME say otherwise
        self._user_ids = itertools.count(4)
        if admin is not None:
            self.add_user(admin[0], admin[1], admin=True, firstname="Admin", lastname="User")
        for item in seed.get("users", []):
            self.add_user(item["login"], item["password"], admin=bool(item.get("admin", False)),
                          permissions=item.get("permissions", []), firstname=item.get("firstname"),
                          lastname=item.get("lastname"))
        for kind in ("organizations", "locations"):
            for item in seed.get(kind, []):
                self.add(kind, {"name": item["name"], "title": item["name"], "description": item.get("description")})
        for item in seed.get("domains", []):
            self.add("domains", {"name": item["name"], "fullname": item.get("fullname")})
        for item in seed.get("environments", []):
            self.add("environments", {"name": item["name"]})
        for item in seed.get("architectures", []):
            self.add("architectures", {"name": item["name"]})
        for item in seed.get("operatingsystems", []):
            title = item.get("title") or f"{item['name']} {item.get('major', '')}".strip()
            self.add("operatingsystems", {"name": item["name"], "major": item.get("major"), "title": title})
        for item in seed.get("puppetclasses", []):
            names = item.get("environments", [e["name"] for e in self.objects["environments"].values()])
            env_ids = [self.find("environments", n)["id"] for n in names]
            klass = self.add("puppetclasses", {"name": item["name"], "environment_ids": env_ids})
            for parameter in item.get("parameters", []):
                self.add_smart_class_parameter(klass, parameter)
        for item in seed.get("hostgroups", []):
            self.add_hostgroup(item)

    # -- generic ----------------------------------------------------------------------------

    def add(self, kind: str, record: dict[str, Any]) -> dict[str, Any]:
        """Store a new object, giving it an id and timestamps."""
        record = {"id": next(self._ids[kind]), **record, "created_at": now(), "updated_at": now()}
        self.objects[kind][record["id"]] = record
        return record

    def all(self, kind: str) -> list[dict[str, Any]]:
        return list(self.objects[kind].values())

    def get(self, kind: str, ident: Any) -> dict[str, Any] | None:
        """By numeric id only; None if absent."""
        try:
            return self.objects[kind].get(int(ident))
        except (TypeError, ValueError):
            return None

    def find(self, kind: str, ident: Any) -> dict[str, Any]:
        """By id, or by name or title (Foreman's friendly finders); raises :class:`NotFound`."""
        record = self.get(kind, ident) if str(ident).isdigit() else None
        if record is None:
            text = str(ident)
            for candidate in self.objects[kind].values():
                if text in (candidate.get("name"), candidate.get("title")):
                    return candidate
            raise NotFound(text)
        return record

    # -- users ----------------------------------------------------------------------------------

    def add_user(self, login: str, password: str, *, admin: bool, permissions: list[str] | None = None,
                 firstname: str | None = None, lastname: str | None = None) -> dict[str, Any]:
        """An API user. Foreman's ``User#name`` (to_label): first and last name, else the login."""
        user_id = next(self._user_ids)
        name = " ".join(p for p in (firstname or "", lastname or "") if p) or login
        user = {"id": user_id, "login": login, "password": password, "name": name, "admin": admin,
                "permissions": frozenset(permissions or ())}
        self.users[user_id] = user
        return user

    def user_by_login(self, login: str) -> dict[str, Any] | None:
        return next((u for u in self.users.values() if u["login"] == login), None)

    def new_parameter_id(self) -> int:
        return next(self._parameter_ids)

    def new_interface_id(self) -> int:
        return next(self._interface_ids)

    # -- smart class parameters (foreman_puppet's PuppetclassLookupKey) ----------------------

    def add_smart_class_parameter(self, klass: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
        """A class parameter as Foreman's class import makes it: not overridden until an operator
        (or an override value's creation) turns ``override`` on."""
        return self.add("smart_class_parameters", {
            "parameter": item["name"],
            "puppetclass_id": klass["id"],
            "description": item.get("description", ""),
            "override": bool(item.get("override", False)),
            "parameter_type": item.get("parameter_type", "string"),
            "default_value": item.get("default_value"),
            "hidden_value": False,
            "omit": bool(item.get("omit", False)),
            "required": bool(item.get("required", False)),
            "validator_type": item.get("validator_type"),
            "validator_rule": item.get("validator_rule"),
            "merge_overrides": False,
            "merge_default": False,
            "avoid_duplicates": False,
            # None: the Default_parameters_Lookup_Path setting's order
            "path": item.get("override_value_order"),
        })

    def lookup_path(self, parameter: dict[str, Any]) -> str:
        return str(parameter["path"] or self.DEFAULT_LOOKUP_PATH)

    def overrides_of(self, parameter: dict[str, Any]) -> list[dict[str, Any]]:
        return [v for v in self.all("override_values") if v["lookup_key_id"] == parameter["id"]]

    # -- hostgroups -------------------------------------------------------------------------

    def add_hostgroup(self, item: dict[str, Any]) -> dict[str, Any]:
        """A hostgroup from a seed entry: ``{name, parent?: title, environment?, puppetclasses?}``."""
        parent = self.find("hostgroups", item["parent"]) if item.get("parent") else None
        title = f"{parent['title']}/{item['name']}" if parent else item["name"]
        env = self.find("environments", item["environment"])["id"] if item.get("environment") else None
        classes = [self.find("puppetclasses", n)["id"] for n in item.get("puppetclasses", [])]
        return self.add(
            "hostgroups",
            {
                "name": item["name"],
                "title": title,
                "description": item.get("description"),
                "parent_id": parent["id"] if parent else None,
                "environment_id": env,
                "puppetclass_ids": classes,
            },
        )

    def hostgroup_chain(self, hostgroup_id: int | None) -> list[dict[str, Any]]:
        """The hostgroup and its ancestors, nearest first."""
        chain: list[dict[str, Any]] = []
        group = self.get("hostgroups", hostgroup_id) if hostgroup_id else None
        while group is not None:
            chain.append(group)
            group = self.get("hostgroups", group["parent_id"]) if group["parent_id"] else None
        return chain

    def all_puppetclass_ids(self, host: dict[str, Any]) -> list[int]:
        """The host's own classes and those it inherits from its hostgroups, without repeats."""
        ids = list(host["puppetclass_ids"])
        for group in self.hostgroup_chain(host["hostgroup_id"]):
            ids.extend(i for i in group["puppetclass_ids"] if i not in ids)
        return ids
