"""``/metrics`` after real engine work on the in-memory provider and registrar: the names and
types Prometheus' rules ask for, the labels (application, role, provider and registrar
instance), and values that match what happened; the fleet-wide host counts read the live hosts
only, in one grouped query."""

from __future__ import annotations

import datetime
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import event, text

from governord import __version__, testing
from governord.api import admin_api, app_api
from governord.api.tls import ApplicationTLS
from governord.errors import PermanentError, RetryableError
from governord.models import HostState
from governord.rules import RequestError
from governord.runtime import Runtime

from .conftest import BACKENDS, wait_states
from .test_tls import NOW, _ca, _crl, _pem

#: every test here that makes a runtime runs on SQLite and on PostgreSQL (tests/unit/conftest.py)
STORE_BACKENDS = BACKENDS

#: a statement that reads or writes the hosts table (not state_counts' "hosts" column)
TOUCHES_HOSTS = re.compile(r"\b(FROM|JOIN|UPDATE|INTO)\s+\"?hosts\"?(\s|$|,|\))", re.IGNORECASE)
LIVE_STATES = [s.value for s in HostState if s is not HostState.GONE]


def families(body: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(body)}


def samples(body: str, name: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(body) for s in family.samples if s.name == name]


def value(body: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` whose labels include ``labels``; None if none."""
    found = [s.value for s in samples(body, name) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None


async def scrape(runtime: Runtime) -> str:
    return (await runtime.metrics.render()).decode()


async def _real_counts(runtime: Runtime) -> dict[tuple[str, str, str, str], int]:
    async with runtime.store.engine.connect() as conn:
        rows = await conn.execute(text("SELECT app, role, provider, state, count(*) FROM hosts "
                                       "WHERE state != 'gone' GROUP BY app, role, provider, state"))
        return {(app, role, provider, state): n for app, role, provider, state, n in rows}


async def test_a_scrape_reads_the_live_hosts_once_and_counts_right(
        runtime: Runtime, aiohttp_client: Callable[..., Any]) -> None:
    first = await runtime.governor.scale("demo", "node", add=3, actor="t")
    ready = await wait_states(runtime, first.request["host_ids"], {"ready"})
    await runtime.governor.retire(ready[0]["id"], actor="t")
    await wait_states(runtime, [ready[0]["id"]], {"gone"})
    await runtime.governor.scale("demo", "node", add=1, actor="t")  # one in flight, perhaps
    # the background work stops (the engine leaves the new host where it is), so every
    # statement seen below is the scrapes' own
    await runtime.engine.stop(0.0)
    await runtime.notifier.stop()
    await runtime.sweeper.stop()
    await runtime.pruner.stop()

    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(runtime.store.engine.sync_engine, "before_cursor_execute", record)
    try:
        admin = await aiohttp_client(admin_api.create_admin_api(runtime))
        app = await aiohttp_client(app_api.create_app_api(runtime))
        bodies = [await (await client.get("/metrics")).text() for client in (admin, app)]
    finally:
        event.remove(runtime.store.engine.sync_engine, "before_cursor_execute", record)
    touching = [s for s in statements if TOUCHES_HOSTS.search(s)]
    assert len(touching) == 2, touching  # one per scrape
    assert all("GROUP BY" in s and "state != 'gone'" in s for s in touching), touching
    real = await _real_counts(runtime)
    assert real[("demo", "node", "mem", "ready")] == 2
    for body in bodies:
        read = {(s.labels["app"], s.labels["role"], s.labels["provider"], s.labels["state"]): s.value
                for s in samples(body, "governord_hosts")}
        # every live state of the one app/role/provider, zeros included; never gone
        assert set(read) == {("demo", "node", "mem", state) for state in LIVE_STATES}
        assert read == {key: float(real.get(key, 0)) for key in read}


async def test_engine_work_is_counted_with_its_instances(make_runtime: Callable[..., Any]) -> None:
    """A provision that fails twice and then works, a registration that fails for good (the host
    rolled back), a cap reached: each counted where it happened."""
    runtime = await make_runtime()
    try:
        testing.MemoryProvider.faults.setdefault("mem", testing.Faults()).fail(
            "create_or_find", RetryableError("vCenter busy"), count=2)
        good = await runtime.governor.scale("demo", "node", add=2, actor="t")
        assert good.request["state"] == "accepted"
        await wait_states(runtime, good.request["host_ids"], {"ready"})
        testing.MemoryRegistrar.faults.setdefault("cmdb", testing.Faults()).fail(
            "register", PermanentError("hostgroup missing"))
        bad = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [gone] = await wait_states(runtime, bad.request["host_ids"], {"gone"})
        assert gone["failed_step"] == "register"
        over = await runtime.governor.scale("demo", "node", add=5, actor="t")
        assert over.request["state"] == "declined"
        body = await scrape(runtime)
    finally:
        await runtime.stop()

    kinds = {name: family.type for name, family in families(body).items()}
    assert kinds["governord_host_transitions"] == "counter"
    assert kinds["governord_step_duration_seconds"] == "histogram"
    assert kinds["governord_build_info"] == "gauge"  # an info metric, in the text format
    assert value(body, "governord_build_info", version=__version__,
                 python=".".join(map(str, sys.version_info[:3]))) == 1.0

    # steps: two retries of provision on mem, then three provisions; one registration failed for good
    assert value(body, "governord_step_retries_total", step="provision", provider="mem") == 2.0
    assert value(body, "governord_step_failures_total", step="register", provider="") == 1.0
    assert value(body, "governord_step_duration_seconds_count", step="provision", provider="mem") == 3.0
    assert value(body, "governord_step_duration_seconds_count", step="register", provider="") == 2.0
    assert value(body, "governord_step_duration_seconds_count", step="deprovision", provider="mem") == 1.0  # rollback
    assert (value(body, "governord_step_duration_seconds_bucket", step="provision", provider="mem", le="+Inf")
            == 3.0)
    assert value(body, "governord_step_duration_seconds_count", step="configure", provider="") == 2.0

    # hooks: the provider instance the call was for, the registrar instance that answered
    assert value(body, "governord_hook_calls_total", hook="governord_provision_host",
                 plugin="builtin:provisioning", provider="mem", registrar="") == 5.0
    assert value(body, "governord_hook_failures_total", hook="governord_provision_host",
                 plugin="builtin:provisioning", provider="mem", registrar="") == 2.0
    assert value(body, "governord_hook_failures_total", hook="governord_register_host",
                 plugin="registrar:cmdb", provider="", registrar="cmdb") == 1.0
    assert value(body, "governord_hook_calls_total", hook="governord_register_host",
                 plugin="registrar:cmdb", provider="", registrar="cmdb") == 3.0

    # each registrar's part of a step, timed per call: three registrations tried, one failed
    assert value(body, "governord_hook_duration_seconds_count", hook="governord_register_host",
                 plugin="registrar:cmdb", provider="", registrar="cmdb") == 3.0
    assert value(body, "governord_hook_duration_seconds_count", hook="governord_provision_host",
                 plugin="builtin:provisioning", provider="mem", registrar="") == 5.0
    assert samples(body, "governord_hook_duration_seconds_count") and not [
        s for s in samples(body, "governord_hook_duration_seconds_count") if s.labels["hook"] == "governord_host_event"]

    # transitions, decisions
    assert value(body, "governord_host_transitions_total", from_state="configuring", to_state="ready") == 2.0
    assert value(body, "governord_host_transitions_total", from_state="cleaning", to_state="gone") == 1.0
    assert value(body, "governord_decisions_total", app="demo", kind="scale", outcome="accepted",
                 rule="placement") == 2.0
    assert value(body, "governord_decisions_total", app="demo", kind="scale", outcome="declined",
                 rule="max_hosts") == 1.0

    # fleet-wide, and this instance's own
    assert value(body, "governord_hosts", app="demo", role="node", provider="mem", state="ready") == 2.0
    assert value(body, "governord_hosts", app="demo", role="node", provider="mem", state="failed") == 0.0
    assert value(body, "governord_fleet_instances", status="up") == 1.0
    assert value(body, "governord_requests_pending", app="demo") == 0.0
    assert samples(body, "governord_request_pending_oldest_timestamp_seconds") == []
    assert value(body, "governord_leader") == 1.0 and value(body, "governord_store_up") == 1.0
    assert value(body, "governord_engine_workers") == 4.0
    assert value(body, "governord_fenced_writes_refused_total") == 0.0
    assert value(body, "governord_steps_taken_over_total") == 0.0
    # governord's CA: ten years from when the runtime made it
    ca = value(body, "governord_certificate_expiry_timestamp_seconds", certificate="ca")
    assert ca is not None and abs(ca - (time.time() + 3650 * 86400)) < 3600


async def test_pending_approvals_and_their_decisions(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(patch=lambda t: t.replace("max_hosts = 5", 'max_hosts = 5\napproval = "always"'))
    try:
        before = time.time()
        first = await runtime.governor.scale("demo", "node", add=1, actor="t")
        await runtime.governor.scale("demo", "node", add=1, actor="t")
        assert first.request["state"] == "pending"
        body = await scrape(runtime)
        assert value(body, "governord_requests_pending", app="demo") == 2.0
        oldest = value(body, "governord_request_pending_oldest_timestamp_seconds", app="demo")
        assert oldest == first.request["created_at"] and before <= oldest <= time.time()
        assert value(body, "governord_decisions_total", app="demo", kind="scale", outcome="pending",
                     rule="approval") == 2.0
        await runtime.governor.decide_pending(first.request["id"], approve=False, comment="no", actor="op")
        body = await scrape(runtime)
        assert value(body, "governord_requests_pending", app="demo") == 1.0
        assert value(body, "governord_decisions_total", app="demo", kind="scale", outcome="denied",
                     rule="operator") == 1.0
    finally:
        await runtime.stop()


async def test_releases_are_decisions_too(make_runtime: Callable[..., Any]) -> None:
    runtime = await make_runtime(patch=lambda t: t.replace("max_hosts = 5", "max_hosts = 5\nmin_hosts = 1"))
    try:
        made = await runtime.governor.scale("demo", "node", add=2, actor="t")
        await wait_states(runtime, made.request["host_ids"], {"ready"})
        await runtime.governor.release("demo", role="node", count=1, actor="t")
        try:
            await runtime.governor.release("demo", role="node", count=1, actor="t")
        except RequestError as exc:
            assert exc.status == 409
        else:
            raise AssertionError("a release below min_hosts was taken")
        body = await scrape(runtime)
    finally:
        await runtime.stop()
    assert value(body, "governord_decisions_total", app="demo", kind="release", outcome="accepted",
                 rule="release") == 1.0
    assert value(body, "governord_decisions_total", app="demo", kind="release", outcome="declined",
                 rule="min_hosts") == 1.0


async def test_every_name_follows_prometheus_rules(runtime: Runtime) -> None:
    """Counters end in _total, units are base units, no label is one Prometheus sets itself."""
    made = await runtime.governor.scale("demo", "node", add=1, actor="t")
    await wait_states(runtime, made.request["host_ids"], {"ready"})
    runtime.metrics.refused("unknown_ca", "handshake")
    body = await scrape(runtime)
    found = families(body)
    assert len(found) > 20
    for name, family in found.items():
        assert re.fullmatch(r"governord_[a-z_]+", name), name
        for sample in family.samples:
            assert not {"instance", "job"} & set(sample.labels), sample
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            if "seconds" in name:
                assert name.endswith(("_seconds", "_timestamp_seconds")), name
        assert not name.endswith(("_milliseconds", "_minutes", "_ms")), name
    assert "governord_hook_calls" in found and found["governord_hook_calls"].type == "counter"


async def test_certificates_and_the_crl_report_their_soonest_expiry(runtime: Runtime, tmp_path: Path) -> None:
    """governord's CA, the server certificate it issued, a site CA bundle of two (the sooner one
    counts) and its CRLs' next update, read again when a file changes."""
    server = runtime.ca.issue("localhost", server_names=["localhost"], stem="server")
    assert server.key is not None
    soon, late = _ca("Site CA soon"), _ca("Site CA late", days=400)
    bundle = tmp_path / "site-ca.pem"
    bundle.write_bytes(_pem(late[0]) + _pem(soon[0]))
    crl = tmp_path / "crl.pem"
    crl.write_bytes(_crl(soon, [], next_update=NOW + datetime.timedelta(hours=5))
                    + _crl(late, [], next_update=NOW + datetime.timedelta(hours=2)))
    runtime.metrics.tls = ApplicationTLS(certificate=server.certificate, key=server.key, client_ca=bundle,
                                         client_crl=crl, count=runtime.metrics.refused)
    body = await scrape(runtime)
    expiry = {s.labels["certificate"]: s.value
              for s in samples(body, "governord_certificate_expiry_timestamp_seconds")}
    assert set(expiry) == {"ca", "server", "client_ca"}
    assert expiry["server"] == server.not_after
    assert expiry["client_ca"] == soon[0].not_valid_after_utc.timestamp()  # the sooner of the bundle
    ca = x509.load_pem_x509_certificate(runtime.ca.cert_path.read_bytes())
    assert expiry["ca"] == ca.not_valid_after_utc.timestamp()
    next_update = value(body, "governord_client_crl_next_update_timestamp_seconds")
    assert next_update == int((NOW + datetime.timedelta(hours=2)).timestamp())

    bundle.write_bytes(_pem(late[0]))  # the sooner CA taken out: read again
    body = await scrape(runtime)
    assert value(body, "governord_certificate_expiry_timestamp_seconds", certificate="client_ca") == \
        late[0].not_valid_after_utc.timestamp()


async def test_a_failing_observer_fails_nothing_it_observes(make_runtime: Callable[..., Any],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The metrics hear of calls, steps, transitions and decisions through callbacks; one that
    raises is logged, and neither the host's way to ready nor the other observers suffer."""
    runtime = await make_runtime()
    heard: list[str] = []

    def broken(*_args: Any) -> None:
        raise RuntimeError("observer bug")

    for observers in (runtime.dispatcher.on_call, runtime.engine.on_step, runtime.engine.on_transition,
                      runtime.governor.on_decision):
        observers.insert(0, broken)
    runtime.engine.on_transition.append(lambda row, _previous: heard.append(row["state"]))
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        assert decision.request["state"] == "accepted"
        await wait_states(runtime, decision.request["host_ids"], {"ready"})
        body = await scrape(runtime)
    finally:
        await runtime.stop()
    assert heard[-1] == "ready"
    # the metrics' own observers still counted, after the broken one
    accepted = [s.value for s in samples(body, "governord_decisions_total") if s.labels.get("outcome") == "accepted"]
    assert sum(accepted) == 1.0
    assert value(body, "governord_host_transitions_total", from_state="configuring", to_state="ready") == 1.0
    failures = [r for r in caplog.records if r.getMessage().startswith("observer ") and "failed" in r.getMessage()]
    assert failures and all(r.exc_info and "observer bug" in str(r.exc_info[1]) for r in failures)
