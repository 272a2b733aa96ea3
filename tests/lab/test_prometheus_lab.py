"""The lab's Prometheus is the real server: it scrapes a target, answers PromQL, evaluates rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.prometheus import PrometheusLabError, static_job


def test_scrapes_the_exporter_and_follows_its_values(prometheus_factory, exporter) -> None:
    exporter.set("lab_load", 0.25, app="shop")
    server = prometheus_factory([static_job("lab", exporter.target)])
    [sample] = server.wait_for('lab_load{app="shop"}')
    assert sample["value"][1] == "0.25"
    assert server.targets_up() == {f"http://{exporter.target}/metrics": True}
    exporter.set("lab_load", 0.75, app="shop")
    server.wait_for('lab_load{app="shop"} == 0.75')
    exporter.remove("lab_load", app="shop")  # the series goes stale at once: no data
    server.wait_for('absent(lab_load{app="shop"})')


def test_fires_an_alert_of_a_rule_file(prometheus_factory, exporter, tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(json.dumps({"groups": [{"name": "lab", "rules": [
        {"alert": "LabLoadHigh", "expr": "lab_load > 0.5", "labels": {"severity": "warning"}}]}]}))
    exporter.set("lab_load", 0.9, app="shop")
    server = prometheus_factory([static_job("lab", exporter.target)], [rules])
    server.wait_for('ALERTS{alertname="LabLoadHigh",alertstate="firing"}')
    assert [a["labels"]["app"] for a in server.alerts() if a["labels"]["alertname"] == "LabLoadHigh"] == ["shop"]


def test_a_bad_query_is_an_error_naming_it(prometheus_factory) -> None:
    server = prometheus_factory([])
    with pytest.raises(PrometheusLabError, match="bad_data"):
        server.query("sum(")
