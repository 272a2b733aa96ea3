"""kill -9 in the middle of provisioning and of retirement, then a restart: the work finishes
with no duplicate machine, no leaked machine and no orphan registration.

The last tests are the shortened forms of the crash harness (lab/crash.py: 10 hosts, 3 rounds, vcsim
slowed down so that every phase is long enough to be killed in; and one round on a fleet of
three instances on PostgreSQL). The full forms, 100 hosts and 20 rounds, are one command each:

    .venv/bin/python -m lab.crash --hosts 100 --rounds 20 --seed 1
    .venv/bin/python -m lab.crash --hosts 100 --rounds 20 --seed 1 --instances 3 --store postgresql
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.crash import MUST_BE_ZERO, CrashHarness, line, start_lab
from lab.stack import Governord, Lab

from .conftest import db_hosts, wait_until

COUNT = 5


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """The lab with a vcsim that takes 40 ms per SOAP call: a provision or destroy takes seconds,
    so a kill after its step-started commit lands while the provider call runs."""
    with Lab(tmp_path / "lab") as the_lab:
        the_lab.start_foreman()
        the_lab.start_satellite()
        the_lab.start_vcsim(delay_ms=40)
        the_lab.start_platform("vsphere")
        yield the_lab


def _kill_when(daemon: Governord, states: set[str]) -> list[dict]:  # type: ignore[type-arg]
    """SIGKILL the daemon as soon as its database shows a step of one of ``states`` started
    (the try counted and committed, the external call under way)."""
    rows = wait_until(lambda: [r for r in db_hosts(daemon) if r["state"] in states and r["attempts"] >= 1] or None,
                      timeout=60, interval=0.01, what=f"a started step in {states}")
    daemon.kill()
    return rows


def _assert_converged(lab: Lab, daemon: Governord, live: int) -> None:
    hosts = [h for h in daemon.ctl_json("hosts", "list", "--all")]
    ready = {h["name"]: h for h in hosts if h["state"] == "ready"}
    assert len(ready) == live and all(h["state"] in ("ready", "gone") for h in hosts), hosts
    vms = lab.vsphere_vms()
    # exactly one machine per live host, carrying that host's id; nothing else owned
    assert sorted(vms) == sorted(ready)
    assert Counter(vm["host_id"] for vm in vms.values()) == Counter(h["id"] for h in ready.values())
    assert sorted(lab.foreman_hosts()) == sorted(h["fqdn"] for h in ready.values())
    assert sorted(lab.satellite_systems()) == sorted(h["fqdn"] for h in ready.values())


def test_kill_9_mid_provision_and_mid_retire_converges(lab: Lab) -> None:
    config = lab.write_config(workers=2)
    daemon = lab.start_governord(config)
    daemon.ctl("scale", "demo", "node", "--add", str(COUNT))

    # two crashes during the scale-up, each while a machine is being made
    for _ in range(2):
        caught = _kill_when(daemon, {"provisioning"})
        assert caught, "the kill did not land mid-provision"
        daemon = lab.start_governord(config)
    wait_until(lambda: all(r["state"] == "ready" for r in db_hosts(daemon)) and len(db_hosts(daemon)) == COUNT,
               timeout=120, what="all hosts ready")
    _assert_converged(lab, daemon, COUNT)
    # the interrupted steps were run again (a second try of the same step), not skipped
    events = [e for h in daemon.ctl_json("hosts", "list") for e in
              daemon.ctl_json("hosts", "show", h["name"])["events"]]
    retried = [e for e in events if e["kind"] == "step-started" and e["detail"].get("step") == "provision"
               and e["detail"].get("attempt", 1) > 1]
    assert retried, "no provision step was interrupted and run again"

    # retire everything in one request; crash while deregistering/deprovisioning
    daemon.ctl("scale", "demo", "node", "--count", "0")
    caught = _kill_when(daemon, {"deregistering", "deprovisioning"})
    assert caught
    daemon = lab.start_governord(config)
    wait_until(lambda: all(r["state"] == "gone" for r in db_hosts(daemon)), timeout=120, what="all hosts gone")
    _assert_converged(lab, daemon, 0)
    assert lab.vsphere_vms() == {} and lab.foreman_hosts() == {} and lab.satellite_systems() == {}
    daemon.stop()


def test_sigterm_parks_in_flight_work_and_restart_finishes_it(lab: Lab) -> None:
    config = lab.write_config(workers=2)
    daemon = lab.start_governord(config)
    daemon.ctl("scale", "demo", "node", "--add", "3")
    wait_until(lambda: any(r["state"] == "provisioning" for r in db_hosts(daemon)), 60, 0.01, "provisioning")
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.read_notifications(0.5)
    # nothing is left leased or claimed as running by the stopped process
    assert all(r["lease_owner"] is None for r in db_hosts(daemon))
    daemon = lab.start_governord(config)
    wait_until(lambda: len(db_hosts(daemon)) == 3 and all(r["state"] == "ready" for r in db_hosts(daemon)),
               120, what="ready after restart")
    _assert_converged(lab, daemon, 3)
    daemon.stop()


def test_crash_harness_short_form(tmp_path: Path) -> None:
    """SIGKILL at random moments of 3 rounds of 10 hosts up and down: after every phase each host
    is where its request put it, one machine each, and nothing else exists anywhere."""
    with Lab(tmp_path / "lab") as lab:
        start_lab(lab, vcsim_delay_ms=40)
        results = CrashHarness(lab, hosts=10, seed=5, window=4.0, workers=8).run(3)
    assert [(r.round, r.phase) for r in results] == [(n, p) for n in (1, 2, 3) for p in ("up", "down")]
    for result in results:
        assert {name: getattr(result, name) for name in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), line(result)
        assert result.hosts == 10 and (result.ready if result.phase == "up" else result.gone) == 10, line(result)
        # a phase lasts longer than the window with vcsim slowed down: it was killed at least once
        assert result.kills >= 1, line(result)
    # and the kills cut steps off while they ran, which were then run again
    assert sum(r.redone for r in results) >= 1


def test_crash_harness_short_form_on_a_fleet(tmp_path: Path, new_postgres_database: Callable[[], str]) -> None:
    """The harness's fleet form, shortened to one round of 10 hosts (three instances on one
    PostgreSQL database): a random instance killed -9 each time, restarted at once or after the
    others took its steps over; after each phase the same invariants hold. (Takeovers by another
    instance are checked one by one in test_fleet.py.) The full form:

        .venv/bin/python -m lab.crash --hosts 100 --rounds 20 --seed 1 --instances 3 --store postgresql
    """
    with Lab(tmp_path / "lab") as lab:
        start_lab(lab, vcsim_delay_ms=40)
        results = CrashHarness(lab, hosts=10, seed=7, window=4.0, workers=8, store_url=new_postgres_database(),
                               instances=3, lease_seconds=6.0).run(1)
    assert [(r.round, r.phase) for r in results] == [(1, "up"), (1, "down")]
    for result in results:
        assert {name: getattr(result, name) for name in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), line(result)
        assert result.hosts == 10 and (result.ready if result.phase == "up" else result.gone) == 10, line(result)
        assert result.kills >= 1, line(result)
