"""The real daemon on PostgreSQL (a cluster of the test's own), under load from applications'
mTLS clients, while the PostgreSQL server is stopped and started again: requests meanwhile are
answered 503 (never 500), ``/healthz`` is 503 and ``governord_store_up`` 0; once the server is
back, ``/healthz`` is 200 again without anyone's help, every request accepted before the outage
and every one repeated after it (same idempotency key) ends with its host ready, one VM and one
registration each, and the database's counts agree with its rows."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import Counter
from typing import Any

import aiohttp
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from lab.postgres import PostgresCluster
from lab.stack import Lab

CLIENTS = 3
#: scale requests (add 1) each client makes, one after the other
REQUESTS = 5
#: the load pauses this long between requests, and before repeating one answered 503
PAUSE = 0.3


class Load:
    """Applications' clients: each asks for ``REQUESTS`` hosts, one request at a time, its own
    idempotency keys; a 503 is answered by asking again with the same key (as Retry-After says).
    Every answer is kept."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        #: (idempotency key, HTTP status, body) of every answer, in order
        self.answers: list[tuple[str, int, Any]] = []
        #: request id by idempotency key, once accepted
        self.accepted: dict[str, str] = {}
        self.go_on = True

    async def client(self, n: int) -> None:
        for i in range(REQUESTS):
            key = f"c{n}-{i}"
            while self.go_on:
                async with self.session.post(f"{self.base}/v1/scale", json={
                        "role": "node", "add": 1, "idempotency_key": key}) as resp:
                    body = json.loads(await resp.text())
                    self.answers.append((key, resp.status, body))
                if resp.status in (200, 202):
                    self.accepted[key] = body["id"]
                    break
                await asyncio.sleep(PAUSE)
            await asyncio.sleep(PAUSE)

    def statuses(self) -> Counter[int]:
        return Counter(status for _key, status, _body in self.answers)


async def _status(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        text_ = await resp.text()
        return resp.status, json.loads(text_) if resp.content_type == "application/json" else text_


async def test_postgresql_stopped_and_started_under_load(lab: Lab, private_postgres_cluster: PostgresCluster) -> None:
    cluster = private_postgres_cluster
    url = make_url(cluster.create_database("governord", owner="governord", password=lab.new_password()))
    config = lab.write_config(max_hosts=40, workers=8)
    bare = url._replace(username=None, password=None).render_as_string(hide_password=False)
    config.write_text(f'[store]\nurl = "{bare}"\nusername = "{url.username}"\n'
                      'password = { env = "GOVERNORD_DB_PASSWORD" }\n' + config.read_text()
                      # the clients' retries are not what is tested here
                      + "\n[applications.demo.rate_limit]\nrequests_per_second = 1000.0\nburst = 1000\n")
    daemon = lab.start_governord(config, extra_env={"GOVERNORD_DB_PASSWORD": url.password or ""})
    try:
        issued = daemon.ctl_json("apps", "register", "demo")
        tls = ssl.create_default_context(cafile=issued["ca"])
        tls.load_cert_chain(issued["certificate"], issued["key"])
        base = f"https://127.0.0.1:{daemon.api_port}"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
            assert await _status(session, f"{base}/healthz") == (200, {"status": "ok", "store": "ok"})
            load = Load(session, base)
            clients = [asyncio.create_task(load.client(n)) for n in range(CLIENTS)]
            deadline = time.monotonic() + 60
            while len(load.accepted) < CLIENTS:  # some hosts requested, and being made, before the outage
                assert time.monotonic() < deadline, load.answers
                await asyncio.sleep(0.05)
            before = dict(load.accepted)

            await asyncio.to_thread(cluster.stop)
            outage = time.monotonic()
            while (await _status(session, f"{base}/healthz"))[0] != 503:
                assert time.monotonic() - outage < 5, "/healthz did not say unhealthy"
                await asyncio.sleep(0.1)
            code, health = await _status(session, f"{base}/healthz")
            assert code == 503 and health == {"status": "unhealthy", "store": "unreachable (OperationalError)"}
            code, metrics = await _status(session, f"{base}/metrics")
            assert code == 200 and "governord_store_up 0.0" in metrics
            await asyncio.sleep(4)  # the load goes on against the stopped server
            during = [(key, status, body) for key, status, body in load.answers[-10:]]
            assert {status for _key, status, _body in during} == {503}, during
            assert all("cannot reach its database" in body["error"] for _key, _status_, body in during)
            assert daemon.process.poll() is None

            await asyncio.to_thread(cluster.start)
            back = time.monotonic()
            while (await _status(session, f"{base}/healthz"))[0] != 200:
                assert time.monotonic() - back < 10, "/healthz did not say ok again"
                await asyncio.sleep(0.1)
            await asyncio.wait_for(asyncio.gather(*clients), timeout=120)

            # never a 500: accepted, repeated (200), or refused for the store
            assert set(load.statuses()) <= {200, 202, 503}, load.statuses()
            assert load.statuses()[503] >= 10
            keys = {f"c{n}-{i}" for n in range(CLIENTS) for i in range(REQUESTS)}
            assert set(load.accepted) == keys and len(set(load.accepted.values())) == len(keys)
            assert all(load.accepted[key] == request for key, request in before.items())
            for request_id in load.accepted.values():
                deadline = time.monotonic() + 180
                while True:
                    code, status = await _status(session, f"{base}/v1/requests/{request_id}")
                    assert code == 200, status
                    if status["status"] == "completed":
                        break
                    assert status["status"] not in ("failed", "declined"), status
                    assert time.monotonic() < deadline, status
                    await asyncio.sleep(0.5)
            assert await _status(session, f"{base}/healthz") == (200, {"status": "ok", "store": "ok"})
            assert "governord_store_up 1.0" in (await _status(session, f"{base}/metrics"))[1]
        assert daemon.process.poll() is None

        hosts = daemon.ctl_json("hosts", "list", "--all")
        assert len(hosts) == len(keys) and {h["state"] for h in hosts} == {"ready"}
        assert len({h["name"] for h in hosts}) == len(keys)
        vms = lab.vsphere_vm_list()
        # one VM per host, carrying its id: an interrupted clone was found again, not made twice
        assert Counter(vm["host_id"] for vm in vms) == Counter(h["id"] for h in hosts)
        assert sorted(lab.foreman_hosts()) == sorted(h["fqdn"] for h in hosts)
        assert sorted(lab.satellite_systems()) == sorted(h["fqdn"] for h in hosts)
        log = daemon.log.read_text()
        # hosts were mid-step when the server stopped: their steps ran again once it was back
        assert "its step runs again once it is back" in log and "gave back the leases" in log
        assert "level=error" not in log and "Traceback" not in log, log
    finally:
        daemon.stop()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            requests = conn.execute(text("SELECT idempotency_key, state, host_ids FROM requests")).all()
            assert sorted(key for key, _state, _ids in requests) == sorted(keys)  # one request per key
            assert {state for _key, state, _ids in requests} == {"accepted"}
            assert all(len(host_ids) == 1 for _key, _state, host_ids in requests)
            assert conn.execute(text("SELECT count(*) FROM hosts")).scalar() == len(keys)
            assert dict(conn.execute(text("SELECT state, sum(hosts) FROM state_counts GROUP BY state HAVING sum(hosts) <> 0")).all()) == {
                "ready": len(keys)}
            assert conn.execute(text("SELECT sum(hosts) FROM live_counts WHERE app = 'demo'")).scalar() == len(keys)
            assert conn.execute(text("SELECT count(*) FROM address_leases")).scalar() == len(keys)
            assert conn.execute(text("SELECT count(DISTINCT address) FROM hosts")).scalar() == len(keys)
            assert conn.execute(text("SELECT count(*) FROM hosts WHERE lease_owner IS NOT NULL")).scalar() == 0
    finally:
        engine.dispose()
