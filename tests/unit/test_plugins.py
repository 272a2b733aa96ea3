"""Plugin loading: a misspelled hook stops start-up; a plugin whose import fails is reported and
is fatal only where the config uses it; the dispatcher attributes results and failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from governord import hookimpl
from governord.dispatch import Dispatcher
from governord.dispatch.pluginmanager import PluginLoadError, PluginManager
from governord.errors import PermanentError, RetryableError

ROOT = Path(__file__).resolve().parents[2]


def _fake_distribution(site: Path, name: str, entry_points: str) -> None:
    """A distribution on sys.path that importlib.metadata finds, with governord entry points."""
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[governord]\n{entry_points}\n")


def _check(site: Path, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "governord", "--check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_misspelled_hook_fails_startup(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "typo_plugin.py").write_text(textwrap.dedent("""
        from governord import hookimpl
        @hookimpl
        def governord_provison_host(host, spec):
            return None
    """))
    _fake_distribution(site, "typo_plugin", "typo = typo_plugin")
    config = tmp_path / "governord.toml"
    config.write_text("")
    proc = _check(site, config)
    assert proc.returncode == 2
    assert "plugin typo" in proc.stderr and "governord_provison_host" in proc.stderr


def test_plugin_that_fails_to_import_is_fatal_only_when_used(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "openstack_plugin", "nimbus = no_such_sdk_module_here")
    unused = tmp_path / "unused.toml"
    unused.write_text("")
    proc = _check(site, unused)
    assert proc.returncode == 0, proc.stderr
    used = tmp_path / "used.toml"
    used.write_text("[providers.cloud]\ntype = 'nimbus'\n")
    proc = _check(site, used)
    assert proc.returncode == 2
    assert f"{used}: providers.cloud.type: type 'nimbus' is unavailable: ModuleNotFoundError" in proc.stderr


def test_plugin_whose_sdk_import_fails_at_registration_is_unavailable_not_fatal(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "lazy_plugin.py").write_text(textwrap.dedent("""
        from governord import hookimpl
        @hookimpl
        def governord_register_providers(registry):
            import no_such_vendor_sdk  # the SDK is imported only when the type is registered
    """))
    _fake_distribution(site, "lazy_plugin", "rhvx = lazy_plugin")
    unused = tmp_path / "unused.toml"
    unused.write_text("")
    assert _check(site, unused).returncode == 0
    used = tmp_path / "used.toml"
    used.write_text("[providers.rhv]\ntype = 'rhvx'\n")
    proc = _check(site, used)
    assert proc.returncode == 2
    assert "providers.rhv.type: type 'rhvx' is unavailable: ModuleNotFoundError" in proc.stderr


#: what the plugins' modules import: none of it may be imported by registering their types
SDK_MODULES = ("boto3", "botocore", "openstack", "keystoneauth1", "ovirtsdk4", "pycurl", "pyVmomi", "pyVim",
               "apypie", "requests", "pypuppetdb", "sushy", "pyghmi", "xmlrpc")


def _fresh(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_registering_every_plugin_imports_no_sdk(tmp_path: Path) -> None:
    """Registering the types imports their config models only; a config that uses one type
    imports that type's SDK, at load, and no other."""
    config = tmp_path / "governord.toml"
    config.write_text(textwrap.dedent(f"""
        [daemon]
        state_dir = "{tmp_path / 'state'}"
        [providers.aws]
        type = "ec2"
        region = "eu-west-1"
    """))
    proc = _fresh(f"""
        import json, sys
        from governord.config import load_config
        from governord.dispatch.pluginmanager import PluginManager
        sdks = {SDK_MODULES!r}
        imported = lambda: sorted({{m.split(".")[0] for m in sys.modules}} & set(sdks))
        plugins = PluginManager()
        plugins.load_entry_points()
        plugins.collect_types()
        registered = imported()
        load_config({str(config)!r}, plugins.providers, plugins.registrars, unavailable=plugins.unavailable_types())
        print(json.dumps({{"types": plugins.providers.names() + plugins.registrars.names(),
                          "unavailable": plugins.unavailable_types(),
                          "after_registering": registered, "after_loading": imported()}}))
    """)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["unavailable"] == {}
    assert set(seen["types"]) >= {"baremetal", "ec2", "openstack", "ovirt", "vsphere",
                                  "foreman", "puppetca", "puppetdb", "satellite"}
    assert seen["after_registering"] == []
    assert seen["after_loading"] == ["boto3", "botocore"]


LAZY_PLUGIN = """
    from governord import hookimpl
    from governord.providers import LazyProvider, ProviderConfig

    class RhvConfig(ProviderConfig):
        pass

    @hookimpl
    def governord_register_providers(registry):
        registry.add(LazyProvider("rhvx", "lazy_rhvx_provider:RhvProvider", Config=RhvConfig, requires={requires}))
"""


def test_lazy_type_whose_sdk_is_not_installed_is_unavailable_at_registration(tmp_path: Path) -> None:
    """A lazy type names the modules it needs; one that is not installed makes the plugin
    unavailable at registration, without importing anything, as an eager import would."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "lazy_rhvx.py").write_text(textwrap.dedent(LAZY_PLUGIN.format(requires='["no_such_vendor_sdk"]')))
    _fake_distribution(site, "lazy_rhvx", "rhvx = lazy_rhvx")
    unused = tmp_path / "unused.toml"
    unused.write_text("")
    assert _check(site, unused).returncode == 0
    used = tmp_path / "used.toml"
    used.write_text("[providers.rhv]\ntype = 'rhvx'\n")
    proc = _check(site, used)
    assert proc.returncode == 2
    assert f"{used}: providers.rhv.type: type 'rhvx' is unavailable: ModuleNotFoundError: " in proc.stderr
    assert "no_such_vendor_sdk" in proc.stderr


@pytest.mark.parametrize("mode", [["--check"], []])
def test_lazy_type_whose_sdk_fails_to_import_stops_the_daemon_at_config_load(tmp_path: Path, mode: list[str]) -> None:
    """The SDK is installed but its import fails (a broken C extension): registering the type
    does not notice, a config that does not use it is fine, and one that uses it stops the
    daemon at config load, exit 2 naming the section's type, with nothing written."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "lazy_rhvx.py").write_text(textwrap.dedent(LAZY_PLUGIN.format(requires="[]")))
    (site / "lazy_rhvx_provider.py").write_text("raise ImportError('libxml2.so.2: cannot open shared object file')\n")
    _fake_distribution(site, "lazy_rhvx", "rhvx = lazy_rhvx")
    work = tmp_path / "work"
    work.mkdir()
    settings = f'[daemon]\nstate_dir = "{work / "state"}"\n[api]\nport = 0\nadmin_socket = "{work / "admin.sock"}"\n'
    unused = tmp_path / "unused.toml"
    unused.write_text(settings)
    assert _check(site, unused).returncode == 0
    used = tmp_path / "used.toml"
    used.write_text(settings + "[providers.rhv]\ntype = 'rhvx'\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-m", "governord", *mode, "--config", str(used)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert (f"{used}: providers.rhv.type: type 'rhvx' is unavailable: ImportError: "
            "libxml2.so.2: cannot open shared object file") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(work.iterdir()) == []  # nothing written


def test_disabled_plugin_is_reported_not_loaded() -> None:
    plugins = PluginManager(disabled=["satellite"])
    plugins.load_entry_points()
    status = {p["name"]: p for p in plugins.describe()}
    assert status["satellite"]["loaded"] is False
    assert status["satellite"]["error"] == "disabled by configuration"
    assert status["vsphere"]["loaded"] is True


class _Answer:
    def __init__(self, value: object) -> None:
        self.value = value

    @hookimpl
    async def governord_deprovision_host(self, host: object) -> object:
        return self.value


class _Boom:
    def __init__(self, error: Exception) -> None:
        self.error = error

    @hookimpl(tryfirst=True)
    def governord_deregister_host(self, host: object) -> None:
        raise self.error


class _Quiet:
    @hookimpl
    async def governord_deregister_host(self, host: object) -> None:
        return None


async def test_first_mode_skips_none_and_names_the_answering_plugin() -> None:
    plugins = PluginManager()
    plugins.register(_Answer(True), "answers")
    plugins.register(_Answer(None), "passes")  # registered last: called first, returns None
    outcome = await Dispatcher(plugins.pm, timeout=5).first("governord_deprovision_host", host=None)
    assert outcome.plugin == "answers" and outcome.value is True


async def test_broadcast_runs_everyone_and_names_each_failure() -> None:
    plugins = PluginManager()
    plugins.register(_Boom(RetryableError("foreman down")), "foreman")
    plugins.register(_Quiet(), "quiet")
    plugins.register(_Boom(RetryableError("satellite down")), "satellite")
    dispatcher = Dispatcher(plugins.pm, timeout=5)
    seen: list[tuple[str, str, bool]] = []
    dispatcher.on_call.append(lambda hook, plugin, _kwargs, outcome: seen.append((hook, plugin, outcome.ok)))
    with pytest.raises(RetryableError) as caught:
        await dispatcher.broadcast("governord_deregister_host", host=None)
    assert "foreman: foreman down" in str(caught.value) and "satellite: satellite down" in str(caught.value)
    # every call reported, each with its outcome (the metrics count them)
    assert sorted(seen) == [("governord_deregister_host", "foreman", False),
                            ("governord_deregister_host", "quiet", True),
                            ("governord_deregister_host", "satellite", False)]
    # one permanent failure makes the whole step permanent
    plugins.register(_Boom(PermanentError("bad hostgroup")), "strict")
    with pytest.raises(PermanentError):
        await dispatcher.broadcast("governord_deregister_host", host=None)


async def test_a_hanging_plugin_times_out_as_retryable() -> None:
    import asyncio

    class Slow:
        @hookimpl
        async def governord_deregister_host(self, host: object) -> None:
            await asyncio.sleep(10)

    plugins = PluginManager()
    plugins.register(Slow(), "slow")
    with pytest.raises(RetryableError, match="slow: governord_deregister_host took longer than 0.1s"):
        await Dispatcher(plugins.pm, timeout=0.1).broadcast("governord_deregister_host", host=None)


def test_invalid_plugin_object_is_refused() -> None:
    class Typo:
        @hookimpl
        def governord_register_hots(self, host: object) -> None:
            return None

    plugins = PluginManager()
    with pytest.raises(PluginLoadError, match="governord_register_hots"):
        plugins.register(Typo(), "typo")
