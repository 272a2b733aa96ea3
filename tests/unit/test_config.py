"""Strict configuration: the documented example is valid and documents every key; each kind of
mistake stops the daemon with exit 2 naming the file and the key, writing nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from governord import config as cfg
from governord.daemon import prepare, run

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "governord.toml"
SECRETS = {
    "GOVERNORD_VCENTER_PASSWORD": "vc-secret-value",
    "GOVERNORD_FOREMAN_PASSWORD": "fm-secret-value",
    "GOVERNORD_SATELLITE_PASSWORD": "sat-secret-value",
    "GOVERNORD_RHV_PASSWORD": "rhv-secret-value",
    "GOVERNORD_OPENSTACK_PASSWORD": "os-secret-value",
    "GOVERNORD_BMC_PASSWORD": "bmc-secret-value",
    "GOVERNORD_OPENSHIFT_WEBHOOK_SECRET": "hook-secret-value",
    "GOVERNORD_AWS_SECRET_ACCESS_KEY": "aws-secret-value",
}


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)


def test_example_config_is_valid(secrets: None) -> None:
    plugins, config = prepare(str(EXAMPLE))
    assert config.providers["vcenter"].type == "vsphere"
    assert config.tags["node"].mappings["foreman"].hostgroup == "openshift/node"  # type: ignore[attr-defined]
    [vcenter, rhv] = config.placements[("openshift", "node")]
    assert (vcenter.provider, vcenter.cap, rhv.provider, rhv.cap) == ("vcenter", 12, "rhv", 8)
    assert vcenter.profile.template == "rhel9-template"  # type: ignore[attr-defined]


def test_secrets_are_resolved_but_never_shown(secrets: None) -> None:
    _, config = prepare(str(EXAMPLE))
    password = config.registrars["foreman"].password  # type: ignore[attr-defined]
    assert password.reveal() == SECRETS["GOVERNORD_FOREMAN_PASSWORD"]
    shown = repr(config) + str(cfg.redacted(config.registrars["foreman"]))
    assert SECRETS["GOVERNORD_FOREMAN_PASSWORD"] not in shown
    assert "env:GOVERNORD_FOREMAN_PASSWORD" in shown


def _models_in(annotation: object) -> list[type[BaseModel]]:
    """Models an annotation holds, directly or inside list[...], X | None, dict[str, ...]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _fields(model: type[BaseModel]) -> set[str]:
    names = set()
    for name, info in model.model_fields.items():
        names.add(name)
        for inner in _models_in(info.annotation):
            names |= _fields(inner)
    return names


def test_every_key_is_documented_in_the_example(secrets: None) -> None:
    plugins, _ = prepare(str(EXAMPLE))
    text = EXAMPLE.read_text()
    models: list[type[BaseModel]] = [cfg.CoreConfig, cfg.NetworkSection, cfg.RoleSection, cfg.ApplicationSection]
    for name in plugins.providers.names():
        models += [plugins.providers.get(name).Config, plugins.providers.get(name).Profile]  # type: ignore[union-attr]
    for name in plugins.registrars.names():
        models += [plugins.registrars.get(name).Config, plugins.registrars.get(name).TagMapping]  # type: ignore[union-attr]
    missing = sorted(
        f"{m.__name__}.{key}" for m in models for key in _fields(m) if not re.search(rf"\b{key}\b", text)
    )
    assert missing == []


BROKEN = [
    ("unknown top-level key", "[daemon]\nstate_dirr = '/tmp/x'\n", "daemon.state_dirr: unknown key"),
    ("wrong type", "[engine]\nworkers = 'many'\n", "engine.workers: must be an integer, not a string ('many')"),
    ("out of range", "[engine]\nworkers = 0\n", "engine.workers: Input should be greater than or equal to 1"),
    ("bad mode", "[api]\nadmin_socket_mode = '999'\n", "api.admin_socket_mode: not an octal mode"),
    ("provider without type", "[providers.vc]\nurl = 'x'\n", "providers.vc.type: required key is missing"),
    ("unknown provider type", "[providers.vc]\ntype = 'nonesuch'\n", "providers.vc.type: unknown type 'nonesuch'"),
    ("inline secret", "[registrars.fm]\ntype = 'foreman'\nurl = 'https://f'\nusername = 'u'\npassword = 'hunter2'\n"
     "organization = 'o'\nlocation = 'l'\n", "registrars.fm.password: a secret is given by reference"),
    ("unset secret", "[registrars.fm]\ntype = 'foreman'\nurl = 'https://f'\nusername = 'u'\n"
     "password = { env = 'GOVERNORD_TEST_UNSET' }\norganization = 'o'\nlocation = 'l'\n",
     "registrars.fm.password: environment variable GOVERNORD_TEST_UNSET is not set"),
    ("tag for unknown registrar", "[tags.node]\nforeman = { hostgroup = 'x' }\n", "tags.node.foreman: unknown key"),
    ("role names unknown provider",
     "[tags.node]\n[applications.a.roles.node]\ntags = ['node']\nprovider = 'nope'\n",
     "applications.a.roles.node.provider: no provider named 'nope'"),
    ("role names unknown tag",
     "[providers.vc]\ntype='vsphere'\nurl='https://v/sdk'\nusername='u'\npassword={env='GOVERNORD_VCENTER_PASSWORD'}\n"
     "datacenter='DC0'\ncluster='C0'\n[applications.a.roles.node]\ntags = ['nope']\nprovider = 'vc'\n"
     "profile = { template = 't' }\n",
     "applications.a.roles.node.tags: no tag named 'nope'"),
    ("bad profile key",
     "[tags.node]\n[providers.vc]\ntype='vsphere'\nurl='https://v/sdk'\nusername='u'\n"
     "password={env='GOVERNORD_VCENTER_PASSWORD'}\ndatacenter='DC0'\ncluster='C0'\n"
     "[applications.a.roles.node]\ntags = ['node']\nprovider = 'vc'\nprofile = { template = 't', cpu = 2 }\n",
     "applications.a.roles.node.profile.cpu: unknown key"),
    ("address outside network", "[networks.n]\ncidr = '198.51.100.0/24'\nfirst = '10.0.0.1'\n",
     "networks.n.first: 10.0.0.1 is not in 198.51.100.0/24"),
    ("not TOML", "[daemon\n", "not valid TOML"),
]


@pytest.mark.parametrize(("case", "text", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_exits_2_naming_file_and_key(
    tmp_path: Path, secrets: None, capsys: pytest.CaptureFixture[str], case: str, text: str, expected: str
) -> None:
    path = tmp_path / "governord.toml"
    path.write_text(text)
    assert run(str(path), check_only=True) == 2
    err = capsys.readouterr().err
    assert f"{path}: " in err
    assert expected in err


def test_daemon_with_bad_config_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = tmp_path / "governord.toml"
    path.write_text(f"[daemon]\nstate_dir = '{state}'\n[engine]\nretry_limit = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "governord", "--config", str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ},
    )
    assert proc.returncode == 2
    assert f"{path}: engine.retry_limit" in proc.stderr
    assert not state.exists()
