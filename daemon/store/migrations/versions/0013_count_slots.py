"""the host counts kept in slots: on PostgreSQL each connection adds to rows of its own, so
writers that move hosts at once no longer take turns on one row per state

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

SLOTS = 16

# the count tables as schema.py has them at this revision (a migration does not import the
# schema module): their key columns, the SQLite triggers' and the PostgreSQL functions' names
TABLES = {
    "live_counts": {"key": "app, role, provider", "types": "app VARCHAR(255) NOT NULL, role VARCHAR(255) NOT NULL, "
                                                           "provider VARCHAR(255) NOT NULL",
                    "prefix": "hosts_live_count"},
    "state_counts": {"key": "state", "types": "state VARCHAR(32) NOT NULL", "prefix": "hosts_state_count"},
}


def _sqlite_count(table: str, row: str, delta: int) -> str:
    if table == "state_counts":
        return (f"INSERT INTO state_counts (state, hosts) VALUES ({row}.state, {delta}) "
                "ON CONFLICT (state, slot) DO UPDATE SET hosts = hosts + excluded.hosts;")
    key = f"{row}.app, coalesce({row}.role, ''), coalesce({row}.provider, '')"
    return (f"INSERT INTO live_counts (app, role, provider, hosts) SELECT {key}, {delta} "
            f"WHERE {row}.app IS NOT NULL AND {row}.state != 'gone' "
            "ON CONFLICT (app, role, provider, slot) DO UPDATE SET hosts = hosts + excluded.hosts;")


def _sqlite_triggers(table: str) -> list[str]:
    prefix = TABLES[table]["prefix"]
    if table == "state_counts":
        when, columns = "WHEN OLD.state != NEW.state", "state"
    else:
        when = ("WHEN (OLD.state = 'gone') != (NEW.state = 'gone') OR OLD.app IS NOT NEW.app "
                "OR OLD.role IS NOT NEW.role OR OLD.provider IS NOT NEW.provider")
        columns = "state, app, role, provider"
    return [
        f"CREATE TRIGGER {prefix}_insert AFTER INSERT ON hosts BEGIN {_sqlite_count(table, 'NEW', 1)} END",
        f"CREATE TRIGGER {prefix}_delete AFTER DELETE ON hosts BEGIN {_sqlite_count(table, 'OLD', -1)} END",
        (f"CREATE TRIGGER {prefix}_update AFTER UPDATE OF {columns} ON hosts {when} "
         f"BEGIN {_sqlite_count(table, 'OLD', -1)} {_sqlite_count(table, 'NEW', 1)} END"),
    ]


def _pg_function(table: str) -> str:
    key, prefix = TABLES[table]["key"], TABLES[table]["prefix"]

    def moves(rows: str, sign: int) -> str:
        if table == "live_counts":
            return (f"SELECT app, coalesce(role, '') AS role, coalesce(provider, '') AS provider, {sign} AS delta "
                    f"FROM {rows} WHERE app IS NOT NULL AND state <> 'gone'")
        return f"SELECT state, {sign} AS delta FROM {rows}"

    def apply(changes: str) -> str:
        return (f"INSERT INTO {table} ({key}, slot, hosts) "
                f"SELECT {key}, mod(pg_backend_pid(), {SLOTS}), sum(delta) FROM ({changes}) AS moves "
                f"GROUP BY {key} HAVING sum(delta) <> 0 ORDER BY {key} "
                f"ON CONFLICT ({key}, slot) DO UPDATE SET hosts = {table}.hosts + excluded.hosts;")

    return (f"CREATE OR REPLACE FUNCTION {prefix}() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n"
            f"  IF TG_OP = 'INSERT' THEN\n    {apply(moves('new_rows', 1))}\n"
            f"  ELSIF TG_OP = 'DELETE' THEN\n    {apply(moves('old_rows', -1))}\n"
            f"  ELSE\n    {apply(moves('old_rows', -1) + ' UNION ALL ' + moves('new_rows', 1))}\n"
            "  END IF;\n  RETURN NULL;\nEND\n$$")


def _postgres() -> bool:
    dialect = op.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise NotImplementedError(f"revision 0013 keeps the host counts with triggers of SQLite and PostgreSQL, "
                                  f"not {dialect}")
    return dialect == "postgresql"


def _drop_sqlite_triggers(table: str) -> None:
    for event in ("insert", "delete", "update"):
        op.execute(f"DROP TRIGGER IF EXISTS {TABLES[table]['prefix']}_{event}")


def upgrade() -> None:
    postgres = _postgres()
    for table, shape in TABLES.items():
        key = shape["key"]
        if postgres:
            op.execute(f"ALTER TABLE {table} ADD COLUMN slot INTEGER NOT NULL DEFAULT 0")
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey")
            op.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({key}, slot)")
            op.execute(_pg_function(table))
            continue
        # SQLite cannot change a primary key in place: a new table, the counts copied into slot 0
        _drop_sqlite_triggers(table)
        op.execute(f"CREATE TABLE {table}_slotted ({shape['types']}, slot INTEGER DEFAULT 0 NOT NULL, "
                   f"hosts INTEGER NOT NULL, PRIMARY KEY ({key}, slot))")
        op.execute(f"INSERT INTO {table}_slotted ({key}, slot, hosts) SELECT {key}, 0, hosts FROM {table}")
        op.execute(f"DROP TABLE {table}")
        op.execute(f"ALTER TABLE {table}_slotted RENAME TO {table}")
        for trigger in _sqlite_triggers(table):
            op.execute(trigger)


def downgrade() -> None:
    postgres = _postgres()
    # the definitions of the revisions that made the tables (0007: live_counts, 0009: state_counts)
    package = "governord.store.migrations.versions"
    versions = {"live_counts": importlib.import_module(f"{package}.0007_live_counts"),
                "state_counts": importlib.import_module(f"{package}.0009_growth")}
    for table, shape in TABLES.items():
        key, earlier = shape["key"], versions[table]
        summed = f"SELECT {key}, sum(hosts) FROM {table} GROUP BY {key}"
        if postgres:
            op.execute(f"CREATE TEMPORARY TABLE {table}_summed AS {summed}")
            op.execute(f"DELETE FROM {table}")
            op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_pkey")
            op.execute(f"ALTER TABLE {table} DROP COLUMN slot")
            op.execute(f"ALTER TABLE {table} ADD PRIMARY KEY ({key})")
            op.execute(f"INSERT INTO {table} SELECT * FROM {table}_summed")
            op.execute(f"DROP TABLE {table}_summed")
            for function in earlier.FUNCTIONS_PG.values():
                op.execute(function.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
            continue
        _drop_sqlite_triggers(table)
        op.execute(f"CREATE TABLE {table}_summed ({shape['types']}, hosts INTEGER NOT NULL, PRIMARY KEY ({key}))")
        op.execute(f"INSERT INTO {table}_summed ({key}, hosts) {summed}")
        op.execute(f"DROP TABLE {table}")
        op.execute(f"ALTER TABLE {table}_summed RENAME TO {table}")
        for trigger in earlier.TRIGGERS.values():
            op.execute(trigger)
