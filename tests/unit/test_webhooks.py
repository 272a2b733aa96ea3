"""governord.webhooks: the signature scheme (sign, verify, status codes), the deploy event, and
the webhook rules that map events to scale requests (their config)."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError

from governord.config import WebhookRule, WebhookSection
from governord.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeployEvent,
    WebhookRefused,
    sign,
    signature_headers,
    verify,
)

SECRET = b"It's a Secret to Everybody"
BODY = b'{"event":"deploy","openshift_version":"v2","app":"shop","namespace":"acme"}'
NOW = 1_700_000_000.0


def refused(headers: dict[str, str], body: bytes = BODY, *, secrets: tuple[bytes, ...] = (SECRET,),
            now: float = NOW, tolerance: float = 300) -> WebhookRefused:
    with pytest.raises(WebhookRefused) as info:
        verify(secrets, headers, body, now=now, tolerance=tolerance)
    return info.value


def test_sign_is_hmac_sha256_over_delivery_timestamp_body() -> None:
    expected = hmac.new(SECRET, b"d-1.1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, "d-1", 1_700_000_000, BODY) == f"v1={expected}"


def test_round_trip_returns_the_delivery_id() -> None:
    headers = signature_headers(SECRET, BODY, delivery="0b6c7f0e-1d2a-4c1e-9f77-5a1d1a2b3c4d", now=NOW)
    assert headers[TIMESTAMP_HEADER] == "1700000000"
    assert verify([SECRET], headers, BODY, now=NOW) == "0b6c7f0e-1d2a-4c1e-9f77-5a1d1a2b3c4d"


def test_default_delivery_is_a_fresh_uuid_and_timestamp_is_the_clock() -> None:
    first, second = signature_headers(SECRET, BODY), signature_headers(SECRET, BODY)
    assert first[DELIVERY_HEADER] != second[DELIVERY_HEADER]
    assert len(first[DELIVERY_HEADER]) == 36
    assert abs(int(first[TIMESTAMP_HEADER]) - time.time()) < 5
    assert verify([SECRET], first, BODY, now=time.time()) == first[DELIVERY_HEADER]


def test_aiohttp_headers_are_case_insensitive() -> None:
    headers = {k.lower(): v for k, v in signature_headers(SECRET, BODY, now=NOW).items()}
    assert verify([SECRET], CIMultiDictProxy(CIMultiDict(headers)), BODY, now=NOW)
    assert verify([SECRET], headers, BODY, now=NOW)


@pytest.mark.parametrize("tamper", ["body", "delivery", "timestamp", "secret"])
def test_tampering_is_401(tamper: str) -> None:
    headers = signature_headers(SECRET, BODY, delivery="d-1", now=NOW)
    body, secrets = BODY, (SECRET,)
    if tamper == "body":
        body = BODY.replace(b"shop", b"shoq")
    elif tamper == "delivery":
        headers[DELIVERY_HEADER] = "d-2"
    elif tamper == "timestamp":
        headers[TIMESTAMP_HEADER] = str(int(NOW) + 1)
    else:
        secrets = (b"another secret",)
    exc = refused(headers, body, secrets=secrets)
    assert (exc.status, exc.reason, exc.field) == (401, "signature does not match", SIGNATURE_HEADER)


@pytest.mark.parametrize("skew", [-300, -1, 0, 1, 299.5, 300])
def test_skew_inside_the_window_is_accepted(skew: float) -> None:
    headers = signature_headers(SECRET, BODY, delivery="d-1", now=NOW)
    assert verify([SECRET], headers, BODY, now=NOW + skew) == "d-1"


@pytest.mark.parametrize(("skew", "words"), [(301, "behind"), (-301, "ahead of"), (86400, "behind")])
def test_skew_outside_the_window_is_401_naming_the_offset(skew: float, words: str) -> None:
    headers = signature_headers(SECRET, BODY, delivery="d-1", now=NOW)
    exc = refused(headers, now=NOW + skew)
    assert exc.status == 401 and exc.field == TIMESTAMP_HEADER
    assert f"{abs(skew)} s {words} governord's clock" in exc.reason


def test_tolerance_is_the_callers() -> None:
    headers = signature_headers(SECRET, BODY, delivery="d-1", now=NOW)
    assert verify([SECRET], headers, BODY, now=NOW + 50, tolerance=60) == "d-1"
    assert refused(headers, now=NOW + 61, tolerance=60).status == 401


def test_a_stale_forgery_is_reported_as_a_bad_signature_not_a_clock_problem() -> None:
    headers = signature_headers(b"wrong", BODY, delivery="d-1", now=NOW - 3600)
    assert refused(headers).reason == "signature does not match"


def test_rotation_any_secret_verifies_any_signature() -> None:
    old, new = b"old secret", b"new secret"
    signed_by_old = signature_headers(old, BODY, delivery="d-1", now=NOW)
    signed_by_both = signature_headers([old, new], BODY, delivery="d-1", now=NOW)
    assert signed_by_both[SIGNATURE_HEADER].count("v1=") == 2
    assert verify([new, old], signed_by_old, BODY, now=NOW) == "d-1"
    assert verify([new], signed_by_both, BODY, now=NOW) == "d-1"
    assert verify([old], signed_by_both, BODY, now=NOW) == "d-1"
    assert refused(signed_by_both, secrets=(b"retired",)).status == 401


def test_unknown_schemes_are_ignored_beside_v1() -> None:
    headers = signature_headers(SECRET, BODY, delivery="d-1", now=NOW)
    headers[SIGNATURE_HEADER] = f"v2=c29tZXRoaW5nIG5ldw==, {headers[SIGNATURE_HEADER]}"
    assert verify([SECRET], headers, BODY, now=NOW) == "d-1"


def _good() -> dict[str, str]:
    return signature_headers(SECRET, BODY, delivery="d-1", now=NOW)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({DELIVERY_HEADER: None}, DELIVERY_HEADER),
        ({TIMESTAMP_HEADER: None}, TIMESTAMP_HEADER),
        ({SIGNATURE_HEADER: None}, SIGNATURE_HEADER),
        ({DELIVERY_HEADER: ""}, DELIVERY_HEADER),
        ({DELIVERY_HEADER: "a.b"}, DELIVERY_HEADER),
        ({DELIVERY_HEADER: "x" * 129}, DELIVERY_HEADER),
        ({DELIVERY_HEADER: "d 1"}, DELIVERY_HEADER),
        ({TIMESTAMP_HEADER: "1700000000.5"}, TIMESTAMP_HEADER),
        ({TIMESTAMP_HEADER: "-1700000000"}, TIMESTAMP_HEADER),
        ({TIMESTAMP_HEADER: "+1700000000"}, TIMESTAMP_HEADER),
        ({TIMESTAMP_HEADER: "soon"}, TIMESTAMP_HEADER),
        ({TIMESTAMP_HEADER: "1" * 13}, TIMESTAMP_HEADER),
        ({SIGNATURE_HEADER: ""}, SIGNATURE_HEADER),
        ({SIGNATURE_HEADER: "sha256=" + "0" * 64}, SIGNATURE_HEADER),
        ({SIGNATURE_HEADER: "0" * 64}, SIGNATURE_HEADER),
        ({SIGNATURE_HEADER: "v1=" + "0" * 63}, SIGNATURE_HEADER),
        ({SIGNATURE_HEADER: "v1=" + "A" * 64}, SIGNATURE_HEADER),
        ({SIGNATURE_HEADER: "v1=,"}, SIGNATURE_HEADER),
        ({SIGNATURE_HEADER: ",".join(["v1=" + "0" * 64] * 9)}, SIGNATURE_HEADER),
    ],
)
def test_missing_or_malformed_headers_are_400(change: dict[str, Any], field: str) -> None:
    headers = _good()
    for name, value in change.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    exc = refused(headers)
    assert exc.status == 400 and exc.field == field
    assert field in exc.reason


def test_a_repeated_header_is_400() -> None:
    headers = CIMultiDict(_good())
    headers.add(DELIVERY_HEADER, "d-2")
    exc = refused(CIMultiDictProxy(headers))  # type: ignore[arg-type]
    assert exc.status == 400 and "2 times" in exc.reason


def test_eight_signatures_are_allowed() -> None:
    headers = _good()
    headers[SIGNATURE_HEADER] = ",".join(["v1=" + "0" * 64] * 7 + [headers[SIGNATURE_HEADER]])
    assert verify([SECRET], headers, BODY, now=NOW) == "d-1"


def test_no_secret_is_the_callers_error() -> None:
    with pytest.raises(ValueError):
        verify([], _good(), BODY, now=NOW)
    with pytest.raises(ValueError):
        verify([b""], _good(), BODY, now=NOW)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((b"", "d-1", 1), "empty"),
        ((SECRET, "d.1", 1), "delivery"),
        ((SECRET, "d-1", -1), "timestamp"),
        ((SECRET, "d-1", True), "timestamp"),
        ((SECRET, "d-1", 1.5), "timestamp"),
    ],
)
def test_sign_refuses_what_verify_would(args: tuple[bytes, str, Any], message: str) -> None:
    secret, delivery, timestamp = args
    with pytest.raises(ValueError, match=message):
        sign(secret, delivery, timestamp, BODY)


def test_comparison_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module governord.webhooks calls
    headers = signature_headers([b"one", b"two"], BODY, delivery="d-1", now=NOW)
    assert verify([b"two", b"one"], headers, BODY, now=NOW) == "d-1"
    # every offered signature against every secret, even after a match
    assert len(calls) == 4


# --- DeployEvent ---------------------------------------------------------------------------

V2 = {"event": "deploy", "openshift_version": "v2", "app": "shop", "namespace": "acme",
      "dns": "shop-acme.rhcloud.com", "gear_uuid": "52e9a2b6e0b8cd8a6b000012",
      "app_uuid": "52e9a2b6e0b8cd8a6b000012", "branch": "master", "component": "web"}
V4 = {"event": "post_deploy", "openshift_version": "v4", "app": "frontend", "namespace": "shop-prod",
      "deployment": "frontend-3", "pod": "frontend-3-hook-post", "dns": "shop.apps.example.com"}


@pytest.mark.parametrize("data", [V2, V4, {k: V2[k] for k in ("event", "openshift_version", "app", "namespace")}])
def test_deploy_event_accepts_what_the_hooks_send(data: dict[str, Any]) -> None:
    event = DeployEvent.model_validate(data)
    assert event.model_dump(exclude_none=True) == data


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"colour": "blue"}, "colour"),
        ({"event": "pre"}, "event"),
        ({"openshift_version": "v3"}, "openshift_version"),
        ({"app": ""}, "app"),
        ({"app": "a" * 254}, "app"),
        ({"app": "shop;rm"}, "app"),
        ({"namespace": "n" * 64}, "namespace"),
        ({"namespace": "-acme"}, "namespace"),
        ({"dns": "shop acme.example"}, "dns"),
        ({"dns": "x" * 254}, "dns"),
        ({"gear_uuid": "g" * 65}, "gear_uuid"),
        ({"branch": "feature branch"}, "branch"),
        ({"branch": "a\nb"}, "branch"),
        ({"component": "c" * 64}, "component"),
        ({"app": 5}, "app"),
    ],
)
def test_deploy_event_is_strict(change: dict[str, Any], loc: str) -> None:
    with pytest.raises(ValidationError) as info:
        DeployEvent.model_validate({**V2, **change})
    assert info.value.errors()[0]["loc"] == (loc,)


@pytest.mark.parametrize(("base", "field", "value"), [
    (V2, "pod", "shop-1-hook-pre"), (V2, "deployment", "shop-1"),
    (V4, "gear_uuid", "52e9a2b6e0b8cd8a6b000012"), (V4, "branch", "main")])
def test_deploy_event_fields_belong_to_their_generation(base: dict[str, Any], field: str, value: str) -> None:
    with pytest.raises(ValidationError, match=f"{field} is only sent by OpenShift"):
        DeployEvent.model_validate({**base, field: value})


def test_deploy_event_parses_raw_json() -> None:
    assert DeployEvent.model_validate_json(BODY).app == "shop"


def test_a_teardown_event_is_accepted() -> None:
    event = DeployEvent.model_validate({**V4, "event": "teardown"})
    assert event.event == "teardown"


@pytest.mark.parametrize(("data", "component"), [
    (V2, "acme/web"),  # GOVERNORD_COMPONENT names it
    (V4, "shop-prod/frontend"),  # else the DeploymentConfig is the component
    ({**V4, "namespace": "shop-test"}, "shop-test/frontend"),  # the same name elsewhere is another
])
def test_the_deployed_component_is_namespace_and_name(data: dict[str, Any], component: str) -> None:
    assert DeployEvent.model_validate(data).deployed_component == component


# --- the rules that map events to scale requests ---------------------------------------------


def test_a_rule_gives_exactly_one_of_add_count_keep() -> None:
    for ok in ({"add": 1}, {"count": 3}, {"keep": 2}, {"keep": 0}):
        WebhookRule.model_validate({"role": "node", **ok})
    for bad, says in (({}, "got none"), ({"add": 1, "keep": 2}, "got add, keep"),
                      ({"count": 1, "keep": 1}, "got count, keep")):
        with pytest.raises(ValidationError, match=f"give exactly one of add, count and keep \\({says}\\)"):
            WebhookRule.model_validate({"role": "node", **bad})


@pytest.mark.parametrize("action", [{"keep": 1}, {"add": 1}, {"count": 0}])
def test_a_teardown_rule_only_releases(action: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match="give keep = 0"):
        WebhookRule.model_validate({"event": "teardown", "role": "node", **action})


def test_the_first_matching_rule_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", "s")
    section = WebhookSection.model_validate({"secrets": [{"env": "TEST_WEBHOOK_SECRET"}], "rules": [
        {"event": "deploy", "component": "legacy-db", "role": "infra", "add": 1},
        {"event": "deploy", "role": "node", "keep": 2},
        {"event": "deploy", "role": "node", "count": 9},  # shadowed by the one before
        {"event": "teardown", "role": "node", "keep": 0},
    ]})
    assert section.rule_for("deploy", "legacy-db") == section.rules[0]
    assert section.rule_for("deploy", "web") == section.rules[1]
    assert section.rule_for("deploy", None) == section.rules[1]
    assert section.rule_for("teardown", "web") == section.rules[3]
    assert section.rule_for("post_deploy", "web") is None
