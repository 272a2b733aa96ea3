"""Every URL-valued key of every config model (the core's and each plugin type's, nested models
included) is a :data:`governord.config.ServiceURL`, which refuses ``user:password@`` at load
without repeating the URL: a plugin added later cannot forget it."""

from __future__ import annotations

import re
import typing
from collections.abc import Iterator

from pydantic import AfterValidator, BaseModel

from governord import config as cfg
from governord.dispatch.pluginmanager import PluginManager

#: a key named like this holds a URL
URLISH = re.compile(r"(^|_)(url|uri|endpoint)(_|$)")


def _models_in(annotation: object) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, typing.Any]]:
    """(dotted key, FieldInfo) of ``model`` and the models inside it."""
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        for inner in _models_in(info.annotation):
            yield from _fields(inner, f"{prefix}{name}.")


def _checks_credentials(metadata: typing.Iterable[object]) -> bool:
    return any(isinstance(m, AfterValidator) and m.func is cfg._no_credentials for m in metadata)


def _is_service_url(info: typing.Any) -> bool:
    if _checks_credentials(info.metadata):
        return True
    # inside X | None: Annotated[str, AfterValidator(...)] is one of the union's members
    stack = [info.annotation]
    while stack:
        annotation = stack.pop()
        if typing.get_origin(annotation) is typing.Annotated and _checks_credentials(annotation.__metadata__):
            return True
        stack += typing.get_args(annotation)
    return False


def _config_models() -> dict[str, type[BaseModel]]:
    plugins = PluginManager(disabled=[])
    plugins.load_entry_points()
    plugins.collect_types()
    models: dict[str, type[BaseModel]] = {"core": cfg.CoreConfig}
    for name in plugins.providers.names():
        kind = plugins.providers.get(name)
        models[f"providers type {name}"] = kind.Config  # type: ignore[union-attr]
        models[f"providers type {name} profile"] = kind.Profile  # type: ignore[union-attr]
    for name in plugins.registrars.names():
        kind = plugins.registrars.get(name)
        models[f"registrars type {name}"] = kind.Config  # type: ignore[union-attr]
        models[f"registrars type {name} tag mapping"] = kind.TagMapping  # type: ignore[union-attr]
    return models


def test_every_url_key_of_every_config_model_refuses_credentials() -> None:
    found, offenders = [], []
    for owner, model in _config_models().items():
        for key, info in _fields(model):
            if URLISH.search(key.rsplit(".", 1)[-1]):
                found.append(f"{owner}: {key}")
                if not _is_service_url(info):
                    offenders.append(f"{owner}: {key}")
    assert offenders == [], f"URL keys not typed governord.config.ServiceURL: {offenders}"
    # the plugins shipped: vsphere, ovirt, foreman, satellite, puppetca, puppetdb url; openstack
    # auth_url; ec2 endpoint_url
    assert len(found) >= 8, found


def test_the_check_itself() -> None:
    for bad in ("https://user:pw@foreman.example.com", "https://user@foreman.example.com/x",
                "https:user:pw@foreman", "https://f.example.com/a b", "https://f.example.com/\n"):
        try:
            cfg._no_credentials(bad)
        except ValueError as exc:
            assert "pw" not in str(exc) and "user@" not in str(exc)
        else:
            raise AssertionError(f"{bad!r} was taken")
    for good in ("https://foreman.example.com", "http://127.0.0.1:8080/rpc/api", "https://[::1]:8140",
                 "https://vcenter.example.com/sdk?x=a@b"):
        assert cfg._no_credentials(good) == good
