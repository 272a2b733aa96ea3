"""A fresh lab per test (vcsim and both simulators start in under a second) and helpers to
read governord's own database the way an outside observer would (read-only)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.stack import Governord, Lab


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
    """Host rows straight from the SQLite file (read-only, WAL-aware)."""
    conn = sqlite3.connect(f"file:{daemon.state_dir / 'governord.db'}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM hosts")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)
