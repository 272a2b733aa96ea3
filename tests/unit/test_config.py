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
    # base64, as a TSIG secret is
    "GOVERNORD_DNS_KEY": "ZG5zLXNlY3JldC12YWx1ZQ==",
}


@pytest.fixture
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)


#: a file the example names: a path key, and its value
_FILE_KEY = re.compile(r'\b(?:ca_file|client_cert|client_key) = "(/[^"]+)"')


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The example config with the files it names (CA bundles, client certificate and key),
    which must exist when a config is loaded, made under ``tmp_path``, and its paths there."""
    text = EXAMPLE.read_text()
    paths = {path for line in text.splitlines() if not line.lstrip().startswith("#")
             for path in _FILE_KEY.findall(line)}
    assert len(paths) >= 4, paths  # the BMC's CA and the Puppet CA bundle, client certificate and key
    for path in paths:
        moved = tmp_path / "files" / path.lstrip("/")
        moved.parent.mkdir(parents=True, exist_ok=True)
        moved.write_text("placeholder: only readability is checked at load\n")
        text = text.replace(f'"{path}"', f'"{moved}"')
    copy = tmp_path / "governord.toml"
    copy.write_text(text)
    return copy


def test_example_config_is_valid(secrets: None, example: Path) -> None:
    plugins, config = prepare(str(example))
    assert config.providers["vcenter"].type == "vsphere"
    assert config.tags["node"].mappings["foreman"].hostgroup == "openshift/node"  # type: ignore[attr-defined]
    [vcenter, rhv] = config.placements[("openshift", "node")]
    assert (vcenter.provider, vcenter.cap, rhv.provider, rhv.cap) == ("vcenter", 12, "rhv", 8)
    assert vcenter.profile.template == "rhel9-template"  # type: ignore[attr-defined]


def test_secrets_are_resolved_but_never_shown(secrets: None, example: Path) -> None:
    _, config = prepare(str(example))
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


def test_every_key_is_documented_in_the_example(secrets: None, example: Path) -> None:
    plugins, _ = prepare(str(example))
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
     "applications.a.roles.node.provider: no provider named 'nope' (known: none: add a [providers.NAME] section)"),
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
    # a role's Kubernetes node template: each value as Kubernetes would take it
    *[(f"node template: {what}",
       "[tags.node]\n[providers.vc]\ntype='vsphere'\nurl='https://v/sdk'\nusername='u'\n"
       "password={env='GOVERNORD_VCENTER_PASSWORD'}\ndatacenter='DC0'\ncluster='C0'\n"
       "[applications.a.roles.node]\ntags = ['node']\nprovider = 'vc'\nprofile = { template = 't' }\n"
       f"[applications.a.roles.node.node_template]\n{table}\n", f"applications.a.roles.node.node_template.{message}")
      for what, table, message in (
          ("a quantity Kubernetes cannot parse", "capacity = { cpu = 'four' }",
           "capacity.cpu: 'four' is not a Kubernetes quantity"),
          ("a negative quantity", "capacity = { memory = -1 }", "capacity.memory: must be a quantity"),
          ("a bad resource name", "capacity = { 'gpu/' = 1 }", "capacity.gpu/: not a resource name"),
          ("a bad label key", "labels = { 'Bad_Prefix.example/x' = 'y' }",
           "labels.Bad_Prefix.example/x: not a node label"),
          ("a label value too long", f"labels = {{ zone = '{'z' * 64}' }}", "labels.zone: not a node label"),
          ("an unknown taint effect", "taints = [{ key = 'k', effect = 'NoWay' }]", "taints.0.effect: "),
          ("a taint twice", "taints = [{ key = 'k', effect = 'NoSchedule' }, { key = 'k', effect = 'NoSchedule' }]",
           "taints.1: a second taint k with effect NoSchedule"),
          ("more allocatable than capacity", "capacity = { memory = '8Gi' }\nallocatable = { memory = '9Gi' }",
           "allocatable.memory: 9Gi is more than the capacity 8Gi"),
          ("an unknown key", "lables = {}", "lables: unknown key"),
      )],
    ("address outside network", "[networks.n]\ncidr = '198.51.100.0/24'\nfirst = '10.0.0.1'\n",
     "networks.n.first: 10.0.0.1 is not in 198.51.100.0/24"),
    ("not TOML", "[daemon\n", "not valid TOML"),
    # which certificate field names an application, and its value per application
    ("unknown identity field", "[api.tls]\nidentity = 'email'\n", "api.tls.identity: "),
    ("san-uri without the application's URI", "[api.tls]\nidentity = 'san-uri'\n[applications.a]\n",
     "applications.a.certificate_identity: required with api.tls.identity = 'san-uri'"),
    ("san-uri not a URI", "[api.tls]\nidentity = 'san-uri'\n[applications.a]\ncertificate_identity = 'a b'\n",
     "applications.a.certificate_identity: not a URI like spiffe://"),
    ("san-dns not a DNS name", "[api.tls]\nidentity = 'san-dns'\n[applications.a]\ncertificate_identity = 'a_b'\n",
     "applications.a.certificate_identity: not a DNS name: 'a_b'"),
    ("two applications, one DNS name", "[api.tls]\nidentity = 'san-dns'\n[applications.a]\n"
     "certificate_identity = 'shop.example.com'\n[applications.b]\ncertificate_identity = 'SHOP.example.com'\n",
     "applications.b.certificate_identity: 'shop.example.com' already identifies application a"),
    ("a CN given twice, differently", "[applications.a]\ncertificate_cn = 'a'\ncertificate_identity = 'b'\n",
     "applications.a.certificate_identity: with api.tls.identity = \"cn\" it is the common name"),
    # a plugin's file path, checked when the config is loaded (ReadableFile)
    ("plugin file missing", "[registrars.fm]\ntype = 'foreman'\nurl = 'https://f'\nusername = 'u'\n"
     "password = { env = 'GOVERNORD_FOREMAN_PASSWORD' }\norganization = 'o'\nlocation = 'l'\n"
     "ca_file = '/nonexistent/foreman-ca.pem'\n",
     "registrars.fm.ca_file: cannot read /nonexistent/foreman-ca.pem: No such file or directory"),
    ("plugin file is a directory", "[registrars.pdb]\ntype = 'puppetdb'\nclasses_from = ''\n"
     "client_cert = '/etc/hostname'\nclient_key = '/etc'\n",
     "registrars.pdb.client_key: cannot read /etc: Is a directory"),
    ("plugin file path empty", "[providers.os]\ntype = 'openstack'\nauth_url = 'https://k:5000/v3'\nusername = 'u'\n"
     "password = { env = 'GOVERNORD_OPENSTACK_PASSWORD' }\nproject_name = 'p'\nca_file = ''\n",
     "providers.os.ca_file: an empty path"),
    ("plugin file not a regular file", "[providers.vc]\ntype='vsphere'\nurl='https://v/sdk'\nusername='u'\n"
     "password={env='GOVERNORD_VCENTER_PASSWORD'}\ndatacenter='DC0'\ncluster='C0'\nca_file = '/dev/null'\n",
     "providers.vc.ca_file: cannot read /dev/null: not a regular file"),
    ("nested plugin file missing", "[providers.rack]\ntype = 'baremetal'\n[[providers.rack.machines]]\nname = 'm1'\n"
     "address = '198.51.100.9'\ncpus = 1\nmemory_mb = 1024\nbmc = { protocol = 'redfish', address = 'b', "
     "username = 'u', password = { env = 'GOVERNORD_BMC_PASSWORD' }, ca_file = '/nonexistent/bmc.pem' }\n",
     "providers.rack.machines.0.bmc.ca_file: cannot read /nonexistent/bmc.pem: No such file or directory"),
    # EC2's keys come in pairs: the one missing is named
    ("ec2 key id without secret", "[providers.aws]\ntype = 'ec2'\nregion = 'eu-west-1'\n"
     "access_key_id = 'AKIAEXAMPLEEXAMPLE00'\n",
     "providers.aws.secret_access_key: set access_key_id and secret_access_key together"),
    ("ec2 secret without key id", "[providers.aws]\ntype = 'ec2'\nregion = 'eu-west-1'\n"
     "secret_access_key = { env = 'GOVERNORD_AWS_SECRET_ACCESS_KEY' }\n",
     "providers.aws.access_key_id: set access_key_id and secret_access_key together"),
    # PuppetDB's classes_from names a registrar whose classification has the classes
    ("puppetdb classes from a registrar not configured", "[registrars.pdb]\ntype = 'puppetdb'\nurl = 'http://p:8080'\n",
     "registrars.pdb.classes_from: no registrar named 'foreman' is configured (configured: pdb)"),
    ("puppetdb classes from a misspelt registrar", "[registrars.fm]\ntype = 'foreman'\nurl = 'https://f'\n"
     "username = 'u'\npassword = { env = 'GOVERNORD_FOREMAN_PASSWORD' }\norganization = 'o'\nlocation = 'l'\n"
     "[registrars.pdb]\ntype = 'puppetdb'\nurl = 'http://p:8080'\nclasses_from = 'forman'\n",
     "registrars.pdb.classes_from: no registrar named 'forman' is configured (configured: fm, pdb)"),
    ("puppetdb classes from a registrar without classes", "[registrars.pdb]\ntype = 'puppetdb'\n"
     "url = 'http://p:8080'\nclasses_from = 'pdb'\n",
     "registrars.pdb.classes_from: registrar 'pdb' (type 'puppetdb') lists no puppet_classes"),
    # the store: a password only by reference, never in the URL
    ("store url with a password", "[store]\nurl = 'postgresql+psycopg://governord:hunter2@db:5432/governord'\n",
     "store.url: a URL with a user name or password in it"),
    ("store password inline", "[store]\nurl = 'postgresql://db/governord'\npassword = 'hunter2'\n",
     "store.password: a secret is given by reference"),
    ("store database unsupported", "[store]\nurl = 'mysql://db/governord'\n",
     "store.url: unsupported database 'mysql'"),
    ("store url without a database", "[store]\nurl = 'postgresql+psycopg://db'\n",
     "store.url: a PostgreSQL URL needs a host and a database"),
    ("store user for SQLite", "[store]\nusername = 'governord'\n", "store: username: SQLite has none"),
    ("store password for SQLite", "[store]\npassword = { env = 'GOVERNORD_FOREMAN_PASSWORD' }\n",
     "store: password: SQLite has none"),
    ("store pool too small", "[store]\npool_size = 0\n", "store.pool_size: Input should be greater than or equal to 1"),
    ("revocations refreshed in the past", "[store]\nrevocation_refresh = -1\n",
     "store.revocation_refresh: Input should be greater than or equal to 0"),
    # [drain.command] drains only configured applications' hosts, and only where they drain
    ("drain command for an unknown application", "[drain.command]\nargv = ['/bin/true']\napplications = ['shop']\n",
     "drain.command.applications.0: no application named 'shop' (configured: none)"),
    ("drain command for an application that does not drain",
     "[drain.command]\nargv = ['/bin/true']\napplications = ['shop']\n[applications.shop]\nmax_hosts = 1\n",
     "drain.command.applications.0: application 'shop' has no [applications.shop.drain] section"),
    ("health probes without a timeout", "[health]\ntimeout = 0\n", "health.timeout: Input should be greater than 0"),
]


@pytest.mark.parametrize("registrars", [
    "[registrars.pdb]\ntype = 'puppetdb'\nurl = 'http://p:8080'\nclasses_from = ''\n",
    "[registrars.foreman]\ntype = 'foreman'\nurl = 'https://f'\nusername = 'u'\n"
    "password = { env = 'GOVERNORD_FOREMAN_PASSWORD' }\norganization = 'o'\nlocation = 'l'\n"
    "[registrars.pdb]\ntype = 'puppetdb'\nurl = 'http://p:8080'\n",
], ids=["no class check", "classes from foreman"])
def test_puppetdb_classes_from_a_configured_foreman_or_nothing_is_valid(
    tmp_path: Path, secrets: None, registrars: str
) -> None:
    path = tmp_path / "governord.toml"
    path.write_text(registrars)
    assert run(str(path), check_only=True) == 0


def test_the_example_as_shipped_names_files_this_machine_lacks(secrets: None) -> None:
    """etc/governord.toml names files under /etc that a test machine does not have: loading it
    as it is stops at the first of them, named by its key."""
    if Path("/etc/governord/puppet/ca.pem").exists() or Path("/etc/pki/bmc-ca.pem").exists():
        pytest.skip("this machine has the example's files")
    with pytest.raises(cfg.ConfigError) as caught:
        prepare(str(EXAMPLE))
    assert caught.value.key == "providers.rack1.machines.1.bmc.ca_file"
    assert caught.value.message == "cannot read /etc/pki/bmc-ca.pem: No such file or directory"


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


#: every plugin's URL key with credentials in it: (section, the rest of the section, key)
URL_WITH_CREDENTIALS = [
    ("providers.vc", "type='vsphere'\nusername='u'\npassword={env='GOVERNORD_VCENTER_PASSWORD'}\n"
     "datacenter='DC0'\ncluster='C0'\n", "url", "https://administrator:{pw}@vcenter.example.com/sdk"),
    ("providers.rhv", "type='ovirt'\nusername='u@internal'\npassword={env='GOVERNORD_RHV_PASSWORD'}\n"
     "cluster='Default'\n", "url", "https://admin%40internal:{pw}@engine.example.com/ovirt-engine/api"),
    ("providers.os", "type='openstack'\nusername='u'\npassword={env='GOVERNORD_OPENSTACK_PASSWORD'}\n"
     "project_name='p'\n", "auth_url", "https://u:{pw}@keystone.example.com:5000/v3"),
    ("providers.aws", "type='ec2'\nregion='eu-west-1'\n", "endpoint_url", "http://AKIA:{pw}@127.0.0.1:5000"),
    ("registrars.fm", "type='foreman'\nusername='u'\npassword={env='GOVERNORD_FOREMAN_PASSWORD'}\n"
     "organization='o'\nlocation='l'\n", "url", "https://admin:{pw}@foreman.example.com"),
    ("registrars.sat", "type='satellite'\nusername='u'\npassword={env='GOVERNORD_SATELLITE_PASSWORD'}\n",
     "url", "https://admin:{pw}@satellite.example.com/rpc/api"),
    ("registrars.ca", "type='puppetca'\nclient_cert='/etc/hostname'\nclient_key='/etc/hostname'\n", "url",
     "https://puppet:{pw}@puppet.example.com:8140"),
    ("registrars.pdb", "type='puppetdb'\nclasses_from=''\n", "url", "http://{pw}@puppetdb.example.com:8080"),
    ("registrars.pdb", "type='puppetdb'\nclasses_from=''\n", "url", "https:puppetdb:{pw}@puppetdb.example.com"),
]


@pytest.mark.parametrize(("section", "rest", "key", "url"), URL_WITH_CREDENTIALS,
                         ids=[f"{c[0]}.{c[2]}-{i}" for i, c in enumerate(URL_WITH_CREDENTIALS)])
def test_a_url_with_credentials_is_refused_and_not_repeated(
    tmp_path: Path, secrets: None, capsys: pytest.CaptureFixture[str], section: str, rest: str, key: str, url: str
) -> None:
    password = "hunter2-in-the-url"
    path = tmp_path / "governord.toml"
    path.write_text(f"[{section}]\n{rest}{key} = '{url.format(pw=password)}'\n")
    assert run(str(path), check_only=True) == 2
    err = capsys.readouterr().err
    assert f"{path}: {section}.{key}: a URL with a user name or password in it" in err, err
    assert password not in err
    if "//" in url:  # the same URL without the credentials is taken
        path.write_text(f"[{section}]\n{rest}{key} = '{re.sub(r'//[^/]*@', '//', url.format(pw=password))}'\n")
        assert run(str(path), check_only=True) == 0, capsys.readouterr().err


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


def test_a_store_url_with_a_password_is_refused_without_showing_it(
    tmp_path: Path, secrets: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "governord.toml"
    path.write_text("[store]\nurl = 'postgresql://governord:hunter2@db.example.com/governord'\n")
    assert run(str(path), check_only=True) == 2
    err = capsys.readouterr().err
    assert f"{path}: store.url" in err and "hunter2" not in err


def test_the_store_password_comes_by_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVERNORD_TEST_DB_PASSWORD", "s3cret/with:odd@chars")
    section = cfg.StoreSection.model_validate({"url": "postgresql://db.example.com:5433/gov", "username": "governord",
                                               "password": {"env": "GOVERNORD_TEST_DB_PASSWORD"}})
    from sqlalchemy.engine import make_url

    url = make_url(section.effective_url(tmp_path))
    assert url.drivername == "postgresql+psycopg" and url.password == "s3cret/with:odd@chars"
    assert (url.host, url.port, url.database, url.username) == ("db.example.com", 5433, "gov", "governord")
    assert "s3cret" not in repr(section)
    assert cfg.StoreSection().effective_url(tmp_path) == f"sqlite:///{tmp_path / 'governord.db'}"


def test_a_changed_store_takes_effect_at_the_next_restart(tmp_path: Path) -> None:
    import tomllib

    from governord.daemon import _restart_only
    from governord.providers import ProviderRegistry
    from governord.registrars import RegistrarRegistry

    def config(extra: str) -> cfg.Config:
        raw = tomllib.loads(f"[daemon]\nstate_dir = '{tmp_path}'\n" + extra)
        return cfg.build_config("g.toml", raw, ProviderRegistry(), RegistrarRegistry(), unavailable={})

    sqlite = config("")
    postgres = config("[store]\nurl = 'postgresql://db.example.com/governord'\n")
    assert _restart_only(sqlite, postgres) == ["store"]
    assert _restart_only(sqlite, config("")) == []
    # how long revocations are kept in memory is taken on reload (Runtime.reload)
    assert _restart_only(sqlite, config("[store]\nrevocation_refresh = 0.5\n")) == []
    assert config("").core.store.revocation_refresh == 2.0
