"""Moving a store from SQLite to PostgreSQL (governord.store.move, ``governord-ctl store move``):
a state made by the real runtime (hosts in every state, one leased mid-step, requests pending
and keyed, callbacks, certificates revoked and not, site revocations, address leases, the
instance's row and the fleet's leases with their fencing tokens) arrives
row for row in a real PostgreSQL database, and a runtime on it carries on: idempotency keys
replay, the counts the triggers keep equal a recount, new events get fresh ids, caps hold,
revocations stand. Refused (exit 2, nothing written, source and target unchanged): a target that
is not empty, a source in use or on another schema, a bad URL; a copy that fails half way is
rolled back whole."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, func, insert, inspect, select, text, update
from sqlalchemy.engine import Engine, make_url

from governord import ctl, testing
from governord import store as store_module
from governord.daemon import Daemon
from governord.errors import PermanentError
from governord.runtime import Runtime
from governord.store import CertificateStore, Store
from governord.store.move import MoveFailed, MoveRefused, move
from governord.store.schema import KEPT_BY_TRIGGERS, SLOT, events, hosts, metadata, site_revocations

from .conftest import PASSWORD_ENV, wait_states
from .test_store import _actual, _actual_states, _counted, _counted_states, _host

SECRET_ENV = "GOVERNORD_TEST_CALLBACK_SECRET"
#: nothing listens on the discard port of loopback: these callbacks are tried and fail, as owed
#: callbacks of a site that moves may well be
NOWHERE = "http://127.0.0.1:9/cb"


def _callbacks(app: str) -> str:
    """Signed callbacks for ``app``, which may go to loopback over plain http."""
    return (f'[applications.{app}.webhook]\nsecrets = [{{ env = "{SECRET_ENV}" }}]\n'
            f'[applications.{app}.callbacks]\nallow_http = true\nallow_networks = ["127.0.0.0/8"]\n')


EXTRA = """
[providers.slow]
type = "memory"

[applications.gated]
max_hosts = 3
approval = "always"
[applications.gated.roles.web]
tags = ["node"]
provider = "mem"

[applications.slowapp]
max_hosts = 2
[applications.slowapp.roles.db]
tags = ["broker"]
provider = "slow"
""" + _callbacks("demo") + _callbacks("gated")
SITE_CA = "CN=Site CA,O=Example"


def _patch(config: str) -> str:
    # steps still running at stop are parked at once; a permanent failure leaves the host failed
    return (config.replace("[daemon]\n", "[daemon]\nshutdown_grace = 0.1\n")
            .replace("retry_limit = 2\n", 'retry_limit = 2\non_permanent_failure = "keep"\n'))


async def _sqlite_state(make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
                        tmp_path: Path) -> dict[str, Any]:
    """A SQLite store made by the runtime as a site would have it; what the checks need of it."""
    monkeypatch.setenv(SECRET_ENV, "callback-secret")
    runtime: Runtime = await make_runtime(EXTRA, patch=_patch)
    facts: dict[str, Any] = {}
    try:
        governor = runtime.governor
        keyed = await governor.scale("demo", "node", add=2, actor="app:demo", idempotency_key="k1",
                                     callback_url=NOWHERE)
        facts["keyed"] = keyed.request["id"]
        await wait_states(runtime, keyed.request["host_ids"], {"ready"})

        testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).fail(
            "create_or_find", PermanentError("quota exceeded"))
        failing = await governor.scale("demo", "node", add=1, actor="app:demo")
        await wait_states(runtime, failing.request["host_ids"], {"failed"})

        leaving = await governor.scale("demo", "node", add=1, actor="op")
        [leaving_id] = leaving.request["host_ids"]
        await wait_states(runtime, [leaving_id], {"ready"})
        await governor.retire(leaving_id, actor="op")
        await wait_states(runtime, [leaving_id], {"gone"})

        pending = await governor.scale("gated", "web", add=2, actor="app:gated", callback_url=NOWHERE)
        assert pending.request["state"] == "pending"
        facts["pending"] = pending.request["id"]

        # a step that takes long: the host is mid-provisioning when the runtime stops
        testing.MemoryProvider.faults.setdefault("slow", testing.Faults()).delay = 60
        slow = await governor.scale("slowapp", "db", add=1, actor="app:slowapp")
        [facts["slow"]] = slow.request["host_ids"]
        await wait_states(runtime, [facts["slow"]], {"provisioning"})

        for _ in range(2):
            pair = runtime.ca.issue("demo", stem=f"app-demo-{time.time_ns()}", keep_key=False)
            await runtime.certificates.record(serial=pair.serial, app="demo", common_name="demo",
                                              not_after=pair.not_after, issuer=pair.issuer)
        issued = await runtime.certificates.list("demo")
        facts["revoked"] = (issued[0]["issuer"], issued[0]["serial"])
        facts["valid"] = (issued[1]["issuer"], issued[1]["serial"])
        assert await runtime.certificates.revoke("demo", actor="op", serial=issued[0]["serial"]) == [issued[0]["serial"]]
        assert await runtime.certificates.revoke_site("demo", issuer=SITE_CA, serial="5f3a", actor="op")
    finally:
        await runtime.stop()

    facts["path"] = tmp_path / "state" / "governord.db"
    # another instance's lease on the parked host, taken as its engine takes one
    other = await Store.open_sqlite(facts["path"])
    try:
        claimed = await other.claim_due("node-b:1", 10, 3600.0)
        assert [row["id"] for row in claimed] == [facts["slow"]]
    finally:
        await other.close()
    return facts


def _rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every table's rows in primary-key order; a table the triggers keep summed over its slots
    (PostgreSQL keeps a count in several), without its counts that are all zero (SQLite keeps
    those, PostgreSQL's triggers need not make them)."""
    found = {}
    with engine.connect() as conn:
        for table in metadata.sorted_tables:
            if table.info.get(KEPT_BY_TRIGGERS):
                keys = [c for c in table.primary_key.columns if c.name != SLOT]
                counts = [func.sum(c).label(c.name) for c in table.c if not c.primary_key]
                query = select(*keys, *counts).group_by(*keys)
                rows = [dict(r) for r in conn.execute(query).mappings()]
                rows = [r for r in rows if any(r[c.name] for c in counts)]
                found[table.name] = sorted(rows, key=lambda r: tuple(r[c.name] for c in keys))
                continue
            rows = [dict(r) for r in conn.execute(select(table)).mappings()]
            # sorted here: the databases' collations may order strings differently
            found[table.name] = sorted(rows, key=lambda r: tuple(r[c.name] for c in table.primary_key.columns))
    return found


def _sqlite(path: Path) -> Engine:
    return create_engine(f"sqlite:///{path}", **store_module.JSON_CODEC)


def _postgres(url: str) -> Engine:
    return create_engine(url, **store_module.JSON_CODEC)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bare(url: str) -> tuple[str, str, str]:
    """The URL without user and password, the user, the password."""
    parsed = make_url(url)
    bare = parsed._replace(username=None, password=None).render_as_string(hide_password=False)
    return bare, str(parsed.username), str(parsed.password)


def _config(tmp_path: Path, url: str, name: str = "governord.toml") -> Path:
    """The daemon's config as the operator has it after pointing [store] at PostgreSQL: the
    password by reference, in a file."""
    bare, user, password = _bare(url)
    secret = tmp_path / f"{name}.password"
    secret.write_text(password + "\n")
    config = tmp_path / name
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[store]\nurl = "{bare}"\n'
                      f'username = "{user}"\npassword = {{ file = "{secret}" }}\n')
    return config


async def _ctl(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, ctl.cli, list(args))


async def test_a_site_moves_with_everything_and_carries_on(
        make_runtime: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        new_postgres_database: Callable[[], str]) -> None:
    facts = await _sqlite_state(make_runtime, monkeypatch, tmp_path)
    source = _sqlite(facts["path"])
    before = _rows(source)
    source.dispose()
    states = {row["state"] for row in before["hosts"]}
    assert {"ready", "failed", "gone", "provisioning"} <= states
    assert [r["lease_owner"] for r in before["hosts"] if r["id"] == facts["slow"]] == ["node-b:1"]
    assert {r["state"] for r in before["requests"]} >= {"accepted", "pending"}
    assert all(before[name] for name in ("events", "callbacks", "address_leases", "app_certificates",
                                         "site_revocations", "live_counts", "state_counts", "instances",
                                         "fleet_leases"))
    # every table of the schema is one this test fills: a table added later is seen here
    assert all(before.values()), [name for name, rows in before.items() if not rows]
    digest = _digest(facts["path"])

    url = new_postgres_database()
    config = _config(tmp_path, url)
    result = await _ctl("store", "move", "--config", str(config))
    assert result.exit_code == 0, result.output
    shown = make_url(url).render_as_string(hide_password=True)
    assert "  hosts: " in result.output and f"into {shown}" in result.output
    assert _bare(url)[2] not in result.output  # the password is never shown
    assert _digest(facts["path"]) == digest  # the source is as it was

    target = _postgres(url)
    after = _rows(target)
    for table in metadata.sorted_tables:
        assert after[table.name] == before[table.name], table.name
    with target.connect() as conn:
        assert _counted(conn) == _actual(conn) and _counted_states(conn) == _actual_states(conn)
        head = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert head == [store_module.head_revision()]
    highest_event = max(row["id"] for row in after["events"])

    # a runtime on the moved store carries on where the SQLite one stopped
    bare, user, password = _bare(url)
    monkeypatch.setenv(PASSWORD_ENV, password)
    store_section = f'\n[store]\nurl = "{bare}"\nusername = "{user}"\npassword = {{ env = "{PASSWORD_ENV}" }}\n'
    testing.MemoryProvider.faults["slow"].delay = 0
    runtime: Runtime = await make_runtime(EXTRA + store_section, patch=_patch)
    try:
        assert runtime.store.dialect == "postgresql"
        replay = await runtime.governor.scale("demo", "node", add=2, actor="app:demo", idempotency_key="k1",
                                              callback_url=NOWHERE)
        assert replay.replayed and replay.request["id"] == facts["keyed"]
        pending = await runtime.store.get_request(facts["pending"])
        assert pending is not None and pending["state"] == "pending"

        # demo has 2 ready and 1 failed host alive of its 5
        assert await runtime.store.live_count("demo") == 3
        over = await runtime.governor.scale("demo", "node", add=3, actor="app:demo")
        assert over.request["state"] == "declined" and over.request["reason"].startswith("cap reached")
        under = await runtime.governor.scale("demo", "node", add=2, actor="app:demo")
        assert under.request["state"] == "accepted"
        await wait_states(runtime, under.request["host_ids"], {"ready"})
        assert await runtime.store.live_count("demo") == 5
        with target.connect() as conn:
            assert _counted(conn) == _actual(conn) and _counted_states(conn) == _actual_states(conn)
            new_ids = conn.execute(select(events.c.id).where(events.c.id > highest_event)).scalars().all()
        assert new_ids  # the new hosts' trail, with fresh ids after the moved ones

        # the host another instance held: its lease runs out, and it is provisioned here
        await runtime.store.decide(lambda tx: tx.conn.execute(
            update(hosts).where(hosts.c.id == facts["slow"]).values(lease_expires=0.0)))
        runtime.engine.wake()
        await wait_states(runtime, [facts["slow"]], {"ready"})

        certificates = CertificateStore(runtime.store)
        assert await certificates.revoked(*facts["revoked"])
        assert not await certificates.revoked(*facts["valid"])
        assert await certificates.revoked(SITE_CA, "5f3a")
    finally:
        await runtime.stop()

    # again into the same database: refused, naming a table, and nothing changed
    kept = _rows(target)
    again = await _ctl("store", "move", "--config", str(config))
    assert again.exit_code == 2, again.output
    assert "is not empty: table address_leases holds rows" in again.output
    assert _rows(target) == kept
    target.dispose()


def _small_source(tmp_path: Path, name: str = "small") -> Path:
    """A SQLite store at the newest schema with a few hosts and events."""
    path = tmp_path / name / "governord.db"
    store_module.migrate(f"sqlite:///{path}")
    engine = _sqlite(path)
    with engine.begin() as conn:
        conn.execute(insert(hosts), [_host(i, state=state) for i, state in enumerate(["ready", "gone", "provisioning"])])
        conn.execute(insert(events), [{"ts": 1.0, "kind": "test", "detail": {"n": i}} for i in range(5)])
    engine.dispose()
    return path


def _empty(url: str) -> bool:
    """The target has the store's tables, and no row in them."""
    engine = _postgres(url)
    try:
        return all(not rows for rows in _rows(engine).values())
    finally:
        engine.dispose()


def _untouched(url: str) -> bool:
    """The target has no table at all: a refusal comes before the migrations."""
    engine = _postgres(url)
    try:
        return inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


def test_the_counts_come_from_the_targets_triggers_and_the_sequence_moves_on(
        tmp_path: Path, postgres_url: str) -> None:
    path = _small_source(tmp_path)
    seen: list[tuple[str, int, int]] = []
    moved = move(path, postgres_url, batch=2, progress=lambda *args: seen.append(args))
    by_name = {table.name: table for table in moved.tables}
    assert by_name["hosts"].rows == 3 and by_name["events"].rows == 5 and moved.rows == 8
    assert by_name["live_counts"].derived and by_name["live_counts"].differing == 0
    assert ("events", 2, 5) in seen and ("events", 5, 5) in seen  # batch by batch
    engine = _postgres(postgres_url)
    with engine.begin() as conn:
        assert _counted(conn) == {("shop", "node", "mem"): 2}
        assert _counted_states(conn) == {"ready": 1, "gone": 1, "provisioning": 1}
        fresh = conn.execute(insert(events).values(ts=2.0, kind="after", detail={}).returning(events.c.id)).scalar_one()
    assert fresh == 6
    engine.dispose()


def test_counts_that_drifted_in_the_source_are_made_right_and_reported(tmp_path: Path, postgres_url: str) -> None:
    """The count tables derive from the hosts: the target's triggers count what arrives, so a
    source whose counts were off (a bug, a hand-made fix) yields right ones, and says so."""
    path = _small_source(tmp_path)
    engine = _sqlite(path)
    with engine.begin() as conn:
        conn.execute(text("UPDATE live_counts SET hosts = 7"))
    engine.dispose()
    by_name = {table.name: table for table in move(path, postgres_url).tables}
    assert by_name["live_counts"].differing == 1 and by_name["state_counts"].differing == 0
    target = _postgres(postgres_url)
    with target.connect() as conn:
        assert _counted(conn) == _actual(conn) == {("shop", "node", "mem"): 2}
    target.dispose()


def test_a_store_left_by_a_killed_daemon_moves_with_what_its_log_holds(tmp_path: Path, postgres_url: str) -> None:
    """Transactions a killed process committed to the write-ahead log but never checkpointed
    into the file are part of the store: they move too."""
    path = _small_source(tmp_path)
    script = (f"import os, sqlite3\nc = sqlite3.connect({str(path)!r})\nc.execute('PRAGMA journal_mode=WAL')\n"
              "c.execute('PRAGMA wal_autocheckpoint=0')\n"
              "c.execute(\"INSERT INTO events (ts, kind, detail) VALUES (3.0, 'in-the-log', '{}')\")\n"
              "c.commit()\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", script], check=True)
    assert Path(f"{path}-wal").stat().st_size > 0
    assert move(path, postgres_url).rows == 9
    engine = _postgres(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(select(events.c.id).where(events.c.kind == "in-the-log")).scalars().all() == [6]
    engine.dispose()


def test_a_copy_that_fails_half_way_leaves_the_target_without_a_row(tmp_path: Path, postgres_url: str) -> None:
    """SQLite keeps a name longer than its column; PostgreSQL refuses it, after the tables before
    ``hosts`` were copied: all of it is rolled back, and the move can be run again once fixed."""
    path = _small_source(tmp_path)
    engine = _sqlite(path)
    with engine.begin() as conn:
        conn.execute(update(hosts).where(hosts.c.id == "h2").values(name="x" * 300))
    engine.dispose()  # an open connection would be a source in use
    with pytest.raises(MoveFailed, match=r"rolled back, .* holds no row: StringDataRightTruncation"):
        move(path, postgres_url, batch=2)
    assert _empty(postgres_url)
    with engine.begin() as conn:
        conn.execute(update(hosts).where(hosts.c.id == "h2").values(name="shop-node-02"))
    engine.dispose()
    assert move(path, postgres_url).rows == 8


def test_a_target_with_a_row_is_refused_and_left_as_it_is(tmp_path: Path, postgres_url: str) -> None:
    path = _small_source(tmp_path)
    store_module.migrate(postgres_url)
    engine = _postgres(postgres_url)
    with engine.begin() as conn:
        conn.execute(insert(site_revocations).values(issuer=SITE_CA, serial="1", app="x", revoked_at=1.0,
                                                     revoked_by="op"))
    with pytest.raises(MoveRefused, match="table site_revocations holds rows"):
        move(path, postgres_url)
    rows = _rows(engine)
    assert rows["site_revocations"] and not rows["hosts"] and not rows["events"]
    engine.dispose()


async def test_a_source_in_use_is_refused(tmp_path: Path, postgres_url: str) -> None:
    path = _small_source(tmp_path)
    digest = _digest(path)
    # a store open on it (as a daemon has it, idle between writes)
    opened = await Store.open_sqlite(path)
    try:
        assert await opened.count_by_state()
        with pytest.raises(MoveRefused, match="is in use"):
            await asyncio.to_thread(move, path, postgres_url)
    finally:
        await opened.close()
    assert _untouched(postgres_url)
    assert _digest(path) == digest


async def test_a_running_daemons_state_directory_is_refused(
        make_runtime: Callable[..., Any], tmp_path: Path, postgres_url: str) -> None:
    runtime: Runtime = await make_runtime()
    await runtime.stop()
    daemon = Daemon("test.toml", runtime.plugins, runtime.config)
    assert daemon._lock_state_dir(tmp_path / "state")  # what a running daemon holds
    result = await _ctl("store", "move", "--config", str(_config(tmp_path, postgres_url)))
    assert result.exit_code == 2, result.output
    assert f"a governord is running on {tmp_path / 'state'}" in result.output
    assert _untouched(postgres_url)
    assert daemon._lock_fd is not None
    os.close(daemon._lock_fd)


def test_a_source_on_another_schema_is_refused(tmp_path: Path, postgres_url: str) -> None:
    from alembic import command

    from .test_store import _alembic

    old = tmp_path / "old.db"
    engine = _sqlite(old)
    with engine.begin() as conn:
        command.upgrade(_alembic(conn), "0009")
    digest = _digest(old)
    with pytest.raises(MoveRefused, match=r"revision 0009, this governord's is \w+: start this version of "
                                          "governord once on it"):
        move(old, postgres_url)
    assert _digest(old) == digest

    newer = _small_source(tmp_path)
    engine = _sqlite(newer)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(MoveRefused, match="revision 9999, which this governord does not know"):
        move(newer, postgres_url)

    not_a_store = tmp_path / "notes.db"
    not_a_store.write_text("hello\n" * 200)
    with pytest.raises(MoveRefused, match="cannot read .* as a SQLite store"):
        move(not_a_store, postgres_url)
    with pytest.raises(MoveRefused, match="no SQLite store at"):
        move(tmp_path / "missing.db", postgres_url)
    assert not (tmp_path / "missing.db").exists()
    assert _untouched(postgres_url)


async def test_the_command_line_by_url_and_password_reference(
        tmp_path: Path, new_postgres_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = _small_source(tmp_path)
    url = new_postgres_database()
    bare, user, password = _bare(url)
    monkeypatch.setenv("MOVE_TEST_PASSWORD", password)
    moved = await _ctl("store", "move", "--from", f"sqlite:///{path}", "--to", bare, "--username", user,
                       "--password-env", "MOVE_TEST_PASSWORD")
    assert moved.exit_code == 0, moved.output
    assert "moved 8 rows" in moved.output and password not in moved.output

    secret = tmp_path / "password"
    secret.write_text(password)
    other = new_postgres_database()
    by_file = await _ctl("store", "move", "--from", str(path), "--to", _bare(other)[0], "--username", user,
                         "--password-file", str(secret), "--batch", "1")
    assert by_file.exit_code == 0, by_file.output

    refusals = {
        # the password never goes in the URL
        ("--to", url): "--to: a URL with a user name or password in it",
        ("--to", f"sqlite:///{tmp_path}/x.db"): "--to: the target must be a PostgreSQL database",
        ("--to", "mysql://db/x"): "--to: unsupported database 'mysql'",
        ("--to", bare, "--username", user, "--password-file", str(tmp_path / "none")): "--password-file/--password-env: "
                                                                                         "cannot read secret file",
    }
    for args, message in refusals.items():
        result = await _ctl("store", "move", "--from", str(path), *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)

    unreachable = await _ctl("store", "move", "--from", str(path), "--to", "postgresql://127.0.0.1:1/governord")
    assert unreachable.exit_code == 1 and "nothing was written: OperationalError" in unreachable.output

    sqlite_config = tmp_path / "old.toml"
    sqlite_config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    result = await _ctl("store", "move", "--config", str(sqlite_config))
    assert result.exit_code == 2 and "store.url: names no PostgreSQL database" in result.output
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text('[store]\nurl = "postgresql://db/x"\npassword = { env = "MOVE_TEST_UNSET" }\n')
    result = await _ctl("store", "move", "--config", str(bad_config))
    assert result.exit_code == 2 and f"{bad_config}: store.password: environment variable MOVE_TEST_UNSET is not set" \
        in result.output

    for args in (["--config", str(bad_config), "--to", bare], ["--to", bare], [],
                 ["--config", str(bad_config), "--username", "x"]):
        assert (await _ctl("store", "move", *args)).exit_code == 2
