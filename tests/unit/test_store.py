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


def test_a_direct_fenced_update_returns_what_sqlalchemy_returns(tmp_path: Path) -> None:
    """The engine's fenced update skips SQLAlchemy's execution layer: the row it returns (JSON
    columns decoded, booleans as booleans, SQL expressions evaluated) must be the very row
    SQLAlchemy returns for the same update, and the fence must hold."""
    from sqlalchemy import insert, update

    from governord.engine import READY_UNLESS_RETAGGED
    from governord.schema import hosts

    url = f"sqlite:///{tmp_path / 'g.db'}"
    store.migrate(url)
    engine = create_engine(url)
    base = {"fqdn": "x.example", "app": "a", "role": "r", "origin": "provisioned", "state": "configuring",
            "tags": ["node"], "tags_rev": 3, "addresses": ["10.0.0.5"], "classification": {"cmdb": {"classes": ["a"]}},
            "registrations": {"cmdb": {"id": 7}}, "profile": {"size": "small"}, "retire_requested": True,
            "attempts": 2, "next_attempt_at": 0.0, "created_at": 1.0, "updated_at": 1.0, "lease_owner": "me"}
    values = {"state": READY_UNLESS_RETAGGED, "registrations": {"cmdb": {"id": 8, "token": None}}, "error": None,
              "attempts": 0, "updated_at": 2.5}
    with engine.begin() as conn:
        conn.execute(insert(hosts), [{**base, "id": "direct", "name": "d"}, {**base, "id": "plain", "name": "p"}])
        direct, params = store._fenced_statement(conn.dialect, values)  # noqa: SLF001
        got = direct.first(conn, {**params, "configured_tags_rev": 3, "fence_id": "direct", "fence_owner": "me"})
        expected = conn.execute(
            update(hosts).where(hosts.c.id == "plain", hosts.c.lease_owner == "me")
            .values({**values, "state": READY_UNLESS_RETAGGED}).returning(*hosts.c),
            {"configured_tags_rev": 3},
        ).mappings().one()
        assert got is not None
        assert {**got, "id": "plain", "name": "p"} == dict(expected)
        assert got["state"] == "ready" and got["retire_requested"] is True
        assert got["registrations"] == {"cmdb": {"id": 8, "token": None}}
        # the fence: another owner changes nothing and gets nothing back
        assert direct.first(conn, {**params, "configured_tags_rev": 3, "fence_id": "direct",
                                   "fence_owner": "someone else"}) is None
    engine.dispose()


def test_sequence_numbers_are_read_off_the_names_the_pattern_makes() -> None:
    names = {"shop-node-01", "shop-node-07", "shop-node-123", "shop-broker-02", "other-node-03", "shop-node-x"}
    assert store._sequence_numbers("{app}-{role}-{seq:02d}", "shop", "node", names) == {1, 7, 123}  # noqa: SLF001
    assert store._sequence_numbers("{app}.{role}{seq}", "a", "b", {"a.b5", "aXb6"}) == {5}  # noqa: SLF001
    assert store._sequence_numbers("{app}-{other}-{seq}", "a", "b", {"a-x-1"}) == set()  # noqa: SLF001
