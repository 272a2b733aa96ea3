"""Health tells the truth: readiness follows the peers (a registrar that does not answer, or is
gone, makes the instance not ready, while liveness stays), in `governord-ctl status`, ``/readyz``
on both APIs and ``governord_peer_up``; and what the tags name is checked at the registrars, a
warning at start and a refusal on reload."""

from __future__ import annotations

import json
import os
import signal
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest

from lab.stack import Governord, Lab
from tests.system.conftest import wait_until

pytestmark = pytest.mark.integration

FAST_HEALTH = """
[health]
interval = 0.5
timeout = 1.0
"""


def ready(daemon: Governord) -> tuple[int, dict[str, Any]]:
    code, body = daemon.admin_get("/readyz")
    return code, json.loads(body)


def app_readyz(daemon: Governord) -> tuple[int, dict[str, Any]]:
    """/readyz on the application API, without a client certificate (as a load balancer asks)."""
    context = ssl.create_default_context(cafile=str(daemon.state_dir / "pki" / "ca.pem"))
    context.check_hostname = False
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{daemon.api_port}/readyz", context=context,
                                    timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def peer_up(daemon: Governord, kind: str, name: str) -> float | None:
    code, text = daemon.admin_get("/metrics")
    assert code == 200
    for line in text.splitlines():
        if line.startswith("governord_peer_up{") and f'kind="{kind}"' in line and f'name="{name}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_readiness_follows_the_peers_and_liveness_does_not(lab: Lab) -> None:
    daemon = lab.start_governord(lab.write_config(extra=FAST_HEALTH))
    assert lab.foreman is not None and lab.satellite is not None
    try:
        code, body = wait_until(lambda: (r := ready(daemon))[0] == 200 and r, 30, what="ready")
        assert body["status"] == "ready" and body["reasons"] == []
        assert {(p["kind"], p["name"], p["state"]) for p in body["peers"]} == {
            ("provider", "vsphere", "up"), ("registrar", "foreman", "up"), ("registrar", "satellite", "up")}
        assert peer_up(daemon, "registrar", "foreman") == 1.0
        assert app_readyz(daemon) == (200, {"status": "ready", "store": "ok", "reasons": [], "peers": None})

        # Foreman stops answering (SIGSTOP: connections are accepted, nothing comes back)
        os.kill(lab.foreman.process.pid, signal.SIGSTOP)
        try:
            code, body = wait_until(lambda: (r := ready(daemon))[0] == 503 and r, 30, what="not ready")
            assert body["status"] == "not ready"
            assert body["reasons"] == ["registrar foreman: no answer within 1s ([health] timeout)"]
            assert daemon.admin_get("/healthz")[0] == 200  # alive: nothing to restart
            assert peer_up(daemon, "registrar", "foreman") == 0.0
            assert peer_up(daemon, "registrar", "satellite") == 1.0
            # the application API says which peer, not what the operators' socket says of it
            code, public = app_readyz(daemon)
            assert code == 503 and public["reasons"] == ["registrar foreman: down"] and public["peers"] is None
            shown = daemon.ctl("status").stdout
            assert "NOT READY: registrar foreman: no answer within 1s" in shown
            [row] = [line for line in shown.splitlines() if line.split()[:2] == ["registrar", "foreman"]]
            assert "DOWN" in row
        finally:
            os.kill(lab.foreman.process.pid, signal.SIGCONT)
        wait_until(lambda: ready(daemon)[0] == 200, 30, what="ready again")
        assert peer_up(daemon, "registrar", "foreman") == 1.0
        assert "registrar foreman answers again" in daemon.log.read_text()

        # Satellite is gone: connections refused
        lab.satellite.stop()
        code, body = wait_until(lambda: (r := ready(daemon))[0] == 503 and r, 30, what="not ready")
        [reason] = body["reasons"]
        assert reason.startswith("registrar satellite: ") and "refused" in reason.lower(), reason
        assert daemon.admin_get("/healthz")[0] == 200
    finally:
        daemon.stop()


def test_tags_naming_what_the_registrars_lack_are_a_warning_at_start_and_refuse_a_reload(lab: Lab) -> None:
    config = lab.write_config(extra=FAST_HEALTH)
    good = config.read_text()
    config.write_text(good.replace('hostgroup = "openshift/node"', 'hostgroup = "openshift/nodes"'))
    daemon = lab.start_governord(config)
    try:
        # at start: it runs (other tags work), and says what will fail
        status = wait_until(lambda: (s := daemon.ctl_json("status"))["mappings"] and s, 30, what="the check")
        [problem] = status["mappings"]["problems"]
        assert problem.startswith("tags.node.foreman.hostgroup: ") and "'openshift/nodes'" in problem
        shown = daemon.ctl("status").stdout
        assert f"tag mapping MISSING at its registrar: {problem}" in shown
        code, metrics = daemon.admin_get("/metrics")
        assert 'governord_tag_mapping_problems{registrar="foreman"} 1.0' in metrics
        assert 'governord_tag_mapping_problems{registrar="satellite"} 0.0' in metrics

        # a reload that changes something else is taken: the broken mapping is the running config's
        broken = config.read_text()
        valid_gpu = _tag("gpu", hostgroup="openshift/node", classes='["profile::base"]', group="openshift-nodes")
        config.write_text(broken + valid_gpu)
        assert daemon.ctl("reload").returncode == 0
        assert "gpu" in daemon.ctl_json("status")["tags"]
        assert "the running config names what registrar foreman does not have" in daemon.log.read_text()
        # so is the fix, after which the check finds nothing
        config.write_text(good + valid_gpu)
        daemon.ctl("reload")
        wait_until(lambda: daemon.ctl_json("status")["mappings"]["problems"] == [], 30, what="the check again")
        assert 'governord_tag_mapping_problems{registrar="foreman"} 0.0' in daemon.admin_get("/metrics")[1]
        # a reload whose changed tag names a missing system group and Puppet class is refused, each named
        config.write_text(good + _tag("gpu", hostgroup="openshift/node", classes='["profile::base", "nvidia::drvr"]',
                                      group="openshift-gpu"))
        refused = daemon.ctl("reload", check=False)
        assert refused.returncode == 1
        assert f"{config}: tags.gpu.foreman.puppet_classes: " in refused.stderr and "'nvidia::drvr'" in refused.stderr
        assert f"{config}: tags.gpu.satellite.system_group: " in refused.stderr and "openshift-gpu" in refused.stderr
        status = daemon.ctl_json("status")
        assert "tags.gpu.satellite.system_group" in status["last_reload"]["refused"]
        assert "REFUSED" in daemon.ctl("status").stdout
    finally:
        daemon.stop()


def test_check_mappings_off_takes_the_reload(lab: Lab) -> None:
    config = lab.write_config(extra=FAST_HEALTH.replace("timeout = 1.0", "timeout = 1.0\ncheck_mappings = false"))
    daemon = lab.start_governord(config)
    try:
        config.write_text(config.read_text() + _tag("gpu", hostgroup="openshift/gpu", classes="[]", group="gpu"))
        daemon.ctl("reload")
        status = daemon.ctl_json("status")
        assert "gpu" in status["tags"] and status["mappings"] is None
    finally:
        daemon.stop()


def _tag(name: str, *, hostgroup: str, classes: str, group: str) -> str:
    return f"""
[tags.{name}]
description = "{name} nodes"
foreman = {{ hostgroup = "{hostgroup}", puppet_classes = {classes} }}
satellite = {{ system_group = "{group}" }}
"""
