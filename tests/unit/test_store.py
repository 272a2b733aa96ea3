"""The store's schema: the Alembic migrations build exactly the tables schema.py declares, and
an upgrade keeps existing rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.script import ScriptDirectory
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from governord import store
from governord.schema import metadata

MIGRATIONS = Path(store.__file__).parent / "migrations"


def _alembic(conn: object) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def test_migrations_match_the_declared_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    store.migrate(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    engine.dispose()
    assert diff == []


def test_upgrade_keeps_rows_and_fills_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_alembic(conn), "0001")
    engine.dispose()
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO hosts (id, name, fqdn, origin, state, tags, addresses, classification, registrations, "
            "profile, created_at, updated_at) VALUES ('h1', 'a', 'a.x', 'provisioned', 'ready', '[]', '[]', '{}', "
            "'{}', '{}', 1.0, 42.0)"
        )
    store.migrate(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name, state, state_since, component FROM hosts").fetchall() == [
            ("a", "ready", 42.0, None)]
        head = ScriptDirectory(str(Path(store.__file__).parent / "migrations")).get_current_head()
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == (head,)


def test_the_engines_queue_index_names_exactly_the_resting_states() -> None:
    """The partial index's WHERE is written out literally (SQLite needs the query to repeat it):
    it must exclude exactly the states the engine has no work for."""
    from governord.models import ACTIVE_STATES, HostState
    from governord.schema import WORKING

    resting = {state.value for state in HostState} - {state.value for state in ACTIVE_STATES}
    listed = set(str(WORKING).split("NOT IN (")[1].rstrip(")").replace("'", "").replace(" ", "").split(","))
    assert listed == resting
