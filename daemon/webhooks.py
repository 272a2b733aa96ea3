"""Signed webhooks: the one signature scheme for deliveries governord receives (OpenShift deploy
hooks, ``hooks/openshift/``) and callbacks governord sends.

A delivery carries three headers:

``Governord-Delivery``
    a unique id for the delivery (a UUID), 1-128 characters of ``[A-Za-z0-9_:-]``; a retry of
    the same delivery keeps it, so receivers de-duplicate on it;
``Governord-Timestamp``
    when this attempt was signed, in Unix seconds (decimal digits only);
``Governord-Signature``
    ``v1=<hex HMAC-SHA256(secret, "<delivery>.<timestamp>.<raw body>")>``. Several
    comma-separated values are allowed (``v1=<a>,v1=<b>``) so a sender can sign with an old
    and a new secret while they are rotated; entries of other schemes are ignored, so a
    later ``v2=`` can be introduced without breaking receivers.

The secret is the UTF-8 encoding of the application's configured secret (``Secret.reveal()``;
a secret file's trailing CR/LF are not part of it, on both sides).

Verification (:func:`verify`) answers, as :class:`WebhookRefused`:

* **400** a header is missing, repeated or malformed, or there is no ``v1=`` signature;
* **401** no signature matches any of the application's secrets, or the signature matches but
  the timestamp is more than ``tolerance`` seconds (default 300) from the receiver's clock.

A receiver reads at most :data:`MAX_BODY_BYTES` of a delivery (413 beyond: a deploy event is
under 2 KiB). It answers a delivery for an application that takes none exactly as it answers a
bad signature (401, after the same header checks and the same HMAC work), so a stranger cannot
learn which applications exist. A repeated delivery id returns the first outcome; the same id
with another body is refused with 422 naming ``Governord-Delivery`` (the IETF Idempotency-Key
draft's answer to a key reused for another request), never taken for the first delivery.

A stale timestamp is 401, not 400, because it is an authentication failure like a bad
signature (Stripe's and Standard Webhooks' libraries raise the same verification error for
both). The signature is checked first, as Stripe does, so only a holder of the secret learns
that its clock is off, with the offset in the reason. A 413 for an oversized body is the
caller's job: it must limit the body before reading it, then pass the raw bytes here.

Replay protection is the timestamp window plus de-duplication: **callers must remember the
delivery ids they accepted for at least the window (twice ``tolerance``, since timestamps may
be early or late) and not act on a delivery id twice.** :func:`verify` does not do that; the
store does.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import FieldError

JsonDict = dict[str, Any]  # pydantic's JsonDict, spelt out (pydantic.config does not export it)

__all__ = [
    "APPLICATION_HEADER",
    "DEFAULT_TOLERANCE",
    "DELIVERY_HEADER",
    "HEADER_SCHEMAS",
    "MAX_BODY_BYTES",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "DeployEvent",
    "WebhookRefused",
    "sign",
    "signature_headers",
    "verify",
]

DELIVERY_HEADER = "Governord-Delivery"
TIMESTAMP_HEADER = "Governord-Timestamp"
SIGNATURE_HEADER = "Governord-Signature"
#: Names the governord application whose secrets verify a delivery. It is not signed and needs
#: not be: it only chooses the key, and a wrong one makes verification fail.
APPLICATION_HEADER = "Governord-Application"

DEFAULT_TOLERANCE = 300.0
SCHEME = "v1"
#: bounds the work one request can ask for (signatures x secrets HMACs)
MAX_SIGNATURES = 8
#: largest delivery body a receiver reads; a deploy event is under 2 KiB
MAX_BODY_BYTES = 8192

# No "." in a delivery id: the signed string joins the parts with dots, so a dot in the id
# would let one (delivery, timestamp, body) triple be read as another.
_DELIVERY = re.compile(r"[A-Za-z0-9_:-]{1,128}")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_ENTRY = re.compile(r"([A-Za-z0-9]{1,16})=(.*)", re.DOTALL)


class WebhookRefused(Exception):
    """A delivery governord will not accept: answer ``status`` with ``reason``.

    ``field`` names the offending header, for the API's ``{"error", "field"}`` body.
    """

    def __init__(self, status: int, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.field = field

    def __repr__(self) -> str:
        return f"WebhookRefused({self.status}, {self.reason!r})"


#: the headers as OpenAPI describes them: name -> (JSON Schema of the value, description)
HEADER_SCHEMAS: dict[str, tuple[dict[str, object], str]] = {
    APPLICATION_HEADER: ({"type": "string", "minLength": 1},
                         "the governord application whose secrets verify the delivery"),
    DELIVERY_HEADER: ({"type": "string", "pattern": "^[A-Za-z0-9_:-]{1,128}$"},
                      "unique id of the delivery, the same on every retry"),
    TIMESTAMP_HEADER: ({"type": "string", "pattern": "^[0-9]{1,12}$"}, "when this attempt was signed, Unix seconds"),
    SIGNATURE_HEADER: ({"type": "string", "pattern": "^v1=[0-9a-f]{64}(,v1=[0-9a-f]{64}){0,7}$"},
                       'v1=<hex HMAC-SHA256(secret, "<delivery>.<timestamp>.<raw body>")>, comma-separated '
                       "while secrets are rotated"),
}


def _check_parts(delivery: str, timestamp: int) -> None:
    if not _DELIVERY.fullmatch(delivery):
        raise ValueError(f"delivery id must be 1-128 characters of [A-Za-z0-9_:-], got {delivery!r}")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp < 10**12:
        raise ValueError(f"timestamp must be a non-negative integer of Unix seconds, got {timestamp!r}")


def _digest(secret: bytes, delivery: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret, f"{delivery}.{timestamp}.".encode("ascii"), hashlib.sha256)
    mac.update(body)
    return mac.hexdigest()


def sign(secret: bytes, delivery: str, timestamp: int, body: bytes) -> str:
    """The ``Governord-Signature`` value for one delivery attempt: ``v1=<hex>``.

    :raises ValueError: on an empty secret, a delivery id outside ``[A-Za-z0-9_:-]{1,128}`` or a
        timestamp that is not a non-negative integer, which :func:`verify` would refuse.
    """
    if not secret:
        raise ValueError("the secret is empty")
    _check_parts(delivery, timestamp)
    return f"{SCHEME}={_digest(secret, delivery, timestamp, body)}"


def signature_headers(
    secret: bytes | Sequence[bytes],
    body: bytes,
    *,
    delivery: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """The three headers for sending ``body``; sign again (same ``delivery``) for every retry.

    :param secret: one secret, or several while rotating (one ``v1=`` value each).
    :param delivery: the delivery id; a new UUID when omitted.
    :param now: the signing time in Unix seconds; the current time when omitted.
    """
    secrets = [secret] if isinstance(secret, bytes) else list(secret)
    if not secrets:
        raise ValueError("no secret to sign with")
    delivery = str(uuid.uuid4()) if delivery is None else delivery
    timestamp = int(time.time() if now is None else now)
    return {
        DELIVERY_HEADER: delivery,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: ",".join(sign(s, delivery, timestamp, body) for s in secrets),
    }


def _header(headers: Mapping[str, str], name: str) -> str:
    getall = getattr(headers, "getall", None)
    if getall is not None:  # aiohttp's CIMultiDictProxy: a repeated header is ambiguous
        values = list(getall(name, []))
    else:
        lowered = name.lower()
        values = [value for key, value in headers.items() if key.lower() == lowered]
    if not values:
        raise WebhookRefused(400, f"missing {name} header", name)
    if len(values) > 1:
        raise WebhookRefused(400, f"{name} header given {len(values)} times", name)
    return str(values[0]).strip()


def _signatures(value: str) -> list[str]:
    entries = [entry.strip() for entry in value.split(",")]
    if len(entries) > MAX_SIGNATURES:
        raise WebhookRefused(400, f"more than {MAX_SIGNATURES} signatures in {SIGNATURE_HEADER}", SIGNATURE_HEADER)
    found = []
    for entry in entries:
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise WebhookRefused(400, f"malformed {SIGNATURE_HEADER}: expected v1=<hex>[,v1=<hex>...]",
                                 SIGNATURE_HEADER)
        scheme, digest = match.groups()
        if scheme != SCHEME:
            continue
        if not _HEX_DIGEST.fullmatch(digest):
            raise WebhookRefused(400, f"malformed {SIGNATURE_HEADER}: v1 is 64 lower-case hex digits",
                                 SIGNATURE_HEADER)
        found.append(digest)
    if not found:
        raise WebhookRefused(400, f"{SIGNATURE_HEADER} has no v1= signature", SIGNATURE_HEADER)
    return found


def verify(
    secrets: Sequence[bytes],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> str:
    """Check a delivery's headers against the raw ``body``; return its delivery id.

    :param secrets: the application's current secrets (more than one while rotating).
    :param headers: the request headers (case-insensitive lookup; aiohttp's or a plain dict).
    :param body: the raw body bytes, exactly as received (before any JSON parsing).
    :param now: the receiver's clock, Unix seconds.
    :param tolerance: how far, in seconds, the timestamp may be from ``now`` either way.
    :returns: the delivery id. The caller must not act on the same id twice.
    :raises WebhookRefused: 400 for missing, repeated or malformed headers; 401 for a signature
        that matches no secret, or a timestamp outside ``now ± tolerance``.
    :raises ValueError: if ``secrets`` is empty or holds an empty secret (a configuration
        error, not the sender's).
    """
    if not secrets or not all(secrets):
        raise ValueError("verify needs at least one non-empty secret")
    delivery = _header(headers, DELIVERY_HEADER)
    if not _DELIVERY.fullmatch(delivery):
        raise WebhookRefused(400, f"malformed {DELIVERY_HEADER}: 1-128 characters of [A-Za-z0-9_:-]",
                             DELIVERY_HEADER)
    stamp = _header(headers, TIMESTAMP_HEADER)
    if not _TIMESTAMP.fullmatch(stamp):
        raise WebhookRefused(400, f"malformed {TIMESTAMP_HEADER}: Unix seconds as decimal digits",
                             TIMESTAMP_HEADER)
    timestamp = int(stamp)
    offered = _signatures(_header(headers, SIGNATURE_HEADER))
    expected = [_digest(secret, delivery, timestamp, body) for secret in secrets]
    # compare every pair without stopping early, so timing says nothing about which one matched
    matched = False
    for digest in offered:
        for candidate in expected:
            matched |= hmac.compare_digest(digest, candidate)
    if not matched:
        raise WebhookRefused(401, "signature does not match", SIGNATURE_HEADER)
    skew = timestamp - now
    if abs(skew) > tolerance:
        direction = "ahead of" if skew > 0 else "behind"
        raise WebhookRefused(
            401,
            f"timestamp is {abs(skew):.0f} s {direction} governord's clock (tolerance {tolerance:.0f} s): "
            "a replay, or the sender's clock is wrong",
            TIMESTAMP_HEADER,
        )
    return delivery


# --- the deploy hooks' event -------------------------------------------------------------

_K8S_NAME = r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$"
_LABEL = r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?$"
_HOSTNAME = r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"


#: fields only one generation's hooks send
_ONLY_IN: dict[str, tuple[str, ...]] = {"v2": ("gear_uuid", "app_uuid", "branch"), "v4": ("pod", "deployment")}


def _generation_rule() -> JsonDict:
    """JSON Schema for :data:`_ONLY_IN`, so the OpenAPI document says what the validator does."""
    return {"allOf": [
        *({"if": {"properties": {"openshift_version": {"const": other}}},
           "then": {"properties": {name: {"type": "null"} for name in names}}}
          for version, names in _ONLY_IN.items()
          for other in ("v2", "v4") if other != version),
        # a drained event names its host; no other event does
        {"if": {"properties": {"event": {"const": "drained"}}, "required": ["event"]},
         "then": {"required": ["host"], "properties": {"host": {"type": "string"}}},
         "else": {"properties": {"host": {"type": "null"}}}},
    ]}


class DeployEvent(BaseModel):
    """The JSON body ``hooks/openshift/deploy``, ``post_deploy`` and ``teardown`` send.

    On OpenShift v2 they run as action hooks in a gear; on v4 as the command of a
    DeploymentConfig lifecycle-hook pod (``deploy`` as the ``pre`` hook, ``post_deploy`` as
    ``post``). OpenShift has no hook for a component's removal: ``teardown`` is run, with the
    same environment, by whoever removes it. Which governord application sent it is known from the secret that verified it,
    not from this body.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, json_schema_extra=_generation_rule())

    event: Literal["deploy", "post_deploy", "teardown", "drained"] = Field(
        description="deploy: before the new code starts (v2 deploy, v4 pre); "
        "post_deploy: after it started (v2 post_deploy, v4 post); "
        "teardown: the component is going away (run by whoever removes it); "
        "drained: the application moved its work off the draining host named in host")
    openshift_version: Literal["v2", "v4"]
    app: str = Field(min_length=1, max_length=253, pattern=_K8S_NAME,
                     description="v2 OPENSHIFT_APP_NAME; v4 the DeploymentConfig's name "
                     "(OPENSHIFT_DEPLOYMENT_NAME without its -<n> suffix)")
    namespace: str = Field(min_length=1, max_length=63, pattern=_LABEL,
                           description="v2 OPENSHIFT_NAMESPACE (the domain); v4 OPENSHIFT_DEPLOYMENT_NAMESPACE")
    deployment: str | None = Field(None, min_length=1, max_length=253, pattern=_K8S_NAME,
                                   description="v4 OPENSHIFT_DEPLOYMENT_NAME: the ReplicationController, e.g. frontend-3")
    component: str | None = Field(None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                  description="GOVERNORD_COMPONENT, free to the application (e.g. web, worker)")
    dns: str | None = Field(None, min_length=1, max_length=253, pattern=_HOSTNAME,
                            description="v2 OPENSHIFT_APP_DNS; v4 GOVERNORD_DNS (a route's host), if set")
    gear_uuid: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$",
                                  description="v2 OPENSHIFT_GEAR_UUID")
    app_uuid: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$",
                                 description="v2 OPENSHIFT_APP_UUID")
    branch: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[^\x00-\x20\x7f~^:?*\[\\]+$",
                               description="v2 OPENSHIFT_DEPLOYMENT_BRANCH")
    pod: str | None = Field(None, min_length=1, max_length=253, pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$",
                            description="v4 the hook pod's name (HOSTNAME)")
    host: str | None = Field(None, min_length=1, max_length=253, pattern=_HOSTNAME,
                             description="drained only: the governord host (its name or fqdn) that drained")

    @property
    def deployed_component(self) -> str:
        """``NAMESPACE/COMPONENT``: what governord attributes the hosts an event's rule makes to.
        COMPONENT is the event's ``component``, else its ``app`` (the v2 application, the v4
        DeploymentConfig), so one DeploymentConfig is one component without any set-up, and the
        same name in two namespaces is two components."""
        return f"{self.namespace}/{self.component or self.app}"

    @model_validator(mode="after")
    def _host_of_drained(self) -> DeployEvent:
        if (self.event == "drained") != (self.host is not None):
            raise FieldError("host", "a drained event names its host, and only a drained event does")
        return self

    @model_validator(mode="after")
    def _fields_of_its_generation(self) -> DeployEvent:
        for version, names in _ONLY_IN.items():
            if self.openshift_version != version:
                for name in names:
                    if getattr(self, name) is not None:
                        raise FieldError(name, f"{name} is only sent by OpenShift {version} hooks")
        return self
