"""A real Prometheus (Debian's, lab/prometheus) scrapes the real daemon's ``/metrics`` over HTTPS
(verifying the server certificate with governord's CA) with the shipped alerting rules loaded,
their ``for:`` shortened to a second. A host fails for good and is kept failed: Prometheus fires
GovernordHostsFailed and GovernordStepFailures for it, and nothing else but what the scene
makes true. Then every query of the shipped Grafana dashboard, its variables filled in as Grafana
would, is run against that Prometheus: each must parse and answer with at least one series. And
every governord metric the rules and the dashboard name is one the daemon exports."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from cryptography import x509

from lab.prometheus import Prometheus, PrometheusLabError, static_job
from lab.stack import Governord, Lab
from tests.fixtures.prometheus import StartPrometheus

from .conftest import BROKEN_ROLE, wait_until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "etc" / "prometheus" / "governord-rules.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "governord-dashboard.json"

#: a tag whose Satellite system group does not exist: registration fails for good, after the
#: machine exists; and an application whose requests wait for an operator's approval
SCENE = BROKEN_ROLE + """
[applications.gated]
max_hosts = 2
approval = "always"

[applications.gated.roles.node]
tags = ["node"]
provider = "vsphere"
network = "lab"
domain = "lab.example"
name_pattern = "gated-node-{seq:02d}"
profile = { template = "rhel9-template", cpus = 2, memory_mb = 4096 }
"""

#: what Grafana puts in for its variables: the app variable's "All", and intervals that fit a
#: Prometheus scraping every second
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$app": ".*"}
#: named by a rule but exported only with [api.tls] client_crl, which this scene has not
ONLY_WITH_A_CRL = {"governord_client_crl_next_update_timestamp_seconds"}


@pytest.fixture
def daemon(lab: Lab) -> Iterator[Governord]:
    config = lab.write_config(on_permanent_failure="keep", retry_limit=2, retry_backoff=0.2, retry_backoff_max=0.5)
    config.write_text(config.read_text() + SCENE)
    governord = lab.start_governord(config)
    yield governord
    governord.stop()


def quick_rules(directory: Path) -> Path:
    """The shipped rules with every ``for:`` a second, and nothing else changed."""
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    path = directory / "governord-rules.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of every panel, Grafana's variables filled in."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable the test does not fill: {expr}"
            found.append((panel["title"], expr))
    return found


def firing(prometheus: Prometheus) -> dict[str, list[dict[str, str]]]:
    alerts: dict[str, list[dict[str, str]]] = {}
    for alert in prometheus.alerts():
        if alert["state"] == "firing":
            alerts.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
    return alerts


@pytest.mark.timeout(600)
def test_prometheus_scrapes_governord_fires_on_a_failed_host_and_answers_every_panel(
        lab: Lab, daemon: Governord, prometheus_factory: StartPrometheus, tmp_path: Path) -> None:
    ca = daemon.state_dir / "pki" / "ca.pem"
    job = static_job("governord", f"127.0.0.1:{daemon.api_port}", scheme="https",
                     tls_config={"ca_file": str(ca), "server_name": "localhost"})
    prometheus = prometheus_factory([job], [quick_rules(tmp_path)])
    wait_until(lambda: prometheus.query('up{job="governord"} == 1'), timeout=30, what="the daemon scraped")

    # the scene: one host made, one that fails for good (kept failed), one request held for
    # approval, one declined by the cap, one client refused (no certificate)
    good = daemon.ctl_json("scale", "demo", "node", "--add", "1", "--wait")
    assert good["decision"] == "accepted" and good["status"] == "completed"
    broken = daemon.ctl_json("scale", "demo", "broken", "--add", "1")
    host_id = broken["hosts"][0]["id"]
    wait_until(lambda: [r for r in daemon.db_rows("hosts") if r["id"] == host_id and r["state"] == "failed"],
               timeout=120, what="the broken host failed")
    held = daemon.ctl("scale", "gated", "node", "--add", "1", "--json", check=False)
    assert json.loads(held.stdout)["decision"] == "pending"
    declined = daemon.ctl("scale", "demo", "node", "--add", "50", "--json", check=False)
    assert "cap reached" in declined.stdout + declined.stderr
    refused = requests.get(f"https://127.0.0.1:{daemon.api_port}/v1/hosts", verify=str(ca), timeout=10)
    assert refused.status_code in (401, 403)

    # the rules: the failed host fires its alerts, in Prometheus, from the real scrape
    def failed_alerts() -> dict[str, list[dict[str, str]]] | None:
        alerts = firing(prometheus)
        return alerts if {"GovernordHostsFailed", "GovernordStepFailures"} <= set(alerts) else None

    try:
        alerts = wait_until(failed_alerts, timeout=60, interval=0.5, what="GovernordHostsFailed firing")
    except AssertionError:
        pytest.fail(f"alerts now: {prometheus.alerts()}; rules: {prometheus.api('rules')}")
    assert alerts["GovernordHostsFailed"] == [{"alertname": "GovernordHostsFailed", "severity": "critical",
                                               "app": "demo", "role": "broken", "provider": "vsphere"}]
    assert [(a["step"], a["severity"]) for a in alerts["GovernordStepFailures"]] == [("register", "warning")]
    # and not what is not so: the daemon is up, its store answers, one leader, no sweep findings
    quiet = {"GovernordDown", "GovernordAbsent", "GovernordStoreDown", "GovernordNoLeader", "GovernordSweepFindings",
             "GovernordCertificateExpiringSoon", "GovernordFencedWrites"}
    assert quiet & set(firing(prometheus)) == set()

    # the certificates the daemon serves and trusts, as Prometheus has them
    expiry = {sample["metric"]["certificate"]: float(sample["value"][1])
              for sample in prometheus.query("governord_certificate_expiry_timestamp_seconds")}
    served = x509.load_pem_x509_certificate((daemon.state_dir / "pki" / "issued" / "server.pem").read_bytes())
    assert expiry == {"ca": x509.load_pem_x509_certificate(ca.read_bytes()).not_valid_after_utc.timestamp(),
                      "server": served.not_valid_after_utc.timestamp()}

    # a role scaling on a query of this same Prometheus (within its band: nothing is asked), taken
    # by a reload, so the autoscaler's series are there for its panels
    daemon.config.write_text(daemon.config.read_text() + f"""
[prometheus]
url = "{prometheus.url}"

[applications.demo.roles.node.autoscale]
query = "vector(0.5)"
scale_up_above = 0.8
scale_down_below = 0.3
interval = 0.5
""")
    daemon.ctl("reload")
    wait_until(lambda: prometheus.query('governord_autoscale_value{app="demo",role="node"} == 0.5'), timeout=30,
               what="the autoscale rule's value scraped")

    # the dashboard: every panel's query parses and answers with a series
    time.sleep(3)  # a few more scrapes: rate() and increase() over the new series need two samples
    empty = []
    for title, expr in dashboard_queries():
        try:
            result = prometheus.query(expr)
        except PrometheusLabError as exc:
            pytest.fail(f"panel {title!r}: {expr}: {exc}")
        if not result:
            empty.append((title, expr))
    assert empty == [], "panels whose query answered no series"

    # every governord metric named by the rules and the dashboard is exported
    exported = {sample["metric"]["__name__"]
                for sample in prometheus.query('count by (__name__) ({__name__=~"governord_.+"})')}
    named = set(re.findall(r"governord_[a-z_]+", RULES.read_text() + DASHBOARD.read_text()))
    assert named - exported - ONLY_WITH_A_CRL == set()
