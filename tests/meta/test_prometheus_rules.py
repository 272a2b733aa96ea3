"""The shipped alerting rules (etc/prometheus/governord-rules.yml) pass ``promtool check rules``,
their unit tests (governord-rules.test.yml) pass ``promtool test rules``, every alert has such a
test that sees it fire, and each carries what an operator needs: a ``for:``, a severity, a
summary and a description. (tests/system/test_prometheus.py loads them into a real Prometheus
scraping a real daemon.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "etc" / "prometheus" / "governord-rules.yml"
RULE_TESTS = ROOT / "etc" / "prometheus" / "governord-rules.test.yml"
SEVERITIES = {"critical", "warning"}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: install Debian's prometheus package (`make apt`)")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=RULES.parent)


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests are not vacuous: with one threshold changed they fail."""
    broken = tmp_path / "governord-rules.yml"
    text = RULES.read_text()
    assert 'governord_hosts{state="failed"}) > 0' in text
    broken.write_text(text.replace('governord_hosts{state="failed"}) > 0', 'governord_hosts{state="failed"}) > 1'))
    tests = tmp_path / "governord-rules.test.yml"
    tests.write_text(RULE_TESTS.read_text())
    result = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "GovernordHostsFailed" in result.stdout + result.stderr


def test_every_alert_is_seen_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts no unit test sees fire"
    assert names - quiet == set(), "alerts no unit test sees quiet"
    assert firing - names == set(), "unit tests of alerts that do not exist"


@pytest.mark.parametrize("rule", _alerts(), ids=lambda rule: rule["alert"])
def test_each_alert_says_how_bad_and_what_to_do(rule: dict[str, Any]) -> None:
    assert rule["alert"].startswith("Governord")
    assert "for" in rule
    assert rule["labels"]["severity"] in SEVERITIES
    assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 60
