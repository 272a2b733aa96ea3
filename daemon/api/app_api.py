"""The applications' API: HTTPS, an application identified by its client certificate.

The TLS listener (:mod:`governord.api.tls`) asks for a client certificate and verifies any it
is given against the configured CA (and its CRL); a refused handshake is logged and counted
there. ``/v1`` then refuses, before any rule sees the request, a connection that presented no
certificate, one governord revoked, one past its dates or revoked by the CRL since the
connection was opened, one with no or several identities (common names, or the subject
alternative names ``api.tls.identity`` names) and one whose identity is no configured
application's; each refusal is logged with its reason and counted
(``governord_api_refusals_total``). A revocation is of an issuer and a serial. ``/healthz``,
``/metrics`` and ``/openapi.json`` need no certificate.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from .. import webhooks
from ..config import identity_of
from ..rules import Decision, RequestError
from . import paging, schemas
from .common import (
    Endpoints,
    error_response,
    errors_middleware,
    first_problem,
    healthz,
    load_json,
    max_body_key,
    parse_body,
    readyz,
    reply,
)
from .connections import ConnectionLimits, limits_key, request_deadlines
from .tls import ApplicationTLS

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)

runtime_key: web.AppKey[Runtime] = web.AppKey("runtime")
tls_key = web.AppKey("tls", ApplicationTLS)
#: the application a request was authenticated as (set by :func:`identify`)
app_key = web.RequestKey("application", str)

endpoints = Endpoints(
    "governord application API",
    "Scale requests, request status and hand-back for applications. Authenticate with the "
    "client certificate governord issued to the application.",
    mtls_prefix="/v1/",
    # authenticated by the signature over the delivery, not by a client certificate
    signed_prefixes=("/v1/webhooks/",),
)


def application_of(request: web.Request) -> str:
    return request[app_key]


@dataclass(frozen=True)
class Presented:
    """What identifies a client certificate: its issuer and serial, and the values of the field
    api.tls.identity names."""

    issuer: str
    serial: str
    common_names: tuple[str, ...]
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]

    def identity(self, mode: str) -> tuple[str, ...]:
        if mode == "san-dns":
            return tuple(name.lower() for name in self.dns_names)
        return self.uris if mode == "san-uri" else self.common_names


@functools.lru_cache(maxsize=1024)
def presented(der: bytes) -> Presented:
    """The identifying parts of a (DER) client certificate, parsed once per certificate."""
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, uris = tuple(san.get_values_for_type(x509.DNSName)), tuple(san.get_values_for_type(
            x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        dns, uris = (), ()
    cns = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return Presented(cert.issuer.rfc4514_string(), format(cert.serial_number, "x"), cns, dns, uris)


def _refuse(runtime: Runtime, status: int, reason: str, description: str, message: str,
            **fields: Any) -> web.Response:
    """Log and count a refusal at the request stage (the handshake stage is in .tls)."""
    runtime.metrics.refused(reason, "request")
    log.warning("refused: %s", description, extra={"reason": reason, "stage": "request", **fields})
    return error_response(status, message)


@functools.lru_cache(maxsize=1024)
def _seconds(certificate_time: str) -> float:
    """A certificate's time as seconds (parsed once per distinct value: every request asks)."""
    return float(ssl.cert_time_to_seconds(certificate_time))


@web.middleware
async def identify(request: web.Request, handler: Any) -> web.StreamResponse:
    if not endpoints.needs_certificate(request.path):
        return await handler(request)
    runtime: Runtime = request.app[runtime_key]
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport else None
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    der = ssl_object.getpeercert(binary_form=True) if peercert and ssl_object is not None else None
    peer = request.remote
    if not der:
        return _refuse(runtime, 401, "no_certificate", "no client certificate",
                       "a client certificate issued to the application is required", peer=peer)
    cert = presented(der)
    serial, issuer = cert.serial, cert.issuer
    mode = runtime.config.api.tls.identity
    values = cert.identity(mode)
    # for the messages: the identity if there is one, else the first common name
    cn = values[0] if len(values) == 1 else (cert.common_names[0] if cert.common_names else serial)
    # The handshake checked dates and the CRL; a connection kept alive since may have outlived both.
    assert peercert is not None  # a DER certificate came with it
    not_after = peercert.get("notAfter")
    if not_after and _seconds(not_after) < time.time():
        return _refuse(runtime, 403, "expired", "expired", f"certificate {serial} of {cn!r} has expired",
                       cn=cn, serial=serial, peer=peer)
    tls: ApplicationTLS | None = request.app.get(tls_key)
    if tls is not None and tls.client_crl is not None and tls.revoked_by_crl(der):
        return _refuse(runtime, 403, "revoked_by_crl", "revoked by CRL",
                       f"certificate {serial} of {cn!r} is revoked by its CA's CRL", cn=cn, serial=serial,
                       peer=peer)
    if await runtime.certificates.revoked(issuer, serial):
        return _refuse(runtime, 403, "revoked", "revoked certificate", f"certificate {serial} of {cn!r} is revoked",
                       cn=cn, serial=serial, issuer=issuer, peer=peer)
    field = {"cn": "common name", "san-dns": "DNS subject alternative name", "san-uri": "URI subject alternative name"}[mode]
    if len(values) != 1:
        reason = "ambiguous_identity" if values else "no_identity"
        problem = f"{len(values)} {field}s" if values else f"no {field}"
        return _refuse(runtime, 403, reason, f"certificate with {problem}",
                       f"certificate {serial} has {problem}: one identifies the application (api.tls.identity)",
                       serial=serial, issuer=issuer, identities=list(values), peer=peer)
    apps = {identity_of(name, section, mode): name for name, section in runtime.config.applications.items()}
    if cn not in apps:
        return _refuse(runtime, 403, "unknown_application", "unknown application certificate",
                       f"certificate {cn!r} does not belong to a configured application", cn=cn, serial=serial,
                       peer=peer)
    request[app_key] = apps[cn]
    return await handler(request)


#: the answer beyond the application's rate limit (governord.api.ratelimit), documented
RETRY_AFTER = {429: {"Retry-After": ({"type": "integer", "minimum": 1},
                                     "whole seconds until the application may ask again")}}


def _over_limit(runtime: Runtime, app: str, endpoint: str) -> web.Response | None:
    """429 with Retry-After if ``app`` is over its rate limit (the request is counted), else None."""
    wait = runtime.rate_limits.take(app, endpoint)
    if wait is None:
        return None
    limit = runtime.rate_limits.limit(app)
    rate = f" ({limit.requests_per_second:g} a second, burst {limit.burst})" if limit else ""
    return error_response(429, f"application {app} is over its rate limit{rate}: retry in {wait} s",
                          headers={"Retry-After": str(wait)})


@endpoints.add("POST", "/v1/scale", "Ask for more hosts of a role, or for a total",
               body=schemas.ScaleRequest,
               responses={200: schemas.Request, 202: schemas.Request, 409: schemas.Request, 422: schemas.Error,
                          429: schemas.Error},
               response_headers=RETRY_AFTER)
async def scale(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    app = application_of(request)
    if (over := _over_limit(runtime, app, "scale")) is not None:
        return over
    body: schemas.ScaleRequest = await parse_body(request, schemas.ScaleRequest)
    decision = await runtime.governor.scale(
        app, body.role, add=body.add, count=body.count, actor=f"app:{app}", idempotency_key=body.idempotency_key,
        callback_url=body.callback_url,
    )
    return await request_reply(runtime, decision)


@endpoints.add("POST", "/v1/release", "Hand hosts back (named, or a count, newest first)",
               body=schemas.ReleaseRequest,
               responses={200: schemas.Request, 202: schemas.Request, 404: schemas.Error, 422: schemas.Error,
                          429: schemas.Error},
               response_headers=RETRY_AFTER)
async def release(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    app = application_of(request)
    if (over := _over_limit(runtime, app, "release")) is not None:
        return over
    body: schemas.ReleaseRequest = await parse_body(request, schemas.ReleaseRequest)
    decision = await runtime.governor.release(
        app, hosts=body.hosts, role=body.role, count=body.count, actor=f"app:{app}",
        idempotency_key=body.idempotency_key,
    )
    return await request_reply(runtime, decision)


async def request_reply(runtime: Runtime, decision: Decision, *, operator: bool = False) -> web.Response:
    """A decision's answer: its hosts as an application may see them, or whole for an ``operator``."""
    status = 409 if decision.request["state"] == "declined" else (200 if decision.replayed else 202)
    answer = await runtime.governor.request_status(decision.request, decision.hosts, operator=operator)
    return reply(schemas.Request, answer, status)


@endpoints.add("GET", "/v1/requests/{request_id}", "A request's decision, status and hosts",
               responses={200: schemas.Request, 404: schemas.Error})
async def get_request(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    row = await runtime.store.get_request(request.match_info["request_id"])
    if row is None or row["app"] != application_of(request):
        raise RequestError(404, "no such request", field="request_id")
    return reply(schemas.Request, await runtime.governor.request_status(row))


@endpoints.add("GET", "/v1/hosts", "The application's hosts that are not gone (or those in one state), oldest "
               "first, a page at a time", responses={200: schemas.HostList, 422: schemas.Error},
               query={"state": paging.state_query("only hosts in this state (default: every state but gone)"),
                      **paging.query("hosts")})
async def list_hosts(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    page = paging.requested(request, paging.HOSTS)
    state = paging.host_state(request)
    rows = await runtime.store.page_hosts(limit=page.limit, after=page.after, app=application_of(request),
                                          state=state, live=state is None)
    return reply(schemas.HostList, {"hosts": [runtime.governor.application_host(r) for r in rows.rows],
                                    "next_cursor": paging.next_cursor(paging.HOSTS, rows)})


@endpoints.add("POST", "/v1/hosts/{host}/drained",
               "Confirm that a draining host of the application drained: it is retired now (200 also for a "
               "repeat, once the host moved on after a confirmation)",
               responses={200: schemas.Host, 404: schemas.Error, 409: schemas.Error, 429: schemas.Error},
               response_headers=RETRY_AFTER)
async def host_drained(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    app = application_of(request)
    if (over := _over_limit(runtime, app, "drained")) is not None:
        return over
    row, _moved = await runtime.governor.confirm_drained(app, request.match_info["host"], by="application",
                                                        actor=f"app:{app}")
    return reply(schemas.Host, runtime.governor.application_host(row))


#: verifies deliveries for applications that take none, so they are refused exactly like a bad
#: signature (same checks, same work): which applications exist is not for strangers to learn
_NO_SUCH_SECRET = secrets.token_bytes(32)


async def _read_limited(request: web.Request, limit: int) -> bytes:
    """The body, or 413 as soon as it grows past ``limit`` (never read further)."""
    too_large = RequestError(413, f"request body larger than {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(4096):
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


@endpoints.add("POST", "/v1/webhooks/openshift",
               "A signed OpenShift deploy-hook event (Governord-Delivery/-Timestamp/-Signature/-Application): "
               "deploy, post_deploy or teardown of a component, mapped to a scale request by the application's "
               "webhook rules; or drained: a draining host of the application drained",
               body=webhooks.DeployEvent, headers=webhooks.HEADER_SCHEMAS,
               responses={200: schemas.WebhookReply, 202: schemas.WebhookReply, 400: schemas.Error,
                          401: schemas.Error, 404: schemas.Error, 409: schemas.WebhookReply, 413: schemas.Error,
                          415: schemas.Error, 422: schemas.Error, 429: schemas.Error},
               response_headers=RETRY_AFTER)
async def openshift_webhook(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    body = await _read_limited(request, min(webhooks.MAX_BODY_BYTES, request.app[max_body_key]))
    if request.content_type != "application/json":
        raise RequestError(415, "send Content-Type: application/json")
    app = request.headers.get(webhooks.APPLICATION_HEADER, "")
    section = runtime.config.applications.get(app)
    hook = section.webhook if section is not None else None
    keys = [s.reveal().encode() for s in hook.secrets] if hook else [_NO_SUCH_SECRET]
    try:
        delivery = webhooks.verify(keys, request.headers, body, now=time.time(),
                                   tolerance=hook.tolerance if hook else webhooks.DEFAULT_TOLERANCE)
    except webhooks.WebhookRefused as refused:
        # the log says what the sender is not told
        reason = refused.reason if hook or refused.status != 401 else "no application of that name takes webhooks"
        log.warning("webhook refused", extra={"app": app, "status": refused.status, "reason": reason,
                                              "peer": request.remote})
        return error_response(refused.status, refused.reason, refused.field)
    if hook is None:  # not reached: only an application's own secret verifies
        return error_response(401, "signature does not match", webhooks.SIGNATURE_HEADER)
    # counted once the signature verified: only the application itself can spend its limit
    if (over := _over_limit(runtime, app, "webhook")) is not None:
        return over
    data = load_json(body)  # before anything recursive reads it (the event's validation below)
    if not isinstance(data, dict):
        raise RequestError(400, f"body must be a JSON object, not {type(data).__name__}")
    try:
        # from the JSON text, not the parsed data: strict mode must see JSON's own types
        event = webhooks.DeployEvent.model_validate_json(body)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            # JSON json.loads reads but pydantic's parser does not: a lone surrogate (\ud800)
            raise RequestError(400, f"body is not valid JSON: {exc.errors()[0]['msg']}") from None
        message, where = first_problem(exc)
        raise RequestError(422, message, field=where) from None
    if event.event == "drained":
        assert event.host is not None  # the event's validation requires it
        try:
            row, moved = await runtime.governor.confirm_drained(app, event.host, by="application",
                                                                actor=f"webhook:{app}")
        except RequestError as exc:
            if exc.status != 409:
                raise
            return _webhook_reply(delivery, "refused", str(exc), None, 409)
        return _webhook_reply(delivery, "drained" if moved else "repeated", f"host {row['name']} is {row['state']}",
                              None, 200)
    rule = hook.rule_for(event.event, event.component)
    if rule is None:
        return _webhook_reply(delivery, "ignored", f"no rule for {event.event} of {event.component or 'any'}",
                              None, 200)
    # the delivery id is the idempotency key: a retried delivery returns the first outcome, and
    # the body's digest makes sure a retry is the same delivery, not another one under its id
    try:
        decision = await runtime.governor.scale_by_rule(
            app, rule, component=event.deployed_component, actor=f"webhook:{app}",
            idempotency_key=f"webhook:{delivery}", fingerprint="sha256:" + hashlib.sha256(body).hexdigest())
    except RequestError as exc:
        if exc.field != "idempotency_key":
            raise
        raise RequestError(422, f"delivery {delivery} was received before with another body",
                           field=webhooks.DELIVERY_HEADER) from None
    status = await runtime.governor.request_status(decision.request, decision.hosts)
    code = 409 if status["decision"] == "declined" else (200 if decision.replayed else 202)
    return _webhook_reply(delivery, status["decision"], status["reason"], status, code, replayed=decision.replayed)


#: how each decision of a webhook reply reads in its one-line ``message`` (the hook prints it)
_WEBHOOK_OUTCOMES = {
    "accepted": "accepted", "declined": "declined", "pending": "held for an operator's approval",
    "denied": "denied by an operator", "expired": "held for approval until it expired", "ignored": "ignored",
    "drained": "drained", "repeated": "drained before", "refused": "refused",
}


def _webhook_reply(delivery: str, decision: str, reason: str | None, request: dict[str, Any] | None, code: int,
                   *, replayed: bool = False) -> web.Response:
    """The answer to a webhook delivery, with ``message``: what became of it in one line, which
    the hook scripts print for whoever reads a deployment's log."""
    outcome = _WEBHOOK_OUTCOMES.get(decision, decision)
    if request is not None:
        outcome += f" (request {request['id']}{', a repeated delivery' if replayed else ''})"
    message = f"{outcome}: {reason}" if reason else outcome
    if request is not None and decision == "pending":
        message += f"; an operator decides with: governord-ctl requests approve|deny {request['id']} -m REASON"
    return reply(schemas.WebhookReply, {"delivery": delivery, "decision": decision, "reason": reason,
                                        "message": " ".join(message.split()), "request": request}, code)


@endpoints.add("GET", "/healthz", "Whether this instance can serve: its store answers (503 while it cannot)",
               responses={200: schemas.Health, 503: schemas.Health})
async def health(request: web.Request) -> web.Response:
    return await healthz(request.app[runtime_key].store, detail=False)


@endpoints.add("GET", "/readyz", "Whether this instance can do its work: its store answers and every provider and "
               "registrar instance answered its last probe (503 with the reasons while not)",
               responses={200: schemas.Readiness, 503: schemas.Readiness})
async def ready(request: web.Request) -> web.Response:
    runtime = request.app[runtime_key]
    return await readyz(runtime.store, runtime.health, detail=False)


@endpoints.add("GET", "/metrics", "Prometheus metrics", responses={200: None}, content_type="text/plain")
async def metrics(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    return web.Response(body=await runtime.metrics.render(), content_type="text/plain", charset="utf-8")


def create_app_api(runtime: Runtime, tls: ApplicationTLS | None = None,
                   limits: ConnectionLimits | None = None) -> web.Application:
    """The application API; ``tls`` is the listener's :class:`~governord.api.tls.ApplicationTLS`,
    whose site-CA CRL is also checked per request; ``limits`` the listener's
    :class:`~governord.api.connections.ConnectionLimits` (by default, the configured ones)."""
    app = web.Application(
        middlewares=[request_deadlines, errors_middleware, identify], client_max_size=runtime.config.api.max_body_bytes
    )
    app[runtime_key] = runtime
    app[limits_key] = limits or ConnectionLimits.from_config(runtime.config.api, runtime.metrics.refused)
    if tls is not None:
        app[tls_key] = tls
    app[max_body_key] = runtime.config.api.max_body_bytes
    endpoints.install(app)
    return app
