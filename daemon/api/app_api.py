"""The applications' API: HTTPS, an application identified by its client certificate.

The TLS listener asks for a client certificate and verifies any it is given against the
configured CA; ``/v1`` refuses a connection that presented none or whose common name is no
configured application. ``/healthz``, ``/metrics`` and ``/openapi.json`` need no certificate.
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

if TYPE_CHECKING:
    from ..runtime import Runtime

log = logging.getLogger(__name__)

runtime_key = web.AppKey("runtime", "Runtime")
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


@web.middleware
async def identify(request: web.Request, handler: Any) -> web.StreamResponse:
    if not request.path.startswith("/v1/") or request.path.startswith(SIGNED_PATHS):
        return await handler(request)
    runtime: Runtime = request.app[runtime_key]
    transport = request.transport
    peercert = transport.get_extra_info("peercert") if transport else None
    cn = _common_name(peercert)
    if cn is None:
        log.warning("refused: no client certificate", extra={"peer": request.remote})
        return error_response(401, "a client certificate issued to the application is required")
    serial = format(int(peercert.get("serialNumber", "0"), 16), "x") if peercert else ""
    if serial and await runtime.certificates.revoked(serial):
        log.warning("refused: revoked certificate", extra={"cn": cn, "serial": serial, "peer": request.remote})
        return error_response(403, f"certificate {serial} of {cn!r} is revoked")
    apps = {(section.certificate_cn or name): name for name, section in runtime.config.applications.items()}
    if cn not in apps:
        log.warning("refused: unknown application certificate", extra={"cn": cn, "peer": request.remote})
        return error_response(403, f"certificate {cn!r} does not belong to a configured application")
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
               "A signed OpenShift deploy-hook event (Governord-Delivery/-Timestamp/-Signature/-Application)",
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
    rule = next((r for r in section.webhook.rules if r.event == event.event
                 and r.component in (None, event.component)), None)
    if rule is None:
        return reply(schemas.WebhookReply, {"delivery": delivery, "decision": "ignored",
                                            "reason": f"no rule for {event.event} of {event.component or 'any'}",
                                            "request": None})
    # the delivery id is the idempotency key: a retried delivery returns the first outcome
    decision = await runtime.governor.scale(app, rule.role, add=rule.add, count=rule.count,
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


def create_app_api(runtime: Runtime) -> web.Application:
    app = web.Application(
        middlewares=[errors_middleware, identify], client_max_size=runtime.config.api.max_body_bytes
    )
    app[runtime_key] = runtime
    app["max_body"] = runtime.config.api.max_body_bytes
    endpoints.install(app)
    return app


def server_ssl_context(certificate: str, key: str, client_ca: str) -> ssl.SSLContext:
    """TLS 1.2+, client certificates requested and verified against ``client_ca`` when sent."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context
