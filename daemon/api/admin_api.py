"""The operators' API on a Unix socket: whoever may open the socket is an administrator.
``governord-ctl`` is its client."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import __version__
from ..rules import RequestError, host_summary
from . import schemas
from .app_api import request_reply
from .common import Endpoints, errors_middleware, healthz, max_body_key, parse_body, reply

if TYPE_CHECKING:
    from ..runtime import Runtime

runtime_key = web.AppKey("runtime", "Runtime")

endpoints = Endpoints(
    "governord admin API",
    "Operator actions over the admin Unix socket (governord-ctl): hosts, tags, retirement, "
    "requests on behalf of applications, the sweep, plugins and status.",
)

ACTOR = "operator"


def _runtime(request: web.Request) -> Runtime:
    return request.app[runtime_key]  # type: ignore[no-any-return]


@endpoints.add("GET", "/v1/status", "Daemon status", responses={200: schemas.Status})
async def status(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    return reply(schemas.Status, {**runtime.status(), "hosts": await runtime.store.count_by_state(),
                                  "version": __version__})


@endpoints.add("GET", "/v1/plugins", "Plugins, loaded or not, with the hooks they implement",
               responses={200: schemas.PluginList})
async def plugins(request: web.Request) -> web.Response:
    return reply(schemas.PluginList, {"plugins": _runtime(request).plugins.describe()})


@endpoints.add("GET", "/v1/hosts", "All hosts", responses={200: schemas.HostList},
               query={"app": "only this application's", "state": "only in this state",
                      "all": "include gone hosts (true/false)"})
async def list_hosts(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    state = request.query.get("state")
    rows = await runtime.store.list_hosts(app=request.query.get("app"), states=[state] if state else None)
    if not state and request.query.get("all") != "true":
        rows = [r for r in rows if r["state"] != "gone"]
    return reply(schemas.HostList, {"hosts": [host_summary(r) for r in rows]})


@endpoints.add("GET", "/v1/hosts/{host}", "One host (by name, FQDN or id)",
               responses={200: schemas.Host, 404: schemas.Error})
async def show_host(request: web.Request) -> web.Response:
    return reply(schemas.Host, host_summary(await _runtime(request).governor.host(request.match_info["host"])))


@endpoints.add("GET", "/v1/hosts/{host}/events", "A host's audit trail",
               responses={200: schemas.EventList, 404: schemas.Error})
async def host_events(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    row = await runtime.governor.host(request.match_info["host"])
    return reply(schemas.EventList, {"events": await runtime.store.list_events(host_id=row["id"])})


@endpoints.add("POST", "/v1/hosts/{host}/tags", "Tag or untag a host (an unknown host is adopted)",
               body=schemas.TagRequest, responses={200: schemas.Host, 404: schemas.Error, 409: schemas.Error,
                                                   422: schemas.Error})
async def tag_host(request: web.Request) -> web.Response:
    body: schemas.TagRequest = await parse_body(request, schemas.TagRequest)
    row = await _runtime(request).governor.set_tags(
        request.match_info["host"], add=body.add, remove=body.remove, actor=ACTOR, address=body.address
    )
    return reply(schemas.Host, host_summary(row))


@endpoints.add("POST", "/v1/hosts/{host}/retire", "Retire a host: deregister everywhere, destroy",
               responses={200: schemas.Host, 404: schemas.Error})
async def retire_host(request: web.Request) -> web.Response:
    row = await _runtime(request).governor.retire(request.match_info["host"], actor=ACTOR)
    return reply(schemas.Host, host_summary(row))


@endpoints.add("POST", "/v1/hosts/{host}/retry", "Resume a failed host at its failed step",
               responses={200: schemas.Host, 404: schemas.Error, 409: schemas.Error})
async def retry_host(request: web.Request) -> web.Response:
    row = await _runtime(request).governor.retry(request.match_info["host"], actor=ACTOR)
    return reply(schemas.Host, host_summary(row))


@endpoints.add("POST", "/v1/apps/{app}/scale", "Scale an application's role, as an operator",
               body=schemas.ScaleRequest,
               responses={200: schemas.Request, 202: schemas.Request, 404: schemas.Error, 409: schemas.Request,
                          422: schemas.Error})
async def scale_app(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    body: schemas.ScaleRequest = await parse_body(request, schemas.ScaleRequest)
    decision = await runtime.governor.scale(
        request.match_info["app"], body.role, add=body.add, count=body.count, actor=ACTOR,
        idempotency_key=body.idempotency_key, callback_url=body.callback_url,
    )
    return await request_reply(runtime, decision)


@endpoints.add("POST", "/v1/apps/{app}/release", "Release an application's hosts, as an operator",
               body=schemas.ReleaseRequest,
               responses={200: schemas.Request, 202: schemas.Request, 404: schemas.Error, 422: schemas.Error})
async def release_app(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    body: schemas.ReleaseRequest = await parse_body(request, schemas.ReleaseRequest)
    decision = await runtime.governor.release(
        request.match_info["app"], hosts=body.hosts, role=body.role, count=body.count, actor=ACTOR,
        idempotency_key=body.idempotency_key,
    )
    return await request_reply(runtime, decision)


def _application(runtime: Runtime, app: str) -> Any:
    section = runtime.config.applications.get(app)
    if section is None:
        raise RequestError(404, f"no application named {app!r}", field="app")
    return section


async def _issue(runtime: Runtime, app: str, *, rotate: bool) -> web.Response:
    section = _application(runtime, app)
    cn = section.certificate_cn or app
    earlier = [c["serial"] for c in await runtime.certificates.list(app) if c["revoked_at"] is None]
    pair = runtime.ca.issue(cn, stem=f"app-{app}-{int(time.time() * 1000)}")
    await runtime.certificates.record(serial=pair.serial, app=app, common_name=cn, not_after=pair.not_after)
    revoked = []
    for serial in earlier if rotate else []:
        revoked += await runtime.certificates.revoke(app, actor=ACTOR, serial=serial)
    return reply(schemas.Certificate, {"app": app, "common_name": cn, "certificate": str(pair.certificate),
                                       "key": str(pair.key), "ca": str(runtime.ca.cert_path),
                                       "serial": pair.serial, "revoked": revoked}, 201)


@endpoints.add("POST", "/v1/apps/{app}/certificate", "Issue a client certificate for an application",
               responses={201: schemas.Certificate, 404: schemas.Error})
async def issue_certificate(request: web.Request) -> web.Response:
    return await _issue(_runtime(request), request.match_info["app"], rotate=False)


@endpoints.add("POST", "/v1/apps/{app}/rotate", "Issue a new certificate and revoke the application's others",
               responses={201: schemas.Certificate, 404: schemas.Error})
async def rotate_certificate(request: web.Request) -> web.Response:
    return await _issue(_runtime(request), request.match_info["app"], rotate=True)


@endpoints.add("POST", "/v1/apps/{app}/revoke", "Revoke an application's certificate(s), refused at once",
               body=schemas.RevokeRequest, responses={200: schemas.Revoked, 404: schemas.Error})
async def revoke_certificate(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    app = request.match_info["app"]
    _application(runtime, app)
    body: schemas.RevokeRequest = await parse_body(request, schemas.RevokeRequest)
    revoked = await runtime.certificates.revoke(app, actor=ACTOR, serial=body.serial)
    if body.serial and not revoked:
        raise RequestError(404, f"application {app} has no unrevoked certificate {body.serial}", field="serial")
    async with runtime.store.transaction() as conn:
        await runtime.store.add_event(conn, "certificate-revoked", actor=ACTOR, detail={"app": app, "serials": revoked})
    return reply(schemas.Revoked, {"app": app, "revoked": revoked})


async def _describe_app(runtime: Runtime, name: str) -> dict[str, Any]:
    section = _application(runtime, name)
    live = [h for h in await runtime.store.list_hosts(app=name) if h["state"] != "gone"]
    return {"name": name, "description": section.description, "common_name": section.certificate_cn or name,
            "max_hosts": section.max_hosts, "min_hosts": section.min_hosts, "approval": section.approval,
            "roles": sorted(section.roles), "hosts": len(live),
            "certificates": await runtime.certificates.list(name)}


@endpoints.add("GET", "/v1/apps", "Configured applications, their hosts and certificates",
               responses={200: schemas.ApplicationList})
async def list_apps(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    apps = [await _describe_app(runtime, name) for name in sorted(runtime.config.applications)]
    return reply(schemas.ApplicationList, {"applications": apps})


@endpoints.add("GET", "/v1/apps/{app}", "One application", responses={200: schemas.Application, 404: schemas.Error})
async def show_app(request: web.Request) -> web.Response:
    return reply(schemas.Application, await _describe_app(_runtime(request), request.match_info["app"]))


@endpoints.add("POST", "/v1/apps/{app}/plan", "What a scale request would do, and why (changes nothing)",
               body=schemas.PlanRequest, responses={200: schemas.PlanReply, 404: schemas.Error})
async def plan_app(request: web.Request) -> web.Response:
    body: schemas.PlanRequest = await parse_body(request, schemas.PlanRequest)
    plan = await _runtime(request).governor.plan(request.match_info["app"], body.role, add=body.add,
                                                 count=body.count)
    return reply(schemas.PlanReply, plan)


async def _decide(request: web.Request, approve: bool) -> web.Response:
    runtime = _runtime(request)
    body: schemas.DecisionRequest = await parse_body(request, schemas.DecisionRequest)
    row = await runtime.governor.decide_pending(request.match_info["request_id"], approve=approve,
                                                comment=body.comment, actor=ACTOR)
    return reply(schemas.Request, await runtime.governor.request_status(row))


@endpoints.add("POST", "/v1/requests/{request_id}/approve", "Approve a pending request (the rules apply again)",
               body=schemas.DecisionRequest, responses={200: schemas.Request, 404: schemas.Error, 409: schemas.Error})
async def approve_request(request: web.Request) -> web.Response:
    return await _decide(request, True)


@endpoints.add("POST", "/v1/requests/{request_id}/deny", "Deny a pending request",
               body=schemas.DecisionRequest, responses={200: schemas.Request, 404: schemas.Error, 409: schemas.Error})
async def deny_request(request: web.Request) -> web.Response:
    return await _decide(request, False)


@endpoints.add("GET", "/v1/audit", "The audit log: every decision and step, who and why",
               responses={200: schemas.EventList, 422: schemas.Error},
               query={"kind": "only events whose kind starts with this",
                      "limit": ("at most this many (newest; default 200, taken as 1 to 10000)", {"type": "integer"})})
async def audit(request: web.Request) -> web.Response:
    text = request.query.get("limit", "200")
    # int() alone would also take "1_000", " 5" and non-ASCII digits, and refuse 5000 digits
    if not re.fullmatch(r"-?[0-9]+", text):
        raise RequestError(422, "limit: not an integer", field="limit")
    limit = int(text) if len(text) <= 9 else (-1 if text.startswith("-") else 10**9)
    events = await _runtime(request).store.list_events(limit=max(1, min(limit, 10000)),
                                                      kind_prefix=request.query.get("kind"))
    return reply(schemas.EventList, {"events": events})


@endpoints.add("GET", "/v1/requests", "Recent requests", responses={200: schemas.RequestList},
               query={"app": "only this application's"})
async def list_requests(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    await runtime.governor.expire_pending()
    rows = await runtime.store.list_requests(app=request.query.get("app"))
    return reply(schemas.RequestList, {"requests": [await runtime.governor.request_status(r) for r in rows]})


@endpoints.add("GET", "/v1/requests/{request_id}", "One request", responses={200: schemas.Request,
                                                                             404: schemas.Error})
async def show_request(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    row = await runtime.store.get_request(request.match_info["request_id"])
    if row is None:
        raise RequestError(404, "no such request", field="request_id")
    return reply(schemas.Request, await runtime.governor.request_status(row))


@endpoints.add("POST", "/v1/sweep", "Compare the records with what exists (leaked machines, vanished machines, "
               "orphaned registrations); act as [sweep.policy] says, or with dry_run only list",
               body=schemas.SweepRequest, responses={200: schemas.SweepReport})
async def sweep(request: web.Request) -> web.Response:
    body: schemas.SweepRequest = await parse_body(request, schemas.SweepRequest)
    report = await _runtime(request).sweeper.run(dry_run=body.dry_run, actor=ACTOR)
    return reply(schemas.SweepReport, report.as_dict())


@endpoints.add("POST", "/v1/autosign", "Decide a Puppet certificate request (the autosign policy)",
               body=schemas.AutosignRequest, responses={200: schemas.AutosignDecision, 403: schemas.AutosignDecision})
async def autosign(request: web.Request) -> web.Response:
    body: schemas.AutosignRequest = await parse_body(request, schemas.AutosignRequest)
    sign, reason, row = await _runtime(request).governor.verify_autosign(body.certname, body.csr,
                                                                         actor="puppet-autosign")
    return reply(schemas.AutosignDecision, {"sign": sign, "reason": reason, "host": row["name"] if row else None},
                 200 if sign else 403)


@endpoints.add("GET", "/healthz", "Liveness", responses={200: schemas.Health})
async def health(request: web.Request) -> web.Response:
    return await healthz(request)


@endpoints.add("GET", "/metrics", "Prometheus metrics", responses={200: None}, content_type="text/plain")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=await _runtime(request).metrics.render(), content_type="text/plain", charset="utf-8")


def create_admin_api(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=runtime.config.api.max_body_bytes)
    app[max_body_key] = runtime.config.api.max_body_bytes
    app[runtime_key] = runtime
    endpoints.install(app)
    return app
