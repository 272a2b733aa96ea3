"""Every registrar type declares what of its records an application may see
(``Registrar.application_keys``), explicitly: the split between the application's view and the
operators' (and the machine's) is a decision each type makes, never a default it inherits."""

from __future__ import annotations

import importlib.metadata

import pytest

from governord import testing
from governord.registrars import Registrar, RegistrarRegistry, application_view, declared_keys


def _entry_point_types() -> list[tuple[str, str]]:
    found = []
    for ep in importlib.metadata.entry_points(group="governord"):
        registry = RegistrarRegistry()
        hook = getattr(ep.load(), "governord_register_registrars", None)
        if hook is not None:
            hook(registry=registry)
        found += [(ep.name, name) for name in registry.names()]
    return found


TYPES = _entry_point_types()


def test_the_bundled_registrars_are_all_found() -> None:
    assert {name for _, name in TYPES} >= {"foreman", "satellite", "puppetca", "puppetdb"}


def _declaring_class(cls: type[Registrar]) -> type | None:
    """The class below Registrar in ``cls``'s MRO that declares application_keys itself."""
    for klass in cls.__mro__:
        if klass is Registrar:
            return None
        if "application_keys" in vars(klass):
            return klass
    return None


@pytest.mark.parametrize(("plugin", "type_name"), TYPES)
def test_every_entry_point_registrar_declares_its_application_keys(plugin: str, type_name: str) -> None:
    registry = RegistrarRegistry()
    importlib.metadata.entry_points(group="governord")[plugin].load().governord_register_registrars(registry=registry)
    cls = registry.load(type_name)  # the class itself (its SDK imported), not the lazy entry
    assert _declaring_class(cls) is not None, f"{cls.__qualname__} ({plugin}) does not declare application_keys"
    keys = vars(_declaring_class(cls))["application_keys"]
    assert isinstance(keys, frozenset) and all(isinstance(k, str) and k for k in keys), keys
    # nothing that is a secret by its name
    assert not {k for k in keys if any(word in k for word in ("token", "key", "password", "secret", "cloud_config"))}


def test_the_test_registrars_declare_theirs_too() -> None:
    for cls in (testing.MemoryRegistrar, testing.MemoryLateRegistrar):
        assert _declaring_class(cls) is not None


def test_a_registrar_that_declares_nothing_shows_applications_nothing() -> None:
    class Undeclared(testing.MemoryRegistrar):
        pass

    bare = type("Bare", (Registrar,), {"type_name": "bare"})
    assert declared_keys(bare) == frozenset()
    assert application_view({"name": "x", "autosign_token": "t"}, declared_keys(bare)) == {}
    assert application_view({"name": "x", "autosign_token": "t"}, None) == {}
    assert Undeclared.application_view({"name": "x", "autosign_token": "t", "group": "g"}) == {"name": "x", "group": "g"}
    assert testing.MemoryRegistrar.application_view("not a record") == {}
