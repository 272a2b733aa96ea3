"""PostgreSQL only: what several governord processes sharing one database rely on. Each
"instance" here is a runtime with a Store of its own (its own engines and connection pools) on
one database, as separate processes would have; the in-process writer turn plays no part on
PostgreSQL, so only what the database guarantees (advisory locks, row locks) keeps them exact."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, insert, text, update

from governord import store
from governord.api import admin_api, app_api
from governord.api.tls import ApplicationTLS
from governord.rules import RequestError
from governord.runtime import Runtime
from governord.store.schema import hosts

from .test_store import MIGRATIONS, _actual, _actual_states, _counted, _counted_states, _host

STORE_BACKENDS = ("postgresql",)


async def _instances(make_runtime: Callable[..., Any], count: int, patch: Callable[[str], str]) -> list[Runtime]:
    runtimes = [await make_runtime(patch=patch, instance=f"i{n}") for n in range(count)]
    for runtime in runtimes:
        # decisions only: the engines (and their lease clean-up at start) are the fleet's part
        await runtime.engine.stop(5.0)
    return runtimes


def _cap(limit: int) -> Callable[[str], str]:
    return lambda config: config.replace("max_hosts = 5", f"max_hosts = {limit}")


async def test_concurrent_decisions_through_three_instances_hold_the_cap(
        store_backend: str, make_runtime: Callable[..., Any]) -> None:
    runtimes = await _instances(make_runtime, 3, _cap(10))
    assert len({id(r.store.engine) for r in runtimes}) == 3 and all(r.store.dialect == "postgresql" for r in runtimes)

    async def ask(i: int) -> str:
        try:
            decision = await runtimes[i % 3].governor.scale("demo", "node", add=1, actor=f"app-{i}")
        except RequestError as exc:
            return f"refused {exc.status}"
        return str(decision.request["state"])

    outcomes = await asyncio.gather(*(ask(i) for i in range(200)))
    assert outcomes.count("accepted") == 10, sorted(set(outcomes))
    rows = await runtimes[0].store.list_hosts(app="demo")
    assert len(rows) == 10
    assert len({r["name"] for r in rows}) == 10 and len({r["address"] for r in rows}) == 10
    assert await runtimes[1].store.live_count("demo") == 10
    for runtime in runtimes:
        await runtime.stop()


async def test_one_idempotency_key_is_one_request_across_instances(
        store_backend: str, make_runtime: Callable[..., Any]) -> None:
    runtimes = await _instances(make_runtime, 3, _cap(10))
    decisions = await asyncio.gather(*(
        runtimes[i % 3].governor.scale("demo", "node", add=2, actor="app", idempotency_key="same")
        for i in range(30)))
    assert len({d.request["id"] for d in decisions}) == 1
    assert sum(not d.replayed for d in decisions) == 1
    assert len(await runtimes[2].store.list_hosts(app="demo")) == 2
    for runtime in runtimes:
        await runtime.stop()


def test_instances_starting_at_once_migrate_one_after_the_other(postgres_url: str) -> None:
    """Six processes' worth of migrations on one empty database at once: each waits for the
    advisory lock, the first builds the schema, the others find it built."""
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        store.migrate(postgres_url)

    with ThreadPoolExecutor(6) as pool:
        for future in [pool.submit(start) for _ in range(6)]:
            future.result()
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
        # one set of count triggers, not one per migrating process
        assert conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'hosts_%_count_%'")).scalar() == 6
        # and no migration lock left behind
        assert conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")).scalar() == 0
    engine.dispose()


def test_counts_stay_right_under_concurrent_transactions(postgres_url: str) -> None:
    """Eight connections moving hosts between states, applications and providers at once, each
    change its own transaction (as the engine's writes are): the counts the triggers keep equal
    a real count afterwards, and no transaction deadlocks on the count rows."""
    store.migrate(postgres_url)
    engine = create_engine(postgres_url, pool_size=8)
    with engine.begin() as conn:
        conn.execute(insert(hosts), [_host(i, state="requested") for i in range(80)])
    states = ["requested", "provisioning", "registering", "ready", "failed", "retiring", "gone"]

    def work(worker: int) -> None:
        rng = random.Random(worker)
        for _ in range(150):
            ids = [f"h{i}" for i in rng.sample(range(80), rng.choice([1, 1, 3]))]
            change = rng.choice(["state", "state", "app", "provider"])
            value = {"state": rng.choice(states), "app": rng.choice(["shop", "blog", None]),
                     "provider": rng.choice(["mem", "vs"])}[change]
            with engine.begin() as conn:
                conn.execute(update(hosts).where(hosts.c.id.in_(ids)).values({change: value}))

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, w) for w in range(8)]:
            future.result()
    with engine.connect() as conn:
        assert _counted_states(conn) == _actual_states(conn)
        assert _counted(conn) == _actual(conn)
        assert sum(_counted_states(conn).values()) == 80
    engine.dispose()


def test_the_upgrade_counts_the_hosts_already_there(postgres_url: str) -> None:
    """Revisions 0007 and 0009 on PostgreSQL count the hosts a database already has, as on SQLite."""
    from alembic import command

    from .test_store import _alembic

    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        command.upgrade(_alembic(conn), "0006")
    with engine.begin() as conn:
        for i, (app, state) in enumerate([("shop", "ready"), ("shop", "requested"), ("shop", "gone"), (None, "ready"),
                                          ("shop", "failed")]):
            conn.execute(text(
                "INSERT INTO hosts (id, name, fqdn, app, role, provider, origin, state, tags, addresses, "
                "classification, registrations, profile, created_at, updated_at) VALUES "
                "(:id, :name, 'x', :app, 'node', 'mem', 'provisioned', :state, '[]', '[]', '{}', '{}', '{}', 1.0, 1.0)"),
                {"id": f"h{i}", "name": f"shop-node-0{i}", "app": app, "state": state})
    store.migrate(postgres_url)
    with engine.connect() as conn:
        live = "SELECT app, role, provider, sum(hosts) FROM live_counts GROUP BY app, role, provider"
        assert conn.execute(text(live)).all() == [("shop", "node", "mem", 3)]
        assert dict(conn.execute(text("SELECT state, sum(hosts) FROM state_counts GROUP BY state")).all()) == {
            "ready": 2, "requested": 1, "gone": 1, "failed": 1}
        # and the retire_requested default the first revision gave is PostgreSQL's false
        assert conn.execute(text("SELECT bool_and(NOT retire_requested) FROM hosts")).scalar() is True
    engine.dispose()


async def test_a_transaction_postgresql_aborts_for_a_deadlock_is_run_again(postgres_url: str) -> None:
    """Two writes that lock the same two things in opposite orders: PostgreSQL aborts one
    (deadlock detected), the writer runs it again, and both callers get their result."""
    opened = await store.Store.open(postgres_url, pool_size=2)
    both_hold_one = threading.Barrier(2, timeout=10)
    runs = {"a": 0, "b": 0}

    def job(name: str, first: int, second: int) -> Callable[[Any], str]:
        def run(conn: Any) -> str:
            runs[name] += 1
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": first})
            if runs[name] == 1:
                both_hold_one.wait()  # the first time only: each holds one lock and wants the other
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": second})
            return name
        return run

    try:
        results = await asyncio.gather(opened.writer.run(job("a", 1, 2)), opened.writer.run(job("b", 2, 1)))
    finally:
        await opened.close()
    assert results == ["a", "b"]
    assert sorted(runs.values()) == [1, 2]  # the deadlock's victim ran again


# -- revocations across instances -------------------------------------------------------------

ISSUER = "CN=governord CA"


def _reads_of_revocations(store_: store.Store) -> list[str]:
    """A list that grows by each statement ``store_``'s readers send about revocations."""
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "app_certificates" in statement or "site_revocations" in statement:
            seen.append(statement)

    event.listen(store_.engine.sync_engine, "before_cursor_execute", count)
    return seen


async def test_a_revocation_through_one_instance_is_refused_by_another_within_the_bound(postgres_url: str) -> None:
    """Two stores on one database, as two instances have: what one revokes, the other refuses
    for every check made more than ``refresh`` seconds after the revocation committed; the one
    it was revoked through refuses at once. Both kinds: governord's own certificates and a site
    CA's (by issuer and serial)."""
    one, other = await store.Store.open(postgres_url, pool_size=2), await store.Store.open(postgres_url, pool_size=2)
    refresh = 0.5
    revoking, checking = store.CertificateStore(one, refresh=refresh), store.CertificateStore(other, refresh=refresh)
    try:
        await revoking.record(serial="a1", app="demo", common_name="demo", not_after=time.time() + 3600, issuer=ISSUER)
        assert not await checking.revoked(ISSUER, "a1")  # accepted: and now in the other's copy
        assert await revoking.revoke("demo", actor="test", serial="a1") == ["a1"]
        assert await revoking.revoked(ISSUER, "a1")  # at once where it was revoked
        await asyncio.sleep(refresh)
        assert await checking.revoked(ISSUER, "a1")  # past the bound: everywhere

        assert not await checking.revoked("CN=Site CA", "5e")
        assert await revoking.revoke_site("demo", issuer="CN=Site CA", serial="5e", actor="test")
        assert await revoking.revoked("CN=Site CA", "5e")
        await asyncio.sleep(refresh)
        assert await checking.revoked("CN=Site CA", "5e")
        assert not await checking.revoked("CN=Other CA", "5e")  # one CA's serial only
    finally:
        await one.close()
        await other.close()


async def test_within_the_bound_a_check_asks_the_database_nothing(postgres_url: str) -> None:
    """The check every request makes is a set lookup while the copy is fresh (no statement at
    all), checks that find it stale share one read, and a shorter refresh (a reload) applies
    to the next check."""
    one, other = await store.Store.open(postgres_url, pool_size=2), await store.Store.open(postgres_url, pool_size=4)
    revoking, checking = store.CertificateStore(one, refresh=30), store.CertificateStore(other, refresh=30)
    reads = _reads_of_revocations(other)
    try:
        await revoking.record(serial="b2", app="demo", common_name="demo", not_after=time.time() + 3600, issuer=ISSUER)
        assert not await checking.revoked(ISSUER, "b2")
        assert len(reads) == 2  # one read: governord's revoked certificates and the site CA's
        await revoking.revoke("demo", actor="test", serial="b2")
        for _ in range(200):
            assert not await checking.revoked(ISSUER, "b2")  # within the 30 s: the copy, stale as allowed
        assert len(reads) == 2

        checking.refresh = 0.2
        await asyncio.sleep(0.2)
        answers = await asyncio.gather(*(checking.revoked(ISSUER, "b2") for _ in range(50)))
        assert all(answers)
        assert len(reads) == 4  # fifty stale checks at once: one read between them
    finally:
        await one.close()
        await other.close()


async def test_two_application_api_listeners_refuse_a_certificate_revoked_through_one(
        store_backend: str, make_runtime: Callable[..., Any], aiohttp_client: Callable[..., Any]) -> None:
    """Two instances on one database, each with its own HTTPS listener of the applications' API
    (same CA: the same state directory), one application certificate: both serve it; it is
    revoked through the first instance's admin API; the first refuses it at once, the second
    for every request made ``revocation_refresh`` seconds later."""
    runtimes = await _instances(make_runtime, 2, _cap(10))
    refresh = 0.5
    for runtime in runtimes:
        runtime.certificates.refresh = refresh  # as [store] revocation_refresh (reloaded) sets it
    admin = await aiohttp_client(admin_api.create_admin_api(runtimes[0]))
    resp = await admin.post("/v1/apps/demo/certificate")
    assert resp.status == 201
    issued = await resp.json()
    home = runtimes[0].state_dir
    (home / "demo.pem").write_text(issued["certificate_pem"])
    (home / "demo.key").write_text(issued["key_pem"])
    client_tls = ssl.create_default_context(cafile=str(runtimes[0].ca.cert_path))
    client_tls.load_cert_chain(home / "demo.pem", home / "demo.key")
    runners, bases = [], []
    for n, runtime in enumerate(runtimes):
        server = runtime.ca.issue("127.0.0.1", server_names=["127.0.0.1"], stem=f"server-{n}")
        tls = ApplicationTLS(certificate=server.certificate, key=str(server.key), client_ca=runtime.ca.cert_path,
                             client_crl=None, count=runtime.metrics.refused)
        runner = web.AppRunner(app_api.create_app_api(runtime, tls), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context).start()
        runners.append(runner)
        bases.append(f"https://127.0.0.1:{runner.addresses[0][1]}")
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as session:
            async def status(base: str) -> int:
                async with session.get(f"{base}/v1/hosts") as reply:
                    return reply.status

            assert [await status(base) for base in bases] == [200, 200]
            resp = await admin.post("/v1/apps/demo/revoke", json={"serial": issued["serial"]})
            assert resp.status == 200 and (await resp.json())["revoked"] == [issued["serial"]]
            assert await status(bases[0]) == 403
            await asyncio.sleep(refresh)
            assert [await status(bases[1]) for _ in range(5)] == [403] * 5
            async with session.get(f"{bases[1]}/v1/hosts") as reply:
                assert "revoked" in (await reply.json())["error"]
    finally:
        for runner in runners:
            await runner.cleanup()
        for runtime in runtimes:
            await runtime.stop()


async def test_decisions_under_the_same_locks_are_committed_together_and_a_bad_one_sinks_alone(
        postgres_url: str) -> None:
    """The decisions queued for one application while a group commits form the next group: one
    transaction, one taking of the locks, each decision seeing the ones before it. One that
    raises is rolled back with its group, and the others run again without it and stand."""
    opened = await store.Store.open(postgres_url, pool_size=4)
    commits: list[int] = []
    event.listen(opened.writer._engine, "commit", lambda _conn: commits.append(1))  # noqa: SLF001
    runs: dict[int, int] = {}

    def job(n: int, bad: int | None = None) -> Callable[[Any], int]:
        def run(conn: Any) -> int:
            runs[n] = runs.get(n, 0) + 1
            held = conn.execute(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                     "AND pid = pg_backend_pid()")).scalar_one()
            assert held == 1, "the group's lock is held while each of its decisions runs"
            conn.execute(insert(hosts).values(_host(1000 + n, name=f"group-{n}", seq=None)))
            if n == bad:
                raise RequestError(409, "refused", field="n")
            # every decision before it in the group is visible to it
            return int(conn.execute(text("SELECT count(*) FROM hosts WHERE name LIKE 'group-%'")).scalar_one())
        return run

    try:
        good = await asyncio.gather(*(opened.writer.run(job(n), locks=["app:group"]) for n in range(40)))
        grouped = len(commits)
        mixed = await asyncio.gather(*(opened.writer.run(job(n, bad=53), locks=["app:group"])
                                       for n in range(40, 80)), return_exceptions=True)
        names = {r["name"] for r in await opened.list_hosts()}
    finally:
        await opened.close()
    assert sorted(good) == list(range(1, 41))
    assert grouped < 10, f"{grouped} commits for 40 decisions: not grouped"
    failed = [40 + n for n, outcome in enumerate(mixed) if isinstance(outcome, Exception)]
    assert failed == [53] and isinstance(mixed[13], RequestError)
    assert names == {f"group-{n}" for n in range(80) if n != 53}
    assert sorted(o for o in mixed if not isinstance(o, Exception)) == list(range(41, 80))
    assert max(runs.values()) <= 2  # a decision runs at most twice: in its group, and alone after it failed


def test_writers_moving_hosts_at_once_do_not_wait_on_the_counts(postgres_url: str) -> None:
    """Two transactions that each move a host from one state to the same other state: each adds
    to the count rows of its own slot, so the second does not wait for the first to commit (on
    one row per state it would, and every writer of the fleet would take turns)."""
    store.migrate(postgres_url)
    engine = create_engine(postgres_url, pool_size=20)
    with engine.begin() as conn:
        conn.execute(insert(hosts), [_host(i, state="ready") for i in (1, 2)])
    held = []
    try:
        first = engine.connect()
        held.append(first)
        slot = first.execute(text("SELECT mod(pg_backend_pid(), 16)")).scalar_one()
        second = engine.connect()
        held.append(second)
        while second.execute(text("SELECT mod(pg_backend_pid(), 16)")).scalar_one() == slot:
            second = engine.connect()  # another backend, in another slot
            held.append(second)
        first.execute(update(hosts).where(hosts.c.id == "h1").values(state="retiring"))
        second.execute(text("SET LOCAL lock_timeout = '2s'"))
        second.execute(update(hosts).where(hosts.c.id == "h2").values(state="retiring"))  # no wait
        second.commit()
        first.commit()
    finally:
        for conn in held:
            conn.close()
    with engine.connect() as conn:
        assert _counted_states(conn) == _actual_states(conn) == {"retiring": 2}
        assert conn.execute(text("SELECT count(DISTINCT slot) FROM state_counts WHERE state = 'retiring' "
                                 "AND hosts <> 0")).scalar_one() == 2
    engine.dispose()


def test_the_count_slots_downgrade_and_upgrade_keep_the_counts(postgres_url: str) -> None:
    """Revision 0013 and back: the counts summed into one row per key, and spread again."""
    from alembic import command

    from .test_store import _alembic

    store.migrate(postgres_url)
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(insert(hosts), [_host(i, state=s) for i, s in enumerate(["ready", "ready", "gone", "failed"])])
    with engine.connect() as conn:  # another connection, most likely another slot
        conn.execute(update(hosts).where(hosts.c.id == "h0").values(state="retiring"))
        conn.commit()
    with engine.begin() as conn:
        command.downgrade(_alembic(conn), "0012")
    with engine.connect() as conn:
        assert dict(conn.execute(text("SELECT state, hosts FROM state_counts WHERE hosts <> 0")).all()) == {
            "retiring": 1, "ready": 1, "gone": 1, "failed": 1}
        assert conn.execute(text("SELECT hosts FROM live_counts")).scalars().all() == [3]
    store.migrate(postgres_url)
    with engine.connect() as conn:
        assert _counted_states(conn) == _actual_states(conn) and _counted(conn) == _actual(conn)
    engine.dispose()


_HOLDER = """
import sys, time
from sqlalchemy import text
from governord.store import app_lock, postgresql
engine = postgresql.sync_engine(sys.argv[1], {}, 1)
with engine.connect() as conn:
    conn.begin()
    postgresql.lock(conn, [app_lock("demo")])
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    try:
        conn.execute(text("SELECT 1"))
        print("still in its transaction", flush=True)
    except Exception as exc:
        print("session ended:", type(exc).__name__, flush=True)
"""


async def test_a_paused_process_holding_an_applications_lock_holds_the_fleet_up_only_so_long(
        postgres_url: str) -> None:
    """A process that holds an application's decision lock and is then stopped (SIGSTOP) would
    keep every other instance from deciding for that application until it came back. Its
    session is ended by the server after IDLE_TRANSACTION_TIMEOUT idle seconds: another
    instance's decision goes through, and the paused process, resumed, finds its session gone."""
    import os
    import signal
    import subprocess
    import sys

    from governord.store import postgresql

    store.migrate(postgres_url)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, postgres_url, "1"], stdout=subprocess.PIPE, text=True)
    opened = await store.Store.open(postgres_url, pool_size=2)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGSTOP)

        def decision(tx: Any) -> int:
            return int(tx.conn.execute(text("SELECT 42")).scalar_one())

        started = time.monotonic()
        blocked = asyncio.ensure_future(opened.decide(decision, locks=[store.app_lock("demo")]))
        await asyncio.sleep(2)
        assert not blocked.done(), "the paused process's lock held the decision up"
        assert await asyncio.wait_for(blocked, postgresql.IDLE_TRANSACTION_TIMEOUT + 15) == 42
        assert time.monotonic() - started >= postgresql.IDLE_TRANSACTION_TIMEOUT - 1
        os.kill(holder.pid, signal.SIGCONT)
        out, _ = holder.communicate(timeout=30)
        assert out.startswith("session ended:"), out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        await opened.close()
