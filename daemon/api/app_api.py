"""The applications' API: HTTPS, an application identified by its client certificate.

The TLS listener (:mod:`governord.api.tls`) asks for a client certificate and verifies any it
is given against the configured CA (and its CRL); a refused handshake is logged and counted
there. ``/v1`` then refuses, before any rule sees the request, a connection that presented no
certificate, one governord revoked, one past its dates or revoked by the CRL since the
connection was opened, and one whose common name is no configured application; each refusal is
logged with its reason and counted (``governord_api_refusals_total``). ``/healthz``,
``/metrics`` and ``/openapi.json`` need no certificate.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import ValidationError

from .. import webhooks
from ..service import RequestError, host_summary
from . import schemas
from .common import Endpoints, error_response, errors_middleware, healthz, parse_body, reply
from .tls import ApplicationTLS

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)

runtime_key = web.AppKey("runtime", "Runtime")
tls_key = web.AppKey("tls", ApplicationTLS)
app_key = web.AppKey("application", str)

endpoints = Endpoints(
    "governord application API",
    "Scale requests, request status and hand-back for applications. Authenticate with the "
    "client certificate governord issued to the application.",
    mtls_prefix="/v1/",
)


def application_of(request: web.Request) -> str:
    return request[app_key]  # type: ignore[no-any-return]


def _common_name(peercert: dict[str, Any] | None) -> str | None:
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


#: paths under /v1/ that authenticate by signature, not by client certificate
SIGNED_PATHS = ("/v1/webhooks/",)


def _refuse(runtime: Runtime, status: int, reason: str, description: str, message: str,
            **fields: Any) -> web.Response:
    """Log and count a refusal at the request stage (the handshake stage is in .tls)."""
    runtime.metrics.refused(reason, "request")
    log.warning("refused: %s", description, extra={"reason": reason, "stage": "request", **fields})
    return error_response(status, message)


@web.middleware
async def identify(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.path.startswith("/v1/") or request.path.startswith(SIGNED_PATHS):
        return await handler(request)
    runtime: Runtime = request.app[runtime_key]
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport else None
    cn = _common_name(peercert)
    peer = request.remote
    if cn is None:
        return _refuse(runtime, 401, "no_certificate", "no client certificate",
                       "a client certificate issued to the application is required", peer=peer)
    assert peercert is not None
    serial = format(int(peercert.get("serialNumber", "0"), 16), "x")
    # The handshake checked dates and the CRL; a connection kept alive since may have outlived both.
    not_after = peercert.get("notAfter")
    if not_after and ssl.cert_time_to_seconds(not_after) < time.time():
        return _refuse(runtime, 403, "expired", "expired", f"certificate {serial} of {cn!r} has expired",
                       cn=cn, serial=serial, peer=peer)
    tls: ApplicationTLS | None = request.app.get(tls_key)
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if tls is not None and tls.client_crl is not None and ssl_object is not None:
        der = ssl_object.getpeercert(binary_form=True)
        if der and tls.revoked_by_crl(der):
            return _refuse(runtime, 403, "revoked_by_crl", "revoked by CRL",
                           f"certificate {serial} of {cn!r} is revoked by its CA's CRL", cn=cn, serial=serial,
                           peer=peer)
    if await runtime.certificates.revoked(serial):
        return _refuse(runtime, 403, "revoked", "revoked certificate", f"certificate {serial} of {cn!r} is revoked",
                       cn=cn, serial=serial, peer=peer)
    apps = {(section.certificate_cn or name): name for name, section in runtime.config.applications.items()}
    if cn not in apps:
        return _refuse(runtime, 403, "unknown_application", "unknown application certificate",
                       f"certificate {cn!r} does not belong to a configured application", cn=cn, serial=serial,
                       peer=peer)
    request[app_key] = apps[cn]
    return await handler(request)


@endpoints.add("POST", "/v1/scale", "Ask for more hosts of a role, or for a total",
               body=schemas.ScaleRequest,
               responses={200: schemas.Request, 202: schemas.Request, 409: schemas.Request, 422: schemas.Error})
async def scale(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    app = application_of(request)
    body: schemas.ScaleRequest = await parse_body(request, schemas.ScaleRequest)
    decision = await runtime.governor.scale(
        app, body.role, add=body.add, count=body.count, actor=f"app:{app}", idempotency_key=body.idempotency_key,
        callback_url=body.callback_url,
    )
    return await request_reply(runtime, decision.request, decision.replayed)


@endpoints.add("POST", "/v1/release", "Hand hosts back (named, or a count, newest first)",
               body=schemas.ReleaseRequest,
               responses={200: schemas.Request, 202: schemas.Request, 404: schemas.Error, 422: schemas.Error})
async def release(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    app = application_of(request)
    body: schemas.ReleaseRequest = await parse_body(request, schemas.ReleaseRequest)
    decision = await runtime.governor.release(
        app, hosts=body.hosts, role=body.role, count=body.count, actor=f"app:{app}",
        idempotency_key=body.idempotency_key,
    )
    return await request_reply(runtime, decision.request, decision.replayed)


async def request_reply(runtime: Runtime, request_row: dict[str, Any], replayed: bool) -> web.Response:
    status = 409 if request_row["state"] == "declined" else (200 if replayed else 202)
    return reply(schemas.Request, await runtime.governor.request_status(request_row), status)


@endpoints.add("GET", "/v1/requests/{request_id}", "A request's decision, status and hosts",
               responses={200: schemas.Request, 404: schemas.Error})
async def get_request(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    row = await runtime.store.get_request(request.match_info["request_id"])
    if row is None or row["app"] != application_of(request):
        raise RequestError(404, "no such request", field="request_id")
    return reply(schemas.Request, await runtime.governor.request_status(row))


@endpoints.add("GET", "/v1/hosts", "The application's hosts", responses={200: schemas.HostList},
               query={"state": "only hosts in this state"})
async def list_hosts(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    state = request.query.get("state")
    rows = await runtime.store.list_hosts(app=application_of(request), states=[state] if state else None)
    return reply(schemas.HostList, {"hosts": [host_summary(r) for r in rows]})


@endpoints.add("POST", "/v1/webhooks/openshift",
               "A signed OpenShift deploy-hook event (Governord-Delivery/-Timestamp/-Signature/-Application): "
               "deploy, post_deploy or teardown of a component, mapped to a scale request by the application's "
               "webhook rules",
               responses={200: schemas.WebhookReply, 202: schemas.WebhookReply, 400: schemas.Error,
                          401: schemas.Error, 404: schemas.Error, 409: schemas.WebhookReply, 413: schemas.Error,
                          422: schemas.Error})
async def openshift_webhook(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    app = request.headers.get(webhooks.APPLICATION_HEADER, "")
    section = runtime.config.applications.get(app)
    if section is None or section.webhook is None:
        raise RequestError(404, f"no application {app!r} takes webhooks", field=webhooks.APPLICATION_HEADER)
    body = await request.read()
    try:
        delivery = webhooks.verify([s.reveal().encode() for s in section.webhook.secrets], request.headers, body,
                                   now=time.time(), tolerance=section.webhook.tolerance)
    except webhooks.WebhookRefused as refused:
        log.warning("webhook refused", extra={"app": app, "status": refused.status, "reason": refused.reason,
                                              "peer": request.remote})
        return error_response(refused.status, refused.reason, refused.field)
    try:
        event = webhooks.DeployEvent.model_validate_json(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError(422, f"{where}: {err['msg']}" if where else err["msg"], field=where) from None
    rule = section.webhook.rule_for(event.event, event.component)
    if rule is None:
        return reply(schemas.WebhookReply, {"delivery": delivery, "decision": "ignored",
                                            "reason": f"no rule for {event.event} of {event.component or 'any'}",
                                            "request": None})
    # the delivery id is the idempotency key: a retried delivery returns the first outcome
    decision = await runtime.governor.scale_by_rule(app, rule, component=event.deployed_component,
                                                    actor=f"webhook:{app}", idempotency_key=f"webhook:{delivery}")
    status = await runtime.governor.request_status(decision.request)
    code = 409 if status["decision"] == "declined" else (200 if decision.replayed else 202)
    return reply(schemas.WebhookReply, {"delivery": delivery, "decision": status["decision"],
                                        "reason": status["reason"], "request": status}, code)


@endpoints.add("GET", "/healthz", "Liveness", responses={200: schemas.Health})
async def health(request: web.Request) -> web.Response:
    return await healthz(request)


@endpoints.add("GET", "/metrics", "Prometheus metrics", responses={200: None}, content_type="text/plain")
async def metrics(request: web.Request) -> web.Response:
    runtime: Runtime = request.app[runtime_key]
    return web.Response(body=await runtime.metrics.render(), content_type="text/plain", charset="utf-8")


def create_app_api(runtime: Runtime, tls: ApplicationTLS | None = None) -> web.Application:
    """The application API; ``tls`` is the listener's :class:`~governord.api.tls.ApplicationTLS`,
    whose site-CA CRL is also checked per request."""
    app = web.Application(
        middlewares=[errors_middleware, identify], client_max_size=runtime.config.api.max_body_bytes
    )
    app[runtime_key] = runtime
    if tls is not None:
        app[tls_key] = tls
    app["max_body"] = runtime.config.api.max_body_bytes
    endpoints.install(app)
    return app
