"""The store's schema: the Alembic migrations build exactly the tables schema.py declares, and
an upgrade keeps existing rows.

The tests that take ``new_url`` run on SQLite and on PostgreSQL; those that read a SQLite file
with the sqlite3 module (an upgrade from an old revision) are SQLite's own: the same migrations
serve PostgreSQL, where no database has an old revision to upgrade from yet."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from governord import store
from governord.store.schema import metadata

from .conftest import BACKENDS

#: every test here that makes a runtime runs on SQLite and on PostgreSQL (tests/unit/conftest.py)
STORE_BACKENDS = BACKENDS

MIGRATIONS = Path(store.__file__).parent / "migrations"


@pytest.fixture
def new_url(store_backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Makes new empty databases of the backend; each one's synchronous URL."""

    def make(name: str) -> str:
        if store_backend == "sqlite":
            return f"sqlite:///{tmp_path / name}.db"
        return str(request.getfixturevalue("new_postgres_database")())

    return make


def _triggers(conn: Any, prefix: str) -> list[Any]:
    """The definitions of the triggers named ``prefix...`` (and on PostgreSQL of their functions)."""
    if conn.dialect.name == "sqlite":
        return conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                                    f"AND name LIKE '{prefix}%' ORDER BY name").fetchall()
    like = {"like": prefix + "%"}
    triggers = conn.execute(text("SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
                                 "WHERE tgname LIKE :like ORDER BY tgname"), like).fetchall()
    functions = conn.execute(text("SELECT proname, prosrc FROM pg_proc WHERE proname LIKE :like ORDER BY proname"),
                             like).fetchall()
    assert len(functions) == 1
    return triggers + functions


def _alembic(conn: object) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def test_migrations_match_the_declared_schema(new_url: Callable[[str], str]) -> None:
    url = new_url("g")
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
    from governord.store.schema import WORKING

    resting = {state.value for state in HostState} - {state.value for state in ACTIVE_STATES}
    listed = set(str(WORKING).split("NOT IN (")[1].rstrip(")").replace("'", "").replace(" ", "").split(","))
    assert listed == resting


def test_a_direct_fenced_update_returns_what_sqlalchemy_returns(new_url: Callable[[str], str]) -> None:
    """The engine's fenced update skips SQLAlchemy's execution layer on SQLite: the row it
    returns (JSON columns decoded, booleans as booleans, SQL expressions evaluated) must be the
    very row SQLAlchemy returns for the same update, and the fence must hold. (On PostgreSQL the
    statement runs through SQLAlchemy itself; the fence is checked all the same.)"""
    from sqlalchemy import insert, update

    from governord.engine import READY_UNLESS_RETAGGED
    from governord.store.schema import hosts

    url = new_url("g")
    store.migrate(url)
    engine = create_engine(url)
    base = {"fqdn": "x.example", "app": "a", "role": "r", "origin": "provisioned", "state": "configuring",
            "tags": ["node"], "tags_rev": 3, "addresses": ["10.0.0.5"], "classification": {"cmdb": {"classes": ["a"]}},
            "registrations": {"cmdb": {"id": 7}}, "profile": {"size": "small"}, "retire_requested": True,
            "attempts": 2, "next_attempt_at": 0.0, "created_at": 1.0, "updated_at": 1.0, "lease_owner": "me"}
    values = {"state": READY_UNLESS_RETAGGED, "registrations": {"cmdb": {"id": 8, "token": None}}, "error": None,
              "attempts": store._FIRST_TRY_UNLESS_RETIRING, "updated_at": 2.5}  # noqa: SLF001
    with engine.begin() as conn:
        conn.execute(insert(hosts), [{**base, "id": "direct", "name": "d"}, {**base, "id": "plain", "name": "p"}])
        direct, params = store._fenced_statement(conn.dialect, values)  # noqa: SLF001
        got = direct.first(conn, {**params, "configured_tags_rev": 3, "fence_id": "direct", "fence_owner": "me",
                                  "fence_token": 0})
        expected = conn.execute(
            update(hosts).where(hosts.c.id == "plain", hosts.c.lease_owner == "me", hosts.c.lease_token == 0)
            .values({**values, "state": READY_UNLESS_RETAGGED}).returning(*hosts.c),
            {"configured_tags_rev": 3},
        ).mappings().one()
        assert got is not None
        assert {**got, "id": "plain", "name": "p"} == dict(expected)
        assert got["state"] == "ready" and got["retire_requested"] is True and got["attempts"] == 0
        assert got["registrations"] == {"cmdb": {"id": 8, "token": None}}
        # the fence: another owner changes nothing and gets nothing back, nor does a stale token
        assert direct.first(conn, {**params, "configured_tags_rev": 3, "fence_id": "direct",
                                   "fence_owner": "someone else", "fence_token": 0}) is None
        assert direct.first(conn, {**params, "configured_tags_rev": 3, "fence_id": "direct",
                                   "fence_owner": "me", "fence_token": -1}) is None
    engine.dispose()


def test_sequence_numbers_are_read_off_the_names_the_pattern_makes() -> None:
    names = {"shop-node-01", "shop-node-07", "shop-node-123", "shop-broker-02", "other-node-03", "shop-node-x"}
    assert store._sequence_numbers("{app}-{role}-{seq:02d}", "shop", "node", names) == {1, 7, 123}  # noqa: SLF001
    assert store._sequence_numbers("{app}.{role}{seq}", "a", "b", {"a.b5", "aXb6"}) == {5}  # noqa: SLF001
    assert store._sequence_numbers("{app}-{other}-{seq}", "a", "b", {"a-x-1"}) == set()  # noqa: SLF001


def _host(i: int, **values: object) -> dict[str, object]:
    return {"id": f"h{i}", "name": f"shop-node-{i:02d}", "seq": i, "fqdn": f"shop-node-{i:02d}.x", "app": "shop",
            "role": "node", "provider": "mem", "origin": "provisioned", "state": "requested", "tags": [],
            "addresses": [], "classification": {}, "registrations": {}, "profile": {}, "created_at": 1.0,
            "updated_at": 1.0, **values}


def _counted(conn: object) -> dict[tuple[str, str, str], int]:
    rows = conn.exec_driver_sql("SELECT app, role, provider, sum(hosts) FROM live_counts GROUP BY app, role, provider "
                                "HAVING sum(hosts) != 0")  # type: ignore[attr-defined]
    return {(a, r, p): n for a, r, p, n in rows}


def _actual(conn: object) -> dict[tuple[str, str, str], int]:
    rows = conn.exec_driver_sql(  # type: ignore[attr-defined]
        "SELECT app, coalesce(role, ''), coalesce(provider, ''), count(*) FROM hosts "
        "WHERE app IS NOT NULL AND state != 'gone' GROUP BY 1, 2, 3")
    return {(a, r, p): n for a, r, p, n in rows}


def test_live_counts_follow_every_change_of_the_hosts(new_url: Callable[[str], str]) -> None:
    """The triggers keep live_counts equal to counting the hosts, through inserts, transitions,
    moves between applications, roles and providers, adoption (no application) and deletes, in
    a database built by the migrations and in one built from schema.py alone."""
    import random

    from sqlalchemy import delete, insert, update

    from governord.store.schema import hosts

    rng = random.Random(7)
    migrated_url = new_url("migrated")
    store.migrate(migrated_url)
    migrated = create_engine(migrated_url)
    declared = create_engine(new_url("declared"))
    metadata.create_all(declared)
    for engine in (migrated, declared):
        with engine.begin() as conn:
            conn.execute(insert(hosts), [_host(i, app=rng.choice(["shop", "blog", None]),
                                               state=rng.choice(["requested", "ready", "gone"])) for i in range(60)])
            assert _counted(conn) == _actual(conn) and _actual(conn)
            for _ in range(300):
                i = rng.randrange(60)
                change = rng.choice(["state", "app", "role", "provider", "delete", "other"])
                if change == "delete":
                    conn.execute(delete(hosts).where(hosts.c.id == f"h{i}"))
                    conn.execute(insert(hosts), [_host(i, state=rng.choice(["requested", "gone"]))])
                    continue
                value = {"state": rng.choice(["requested", "provisioning", "ready", "failed", "gone"]),
                         "app": rng.choice(["shop", "blog", None]), "role": rng.choice(["node", "broker", None]),
                         "provider": rng.choice(["mem", "vs", None]), "other": None}[change]
                column = "error" if change == "other" else change
                conn.execute(update(hosts).where(hosts.c.id == f"h{i}").values({column: value}))
                assert _counted(conn) == _actual(conn), (change, value)
        engine.dispose()
    with migrated.connect() as a, declared.connect() as b:
        assert _triggers(a, "hosts_live_count") == _triggers(b, "hosts_live_count")
        assert len([t for t in _triggers(a, "hosts_live_count") if t[0].endswith(("_insert", "_update", "_delete"))]) == 3
    migrated.dispose()
    declared.dispose()


def _counted_states(conn: object) -> dict[str, int]:
    rows = conn.exec_driver_sql("SELECT state, sum(hosts) FROM state_counts GROUP BY state HAVING sum(hosts) != 0")  # type: ignore[attr-defined]
    return dict(rows.fetchall())


def _actual_states(conn: object) -> dict[str, int]:
    rows = conn.exec_driver_sql("SELECT state, count(*) FROM hosts GROUP BY state")  # type: ignore[attr-defined]
    return dict(rows.fetchall())


def test_state_counts_follow_every_change_of_the_hosts(new_url: Callable[[str], str]) -> None:
    """The triggers keep state_counts (what /metrics and /v1/status serve) equal to counting the
    hosts by state, through inserts, many random transitions, other updates and deletes, in a
    database built by the migrations and in one built from schema.py alone."""
    import random

    from sqlalchemy import delete, insert, update

    from governord.models import HostState
    from governord.store.schema import hosts

    states = [s.value for s in HostState]
    rng = random.Random(11)
    migrated_url = new_url("migrated")
    store.migrate(migrated_url)
    migrated = create_engine(migrated_url)
    declared = create_engine(new_url("declared"))
    metadata.create_all(declared)
    for engine in (migrated, declared):
        with engine.begin() as conn:
            conn.execute(insert(hosts), [_host(i, state=rng.choice(states)) for i in range(80)])
            assert _counted_states(conn) == _actual_states(conn)
            for step in range(600):
                i = rng.randrange(80)
                change = rng.choice(["state", "state", "state", "many", "other", "delete"])
                if change == "delete":
                    conn.execute(delete(hosts).where(hosts.c.id == f"h{i}"))
                    conn.execute(insert(hosts), [_host(i, state=rng.choice(states))])
                elif change == "many":  # one statement moving several hosts, some already there
                    conn.execute(update(hosts).where(hosts.c.id.in_([f"h{j}" for j in rng.sample(range(80), 5)]))
                                 .values(state=rng.choice(states)))
                elif change == "other":
                    conn.execute(update(hosts).where(hosts.c.id == f"h{i}").values(error=f"e{step}"))
                else:
                    conn.execute(update(hosts).where(hosts.c.id == f"h{i}").values(state=rng.choice(states)))
                assert _counted_states(conn) == _actual_states(conn), (step, change)
        engine.dispose()
    with migrated.connect() as a, declared.connect() as b:
        assert _triggers(a, "hosts_state_count") == _triggers(b, "hosts_state_count")
        assert len([t for t in _triggers(a, "hosts_state_count") if t[0].endswith(("_insert", "_update", "_delete"))]) == 3
    migrated.dispose()
    declared.dispose()


def test_the_upgrade_counts_the_states_of_the_hosts_already_there(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_alembic(conn), "0007")
    engine.dispose()
    with sqlite3.connect(path) as db:
        for i, state in enumerate(["ready", "ready", "gone", "failed", "requested", "gone", "gone"]):
            db.execute(
                "INSERT INTO hosts (id, name, fqdn, app, origin, state, tags, addresses, classification, "
                f"registrations, profile, created_at, updated_at) VALUES ('h{i}', 'n{i}', 'x', 'shop', 'provisioned', "
                "?, '[]', '[]', '{}', '{}', '{}', 1.0, 1.0)", (state,))
    store.migrate(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert dict(db.execute("SELECT state, hosts FROM state_counts").fetchall()) == {
            "ready": 2, "gone": 3, "failed": 1, "requested": 1}


def test_the_upgrade_counts_the_hosts_already_there(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_alembic(conn), "0006")
    engine.dispose()
    with sqlite3.connect(path) as db:
        for i, (app, state) in enumerate([("shop", "ready"), ("shop", "requested"), ("shop", "gone"), (None, "ready")]):
            db.execute(
                "INSERT INTO hosts (id, name, fqdn, app, role, provider, origin, state, tags, addresses, "
                "classification, registrations, profile, created_at, updated_at) VALUES "
                f"('h{i}', 'shop-node-0{i}', 'x', ?, 'node', 'mem', 'provisioned', ?, '[]', '[]', '{{}}', '{{}}', "
                "'{}', 1.0, 1.0)", (app, state))
    store.migrate(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT app, role, provider, hosts FROM live_counts").fetchall() == [("shop", "node", "mem", 2)]
        assert db.execute("SELECT count(*) FROM hosts WHERE seq IS NULL").fetchone() == (4,)


def test_live_means_not_gone_in_the_literal_sql() -> None:
    """The decisions' partial indexes and triggers spell "live" as ``state != 'gone'``."""
    from governord.models import LIVE_STATES, HostState

    assert {s.value for s in HostState} - {s.value for s in LIVE_STATES} == {"gone"}


def test_free_names_are_the_lowest_numbers_no_live_host_carries(new_url: Callable[[str], str]) -> None:
    from sqlalchemy import insert, update

    from governord.store.schema import hosts

    url = new_url("g")
    store.migrate(url)
    engine = create_engine(url)
    pattern = "{app}-{role}-{seq:02d}"
    with engine.begin() as conn:
        tx = store.Transaction(conn)
        assert tx.free_sequence_numbers(pattern, "shop", "node", 3) == [1, 2, 3]
        assert tx.free_sequence_numbers(pattern, "shop", "node", 0) == []  # a plan that adds none
        conn.execute(insert(hosts), [_host(i) for i in range(1, 6)])
        assert tx.free_sequence_numbers(pattern, "shop", "node", 2) == [6, 7]  # numbered without a gap
        conn.execute(update(hosts).where(hosts.c.id.in_(["h2", "h4"])).values(state="gone"))
        assert tx.free_sequence_numbers(pattern, "shop", "node", 3) == [2, 4, 6]  # gaps first
        # a host the role did not number (adopted under such a name) still takes its name
        conn.execute(insert(hosts), [_host(99, id="adopted", name="shop-node-02", seq=None, app=None, role=None)])
        assert tx.free_sequence_numbers(pattern, "shop", "node", 3) == [4, 6, 7]
        conn.execute(insert(hosts), [_host(i) for i in (6, 7)])
        conn.execute(update(hosts).where(hosts.c.id == "adopted").values(state="gone"))
        conn.execute(update(hosts).where(hosts.c.id.in_(["h2", "h4"])).values(state="requested"))
        assert tx.free_sequence_numbers(pattern, "shop", "node", 1) == [8]
        # hosts from before numbers were kept: numbered from their names, then the fast path holds
        conn.execute(update(hosts).values(seq=None))
        assert tx.number_unnumbered_hosts(pattern, "shop", "node") == 7
        assert conn.exec_driver_sql("SELECT count(*) FROM hosts WHERE seq IS NULL AND state != 'gone'").scalar() == 0
        assert tx.free_sequence_numbers(pattern, "shop", "node", 2) == [8, 9]
    engine.dispose()


async def test_a_renewal_names_the_hosts_claimed_again_since_even_once_released(
        new_url: Callable[[str], str]) -> None:
    """The engine's lease renewal tells an instance which of its hosts it lost: those claimed
    again since its own claim (a larger fencing token), whether the instance that took one over
    still holds it or has released it already (it finished the step while this one was
    paused). A host the instance released itself (its own token, no holder) is not lost, and
    the leases it still holds are extended."""
    from sqlalchemy import insert, select, update

    from governord.store.schema import hosts

    url = new_url("g")
    opened = await store.Store.open(url)
    try:
        async with opened.transaction() as conn:
            await conn.execute(insert(hosts), [_host(i, state="provisioning") for i in (1, 2, 3, 4)])
        mine = {row["id"]: row["lease_token"] for row in await opened.claim_due("a/1", 4, 30.0)}
        assert sorted(mine) == ["h1", "h2", "h3", "h4"]
        # h1: released by its owner (a step waits for its next try); h2 and h3: their leases ran
        # out and another instance claimed them, h3 then released by it; h4 still a/1's
        await opened.fenced_update("h1", "a/1", {"next_attempt_at": 0.0}, token=mine["h1"], release=True)
        async with opened.transaction() as conn:
            await conn.execute(update(hosts).where(hosts.c.id.in_(["h2", "h3"])).values(lease_expires=0.0))
        taken = {row["id"]: row["lease_token"] for row in await opened.claim_due("b/1", 4, 30.0)}
        assert sorted(taken) == ["h1", "h2", "h3"]  # h1 was free: b/1 claims it too
        await opened.fenced_update("h3", "b/1", {"state": "registering"}, token=taken["h3"], release=True)

        lost = await opened.renew_leases("a/1", {"h2": mine["h2"], "h3": mine["h3"], "h4": mine["h4"]}, 60.0)
        assert lost == {"h2": "b/1", "h3": None}
        async with opened.engine.connect() as conn:
            expires = dict((await conn.execute(select(hosts.c.id, hosts.c.lease_expires))).all())
        assert expires["h4"] > expires["h2"]  # renewed for 60 s, b/1's for 30
        # a host the renewing owner released itself, and nobody claimed since, is not lost
        await opened.fenced_update("h4", "a/1", {}, token=mine["h4"], release=True)
        assert await opened.renew_leases("a/1", {"h4": mine["h4"]}, 60.0) == {}
    finally:
        await opened.close()
