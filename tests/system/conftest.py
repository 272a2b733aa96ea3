"""A fresh lab per test (vcsim and both simulators start in under a second) and helpers to
read governord's own database the way an outside observer would (read-only), on SQLite or
PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.stack import Governord, Lab

#: a tag whose Satellite system group does not exist, and demo's role that carries it: its hosts'
#: registration can never succeed, and fails only after the machine exists and Foreman has the
#: host (Foreman registers regardless)
BROKEN_ROLE = """
[tags.broken]
description = "maps to a Satellite system group nobody made"
foreman = { hostgroup = "openshift/node", puppet_classes = ["profile::base"] }
satellite = { system_group = "openshift-retired", activation_key = "1-openshift-node" }

[applications.demo.roles.broken]
tags = ["broken"]
provider = "vsphere"
network = "lab"
domain = "lab.example"
name_pattern = "demo-broken-{seq:02d}"
profile = { template = "rhel9-template", cpus = 2, memory_mb = 4096 }
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab(tmp_path / "lab") as the_lab:
        the_lab.start_peers()
        yield the_lab


@pytest.fixture
def governord(lab: Lab) -> Iterator[Governord]:
    daemon = lab.start_governord()
    yield daemon
    daemon.stop()


def db_hosts(daemon: Governord) -> list[dict[str, Any]]:
    """Host rows straight from the daemon's database (read-only: the SQLite file, WAL-aware, or
    its PostgreSQL database through SQLAlchemy; see Governord.db_query)."""
    return daemon.db_rows("hosts")


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)
