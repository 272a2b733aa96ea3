"""The view of a host an application is given: of each registration record and classification
only the keys the registrar declares, and of an error only the step and what became of the host.
The operators' view (admin API) is whole. Through the daemon: tests/system/test_application_views.py."""

from __future__ import annotations

from governord import testing
from governord.errors import PermanentError
from governord.rules import application_error, application_host_summary
from governord.runtime import Runtime

from .conftest import wait_states

INTERNAL = "https://cmdb.internal.example:8443/api/v2/hosts?token=abc"


async def test_the_token_and_its_cloud_config_stay_with_operators(make_runtime) -> None:  # type: ignore[no-untyped-def]
    testing.MemoryRegistrar.preauthorise["cmdb"] = True
    testing.MemoryRegistrar.readiness["cmdb"] = {"demo-node-01.lab.example": False}
    runtime: Runtime = await make_runtime()
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"configuring"})
        token = row["registrations"]["cmdb"]["autosign_token"]
        seen = await runtime.governor.request_status(decision.request)
        assert seen["hosts"][0]["registrations"] == {"cmdb": {"name": row["fqdn"]}}
        assert seen["hosts"][0]["classification"] == {"cmdb": {"group": "nodes", "classes": ["openshift::node"]}}
        assert token not in repr(seen) and "cloud_config" not in repr(seen)
        assert token not in repr(runtime.governor.application_host(row))
        whole = await runtime.governor.request_status(decision.request, operator=True)
        assert whole["hosts"][0]["registrations"]["cmdb"]["autosign_token"] == token
        # a system no configured registrar declares (a plugin's own hook, a registrar since
        # removed from the config) shows applications nothing of its record
        foreign = {**row, "registrations": {**row["registrations"], "elsewhere": {"secret": "s"}}}
        assert runtime.governor.application_host(foreign)["registrations"]["elsewhere"] == {}
    finally:
        await runtime.stop()


async def test_an_application_is_told_the_step_not_the_peers_words(make_runtime) -> None:  # type: ignore[no-untyped-def]
    testing.MemoryRegistrar.faults.setdefault("cmdb", testing.Faults()).fail(
        "register", PermanentError(f"CMDB {INTERNAL} answered 422: hostgroup missing"))
    runtime: Runtime = await make_runtime()
    try:
        decision = await runtime.governor.scale("demo", "node", add=1, actor="t")
        [row] = await wait_states(runtime, decision.request["host_ids"], {"gone"})
        assert INTERNAL in row["error"]
        seen = (await runtime.governor.request_status(decision.request))["hosts"][0]
        assert seen["failed_step"] == "register"
        assert seen["error"] == ("step register failed for good; the host was rolled back "
                                 "(the detail is with governord's operators)")
        whole = (await runtime.governor.request_status(decision.request, operator=True))["hosts"][0]
        assert INTERNAL in whole["error"]
    finally:
        await runtime.stop()


def test_the_reason_says_what_became_of_the_host() -> None:
    base = {"error": f"vCenter {INTERNAL} refused", "registrations": {}, "classification": {}, "failed_step": None}
    assert application_error({**base, "error": None, "state": "ready"}) is None
    retrying = application_error({**base, "state": "provisioning"})
    assert retrying == "step provision failed for a passing reason; it is being tried again " \
                       "(the detail is with governord's operators)"
    kept = application_error({**base, "state": "failed", "failed_step": "register"})
    assert kept is not None and kept.startswith("step register failed for good; the host is kept")
    unwinding = application_error({**base, "state": "deregistering", "failed_step": "configure"})
    assert unwinding is not None and unwinding.startswith("step configure failed for good; the host is being rolled back")
    leaving = application_error({**base, "state": "deprovisioning"})  # a retirement's step, tried again
    assert leaving is not None and leaving.startswith("step deprovision failed for a passing reason")
    for reason in (retrying, kept, unwinding, leaving):
        assert "internal" not in str(reason) and "8443" not in str(reason)
    row = {**base, "id": "i", "name": "n", "fqdn": "n.x", "app": "a", "role": "r", "component": None,
           "origin": "provisioned", "state": "failed", "failed_step": "provision", "provider": "p",
           "machine_id": None, "tags": [], "addresses": [], "retire_requested": False, "created_at": 0.0,
           "updated_at": 0.0, "registrations": {"cmdb": {"name": "n.x", "token": "t"}}}
    assert application_host_summary(row, {"cmdb": frozenset({"name"})})["registrations"] == {"cmdb": {"name": "n.x"}}
