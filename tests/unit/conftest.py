"""An in-process runtime on the in-memory provider and registrar (governord.testing)."""

from __future__ import annotations

import asyncio
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from governord import testing
from governord.config import build_config
from governord.dispatch.pluginmanager import PluginManager
from governord.runtime import Runtime

BASE_CONFIG = """
[daemon]
state_dir = "{state_dir}"
[engine]
workers = 4
retry_backoff = 0.05
retry_backoff_max = 0.2
retry_limit = 2
[networks.lab]
cidr = "198.51.100.0/24"
first = "198.51.100.10"
last = "198.51.100.20"
gateway = "198.51.100.1"
domain = "lab.example"
[providers.mem]
type = "memory"
[registrars.cmdb]
type = "memory"
[tags.node]
description = "OpenShift node"
cmdb = {{ group = "nodes", classes = ["openshift::node"] }}
[tags.broker]
cmdb = {{ group = "brokers", classes = ["openshift::broker"] }}
[applications.demo]
max_hosts = 5
[applications.demo.roles.node]
tags = ["node"]
provider = "mem"
network = "lab"
profile = {{ size = "large" }}
"""


#: the store's backends; a test module that sets ``STORE_BACKENDS = BACKENDS`` runs each of its
#: tests that makes a runtime (or asks for ``store_backend``) once on each
BACKENDS = ("sqlite", "postgresql")
#: where the store's password comes from when the runtime is on PostgreSQL (by reference, as
#: the daemon's config must give it)
PASSWORD_ENV = "GOVERNORD_TEST_DB_PASSWORD"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # elsewhere, no parameter (test ids unchanged): store_backend is SQLite
    backends = getattr(metafunc.module, "STORE_BACKENDS", None)
    if backends is not None and "store_backend" in metafunc.fixturenames:
        metafunc.parametrize("store_backend", backends, indirect=True)


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store_config(store_backend: str, request: pytest.FixtureRequest,
                 monkeypatch: pytest.MonkeyPatch) -> Callable[[], str]:
    """The ``[store]`` section for a new runtime: none on SQLite (the file in the state
    directory); on PostgreSQL a fresh database of the test cluster, its password by reference."""

    made: list[str] = []

    def section() -> str:
        """The same database for every runtime of the test (a restart finds its state)."""
        if store_backend == "sqlite":
            return ""
        if not made:
            url = make_url(request.getfixturevalue("new_postgres_database")())
            monkeypatch.setenv(PASSWORD_ENV, url.password or "")
            bare = url._replace(username=None, password=None).render_as_string(hide_password=False)
            made.append(f'[store]\nurl = "{bare}"\nusername = "{url.username}"\n'
                        f'password = {{ env = "{PASSWORD_ENV}" }}\n')
        return made[0]

    return section


@pytest.fixture
def make_runtime(tmp_path: Path, store_config: Callable[[], str]) -> Callable[..., Any]:
    runtimes: list[Runtime] = []

    async def make(extra: str = "", patch: Callable[[str], str] = lambda text: text, *,
                   instance: str = "test", fleet_options: str = "") -> Runtime:
        """A started runtime; ``instance``: its fleet name (two running at once need two);
        ``fleet_options``: more lines of its ``[fleet]`` section."""
        plugins = PluginManager()
        plugins.register(testing.plugin, "testing")
        plugins.collect_types()
        fleet = f'[fleet]\ninstance = "{instance}"\n{fleet_options}\n'
        raw = tomllib.loads(store_config() + fleet + patch(BASE_CONFIG.format(state_dir=tmp_path / "state")) + extra)
        config = build_config("test.toml", raw, plugins.providers, plugins.registrars, unavailable={})
        runtime = await Runtime.open(config, plugins)
        await runtime.start()
        runtimes.append(runtime)
        return runtime

    yield make
    for fault_table in (testing.MemoryProvider.faults, testing.MemoryRegistrar.faults):
        fault_table.clear()
    testing.MemoryProvider.worlds.clear()
    testing.MemoryRegistrar.worlds.clear()
    testing.MemoryRegistrar.readiness.clear()
    testing.MemoryRegistrar.preauthorise.clear()
    testing.MemoryRegistrar.tokens.clear()
    testing.journal.clear()


@pytest.fixture
async def runtime(make_runtime: Callable[..., Any]) -> AsyncIterator[Runtime]:
    rt = await make_runtime()
    yield rt
    await rt.stop()


async def wait_states(runtime: Runtime, ids: list[str], states: set[str], timeout: float = 10) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await runtime.store.list_hosts(ids=ids)
        if rows and all(r["state"] in states for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"hosts did not reach {states}: {[(r['name'], r['state'], r['error']) for r in rows]}")
        await asyncio.sleep(0.02)
