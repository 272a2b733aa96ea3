"""The operators' API on a Unix socket: whoever may open the socket is an administrator.
``governord-ctl`` is its client. Host views here are whole (registration records with their
tokens and keys, errors with their detail); Puppet's autosign policy has its own socket
(:mod:`.autosign_api`), not this one."""

from __future__ import annotations

import asyncio
import json
import math
import os
import pwd
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography import x509

from .. import __version__
from ..config import identity_of
from ..fleet import Busy
from ..rules import RequestError, host_summary
from . import paging, schemas
from .app_api import request_reply
from .common import Endpoints, errors_middleware, healthz, max_body_key, parse_body, readyz, reply

if TYPE_CHECKING:
    from ..runtime import Runtime

runtime_key: web.AppKey[Runtime] = web.AppKey("runtime")

endpoints = Endpoints(
    "governord admin API",
    "Operator actions over the admin Unix socket (governord-ctl): hosts, tags, retirement, "
    "requests on behalf of applications, the sweep, plugins and status.",
)

#: the actor of what an operator does over the admin socket: ``operator:USER``, USER being the Unix
#: user of the process at the other end (its peer credentials), or ``operator`` where there are none
ACTOR = "operator"


def _actor(request: web.Request) -> str:
    """``operator:USER`` for the Unix user connected to the admin socket (SO_PEERCRED)."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return ACTOR
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return ACTOR
    _pid, uid, _gid = struct.unpack("3i", credentials)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid{uid}"
    return f"{ACTOR}:{user}"


def _runtime(request: web.Request) -> Runtime:
    return request.app[runtime_key]


@endpoints.add("GET", "/v1/ca", "governord's CA certificate, which the applications verify the server with "
               "(governord-ctl ca)", responses={200: schemas.CA})
async def ca_certificate(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    pem = await asyncio.to_thread(runtime.ca.cert_path.read_bytes)
    cert = x509.load_pem_x509_certificate(pem)
    return reply(schemas.CA, {"ca_pem": pem.decode(), "subject": cert.subject.rfc4514_string(),
                              "not_after": cert.not_valid_after_utc.timestamp(),
                              "signs_server_certificate": runtime.config.api.tls.certificate is None})


@endpoints.add("GET", "/v1/status", "Daemon status", responses={200: schemas.Status})
async def status(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    return reply(schemas.Status, {**runtime.status(), "hosts": await runtime.store.count_by_state(),
                                  "instances": await runtime.fleet.members(), "version": __version__})


@endpoints.add("POST", "/v1/reload", "Read the config again and take it (what systemctl reload runs); a config "
               "with errors is refused (422, every error) and the running one stays",
               responses={200: schemas.Reloaded, 422: schemas.Error})
async def reload_config(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    if runtime.reload_config is None:
        raise RequestError(409, "this governord cannot reload (not started as a daemon)")
    refusal = await runtime.reload_config()
    if refusal is not None:
        raise RequestError(422, f"reload refused, the running config stays: {refusal}", field="config")
    return reply(schemas.Reloaded, {"config": runtime.config.path})


@endpoints.add("GET", "/v1/backup", "A backup (tar.gz) of the store and the CA, consistent while governord runs: "
               "the store by SQLite's online backup or pg_dump's snapshot (governord-ctl backup)",
               responses={200: None, 409: schemas.Error}, content_type="application/gzip")
async def backup(request: web.Request) -> web.StreamResponse:
    from ..store import backup as backups
    from ..store import head_revision

    runtime = _runtime(request)
    state_dir = runtime.config.daemon.state_dir
    out = state_dir / f"backup-{os.getpid()}-{time.time_ns()}.tar.gz"
    try:
        manifest = await asyncio.to_thread(
            backups.make, runtime.config.core.store.effective_url(state_dir), state_dir, runtime.config.path, out,
            version=__version__, revision=head_revision())
    except backups.BackupError as exc:
        out.unlink(missing_ok=True)
        raise RequestError(409, str(exc)) from None
    try:
        response = web.StreamResponse(headers={"Content-Type": "application/gzip",
                                               "X-Governord-Backup": json.dumps(manifest, sort_keys=True)})
        await response.prepare(request)
        archive = await asyncio.to_thread(out.open, "rb")
        try:
            while chunk := await asyncio.to_thread(archive.read, 1 << 20):
                await response.write(chunk)
        finally:
            archive.close()
        await response.write_eof()
    finally:
        out.unlink(missing_ok=True)
    await runtime.store.decide(lambda tx: tx.add_event("backup", actor=_actor(request), detail=manifest))
    return response


@endpoints.add("GET", "/v1/autoscale", "The roles' autoscale rules (Prometheus thresholds) and their last evaluation",
               responses={200: schemas.AutoscaleStatus})
async def autoscale(request: web.Request) -> web.Response:
    return reply(schemas.AutoscaleStatus, {"rules": _runtime(request).thresholds.status()})


@endpoints.add("GET", "/v1/plugins", "Plugins, loaded or not, with the hooks they implement, by name, a page at a time",
               responses={200: schemas.PluginList, 422: schemas.Error}, query=paging.query("plugins"))
async def plugins(request: web.Request) -> web.Response:
    page = paging.requested(request, paging.PLUGINS)
    described = [p for p in _runtime(request).plugins.describe() if page.after is None or p["name"] > page.after[0]]
    shown = described[:page.limit]
    more = len(described) > page.limit
    return reply(schemas.PluginList, {"plugins": shown, "next_cursor": paging.encode(
        paging.PLUGINS, [shown[-1]["name"]]) if more else None})


@endpoints.add("GET", "/v1/hosts", "Hosts, oldest first, a page at a time (gone ones only if asked)",
               responses={200: schemas.HostList, 422: schemas.Error},
               query={"app": "only this application's", "state": paging.state_query("only in this state"),
                      "all": "include gone hosts (true/false)", **paging.query("hosts")})
async def list_hosts(request: web.Request) -> web.Response:
    page = paging.requested(request, paging.HOSTS)
    state = paging.host_state(request)
    rows = await _runtime(request).store.page_hosts(
        limit=page.limit, after=page.after, app=request.query.get("app"), state=state,
        live=state is None and request.query.get("all") != "true")
    return reply(schemas.HostList, {"hosts": [host_summary(r) for r in rows.rows],
                                    "next_cursor": paging.next_cursor(paging.HOSTS, rows)})


@endpoints.add("GET", "/v1/hosts/{host}", "One host (by name, FQDN or id)",
               responses={200: schemas.Host, 404: schemas.Error})
async def show_host(request: web.Request) -> web.Response:
    return reply(schemas.Host, host_summary(await _runtime(request).governor.host(request.match_info["host"])))


@endpoints.add("GET", "/v1/hosts/{host}/events", "A host's audit trail, oldest first, a page at a time",
               responses={200: schemas.EventList, 404: schemas.Error, 422: schemas.Error},
               query=paging.query("events"))
async def host_events(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    page = paging.requested(request, paging.TRAIL)
    row = await runtime.governor.host(request.match_info["host"])
    events = await runtime.store.page_events(limit=page.limit, after=page.after, host_id=row["id"],
                                             newest_first=False)
    return reply(schemas.EventList, {"events": events.rows, "next_cursor": paging.next_cursor(paging.TRAIL, events)})


@endpoints.add("POST", "/v1/hosts/{host}/tags", "Tag or untag a host (an unknown host is adopted with adopt)",
               body=schemas.TagRequest, responses={200: schemas.Host, 404: schemas.Error, 409: schemas.Error,
                                                   422: schemas.Error})
async def tag_host(request: web.Request) -> web.Response:
    body: schemas.TagRequest = await parse_body(request, schemas.TagRequest)
    row = await _runtime(request).governor.set_tags(
        request.match_info["host"], add=body.add, remove=body.remove, actor=_actor(request), address=body.address,
        adopt=body.adopt,
    )
    return reply(schemas.Host, host_summary(row))


@endpoints.add("POST", "/v1/hosts/{host}/retire", "Retire a host: deregister everywhere, destroy (a ready host "
               "of an application that drains drains first, unless now=true; now=true also cuts a drain short)",
               query={"now": ("skip draining, and cut short a host draining now", {"type": "string",
                                                                                   "enum": ["true", "false"]})},
               responses={200: schemas.Host, 404: schemas.Error, 422: schemas.Error})
async def retire_host(request: web.Request) -> web.Response:
    now = request.query.get("now", "false")
    if now not in ("true", "false"):
        raise RequestError(422, "now: true or false", field="now")
    row = await _runtime(request).governor.retire(request.match_info["host"], actor=_actor(request),
                                                  now=now == "true")
    return reply(schemas.Host, host_summary(row))


@endpoints.add("POST", "/v1/hosts/{host}/retry", "Resume a failed host at its failed step",
               responses={200: schemas.Host, 404: schemas.Error, 409: schemas.Error})
async def retry_host(request: web.Request) -> web.Response:
    row = await _runtime(request).governor.retry(request.match_info["host"], actor=_actor(request))
    return reply(schemas.Host, host_summary(row))


@endpoints.add("POST", "/v1/apps/{app}/scale", "Scale an application's role, as an operator",
               body=schemas.ScaleRequest,
               responses={200: schemas.Request, 202: schemas.Request, 404: schemas.Error, 409: schemas.Request,
                          422: schemas.Error})
async def scale_app(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    body: schemas.ScaleRequest = await parse_body(request, schemas.ScaleRequest)
    decision = await runtime.governor.scale(
        request.match_info["app"], body.role, add=body.add, count=body.count, actor=_actor(request),
        idempotency_key=body.idempotency_key, callback_url=body.callback_url,
    )
    return await request_reply(runtime, decision, operator=True)


@endpoints.add("POST", "/v1/apps/{app}/release", "Release an application's hosts, as an operator",
               body=schemas.ReleaseRequest,
               responses={200: schemas.Request, 202: schemas.Request, 404: schemas.Error, 422: schemas.Error})
async def release_app(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    body: schemas.ReleaseRequest = await parse_body(request, schemas.ReleaseRequest)
    decision = await runtime.governor.release(
        request.match_info["app"], hosts=body.hosts, role=body.role, count=body.count, actor=_actor(request),
        idempotency_key=body.idempotency_key,
    )
    return await request_reply(runtime, decision, operator=True)


def _application(runtime: Runtime, app: str) -> Any:
    section = runtime.config.applications.get(app)
    if section is None:
        raise RequestError(404, f"no application named {app!r}", field="app")
    return section


def _client_names(runtime: Runtime, app: str, section: Any) -> list[x509.GeneralName]:
    """The subject alternative name that identifies ``app`` when api.tls.identity is a SAN."""
    mode = runtime.config.api.tls.identity
    value = identity_of(app, section, mode)
    if mode == "san-dns" and value:
        return [x509.DNSName(value)]
    if mode == "san-uri" and value:
        return [x509.UniformResourceIdentifier(value)]
    return []


async def _issue(runtime: Runtime, app: str, *, rotate: bool, actor: str) -> web.Response:
    section = _application(runtime, app)
    cn = section.certificate_cn or app
    earlier = [c["serial"] for c in await runtime.certificates.list(app) if c["revoked_at"] is None]
    # the private key is in the reply only: governord keeps no copy (whoever reads the state
    # directory could otherwise act as every application at once)
    pair = runtime.ca.issue(cn, stem=f"app-{app}-{int(time.time() * 1000)}", keep_key=False,
                            client_names=_client_names(runtime, app, section))
    await runtime.certificates.record(serial=pair.serial, app=app, common_name=cn, not_after=pair.not_after,
                                      issuer=pair.issuer)
    revoked = []
    for serial in earlier if rotate else []:
        revoked += await runtime.certificates.revoke(app, actor=actor, serial=serial)
    return reply(schemas.Certificate, {"app": app, "common_name": cn,
                                       "certificate_pem": pair.certificate.read_text(),
                                       "key_pem": pair.key_pem.decode(), "ca_pem": runtime.ca.cert_path.read_text(),
                                       "serial": pair.serial, "issuer": pair.issuer, "revoked": revoked}, 201)


@endpoints.add("POST", "/v1/apps/{app}/certificate", "Issue a client certificate for an application",
               responses={201: schemas.Certificate, 404: schemas.Error})
async def issue_certificate(request: web.Request) -> web.Response:
    return await _issue(_runtime(request), request.match_info["app"], rotate=False, actor=_actor(request))


@endpoints.add("POST", "/v1/apps/{app}/rotate", "Issue a new certificate and revoke the application's others",
               responses={201: schemas.Certificate, 404: schemas.Error})
async def rotate_certificate(request: web.Request) -> web.Response:
    return await _issue(_runtime(request), request.match_info["app"], rotate=True, actor=_actor(request))


@endpoints.add("POST", "/v1/apps/{app}/revoke", "Revoke an application's certificate(s), refused at once: "
               "governord's own by serial or all of them, a site CA's by issuer and serial",
               body=schemas.RevokeRequest, responses={200: schemas.Revoked, 404: schemas.Error, 422: schemas.Error})
async def revoke_certificate(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    app = request.match_info["app"]
    _application(runtime, app)
    body: schemas.RevokeRequest = await parse_body(request, schemas.RevokeRequest)
    issuer: str | None = None
    own = runtime.ca.subject()
    if body.serial is not None and body.issuer not in (None, own) and runtime.config.api.tls.client_ca is None:
        raise RequestError(422, f"issuer: {body.issuer!r} is not governord's CA ({own}), and no site CA "
                           "is configured (api.tls.client_ca)", field="issuer")
    revoked: list[str] = [] if body.issuer not in (None, own) else \
        await runtime.certificates.revoke(app, actor=_actor(request), serial=body.serial)
    if body.serial is not None and revoked:
        issuer = own
    elif body.serial is not None and runtime.config.api.tls.client_ca is not None:
        # none of governord's: a certificate of the site CA, by issuer and serial
        issuer = _site_issuer(runtime.config.api.tls.client_ca, body.issuer)
        if await runtime.certificates.revoke_site(app, issuer=issuer, serial=body.serial, actor=_actor(request)):
            revoked = [body.serial]
        else:
            raise RequestError(404, f"certificate {body.serial} of {issuer} is revoked already", field="serial")
    if body.serial and not revoked:
        raise RequestError(404, f"application {app} has no unrevoked certificate {body.serial}", field="serial")
    async with runtime.store.transaction() as conn:
        await runtime.store.add_event(conn, "certificate-revoked", actor=_actor(request),
                                      detail={"app": app, "serials": revoked, "issuer": issuer})
    return reply(schemas.Revoked, {"app": app, "revoked": revoked, "issuer": issuer})


def _site_issuer(client_ca: Path, given: str | None) -> str:
    """The name (RFC 4514) of the site CA a revocation is for: ``given`` if it is one of the
    CAs in ``client_ca``, or the only CA there."""
    try:
        names = [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(client_ca.read_bytes())]
    except (OSError, ValueError) as exc:
        raise RequestError(422, f"issuer: cannot read the site CAs in {client_ca}: {exc}", field="issuer") from None
    if given is None:
        if len(names) == 1:
            return names[0]
        raise RequestError(422, f"issuer: give the issuer: api.tls.client_ca holds several CAs ({'; '.join(names)})",
                           field="issuer")
    if given not in names:
        raise RequestError(422, f"issuer: {given!r} is no CA of api.tls.client_ca ({'; '.join(names)})",
                           field="issuer")
    return given


async def _describe_app(runtime: Runtime, name: str) -> dict[str, Any]:
    section = _application(runtime, name)
    return {"name": name, "description": section.description, "common_name": section.certificate_cn or name,
            "max_hosts": section.max_hosts, "min_hosts": section.min_hosts, "approval": section.approval,
            "roles": sorted(section.roles), "hosts": await runtime.store.live_count(name),
            "certificates": await runtime.certificates.list(name),
            "site_revocations": await runtime.certificates.list_site(name)}


@endpoints.add("GET", "/v1/apps", "Configured applications, their hosts and certificates, by name, a page at a time",
               responses={200: schemas.ApplicationList, 422: schemas.Error},
               query=paging.query("applications"))
async def list_apps(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    page = paging.requested(request, paging.APPS)
    names = sorted(n for n in runtime.config.applications if page.after is None or n > page.after[0])
    shown = names[:page.limit]
    apps = [await _describe_app(runtime, name) for name in shown]
    more = len(names) > page.limit
    return reply(schemas.ApplicationList, {"applications": apps, "next_cursor": paging.encode(
        paging.APPS, [shown[-1]]) if more else None})


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
                                                comment=body.comment, actor=_actor(request))
    return reply(schemas.Request, await runtime.governor.request_status(row, operator=True))


@endpoints.add("POST", "/v1/requests/{request_id}/approve", "Approve a pending request (the rules apply again)",
               body=schemas.DecisionRequest, responses={200: schemas.Request, 404: schemas.Error, 409: schemas.Error})
async def approve_request(request: web.Request) -> web.Response:
    return await _decide(request, True)


@endpoints.add("POST", "/v1/requests/{request_id}/deny", "Deny a pending request",
               body=schemas.DecisionRequest, responses={200: schemas.Request, 404: schemas.Error, 409: schemas.Error})
async def deny_request(request: web.Request) -> web.Response:
    return await _decide(request, False)


def _time_query(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None:
        return None
    try:
        stamp = float(value)
    except ValueError:
        raise RequestError(422, f"{name}: not a Unix time: {value!r}", field=name) from None
    if not math.isfinite(stamp):
        raise RequestError(422, f"{name}: not a Unix time: {value!r}", field=name)
    return stamp


@endpoints.add("GET", "/v1/audit", "The audit log, newest first, a page at a time: every decision and step, "
               "who and why, with each event's host", responses={200: schemas.EventList, 422: schemas.Error},
               query={"kind": "only events whose kind starts with this",
                      "host": "only events of this host (name, FQDN or id; gone ones too)",
                      "app": "only events of this application's hosts and requests",
                      "actor": "only events whose actor starts with this (operator: every operator)",
                      "since": ("only events at or after this Unix time", {"type": "number"}),
                      "until": ("only events before this Unix time", {"type": "number"}),
                      **paging.query("events")})
async def audit(request: web.Request) -> web.Response:
    page = paging.requested(request, paging.AUDIT)
    query = request.query
    events = await _runtime(request).store.page_events(
        limit=page.limit, after=page.after, kind_prefix=query.get("kind"), host=query.get("host"),
        app=query.get("app"), actor_prefix=query.get("actor"), since=_time_query(request, "since"),
        until=_time_query(request, "until"))
    return reply(schemas.EventList, {"events": events.rows, "next_cursor": paging.next_cursor(paging.AUDIT, events)})


@endpoints.add("GET", "/v1/requests", "Requests, newest first, a page at a time",
               responses={200: schemas.RequestList, 422: schemas.Error},
               query={"app": "only this application's", **paging.query("requests")})
async def list_requests(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    page = paging.requested(request, paging.REQUESTS)
    await runtime.governor.expire_pending()
    rows = await runtime.store.page_requests(limit=page.limit, after=page.after, app=request.query.get("app"))
    return reply(schemas.RequestList,
                 {"requests": [await runtime.governor.request_status(r, operator=True) for r in rows.rows],
                  "next_cursor": paging.next_cursor(paging.REQUESTS, rows)})


@endpoints.add("GET", "/v1/requests/{request_id}", "One request", responses={200: schemas.Request,
                                                                             404: schemas.Error})
async def show_request(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    row = await runtime.governor.operator_request(request.match_info["request_id"])
    return reply(schemas.Request, await runtime.governor.request_status(row, operator=True))


@endpoints.add("POST", "/v1/sweep", "Compare the records with what exists (leaked machines, vanished machines, "
               "orphaned registrations); act as [sweep.policy] says, or with dry_run only list",
               body=schemas.SweepRequest, responses={200: schemas.SweepReport, 409: schemas.Error})
async def sweep(request: web.Request) -> web.Response:
    body: schemas.SweepRequest = await parse_body(request, schemas.SweepRequest)
    try:
        report = await _runtime(request).sweeper.run(dry_run=body.dry_run, actor=_actor(request))
    except Busy as busy:  # one sweep at a time in the fleet
        raise RequestError(409, f"{busy}: try again when it is done") from None
    return reply(schemas.SweepReport, report.as_dict())


@endpoints.add("GET", "/healthz", "Whether this instance can serve: its store answers (503 while it cannot)",
               responses={200: schemas.Health, 503: schemas.Health})
async def health(request: web.Request) -> web.Response:
    return await healthz(_runtime(request).store, detail=True)


@endpoints.add("GET", "/readyz", "Whether this instance can do its work: its store answers and every provider and "
               "registrar instance answered its last probe (503 with the reasons while not)",
               responses={200: schemas.Readiness, 503: schemas.Readiness})
async def ready(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    return await readyz(runtime.store, runtime.health, detail=True)


@endpoints.add("GET", "/metrics", "Prometheus metrics", responses={200: None}, content_type="text/plain")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=await _runtime(request).metrics.render(), content_type="text/plain", charset="utf-8")


def create_admin_api(runtime: Runtime) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=runtime.config.api.max_body_bytes)
    app[max_body_key] = runtime.config.api.max_body_bytes
    app[runtime_key] = runtime
    endpoints.install(app)
    return app
