"""The engine's HTTP surface: SSO under ``/ovirt-engine/sso`` and the REST API under ``/ovirt-engine/api``.

Every XML document is written by ovirtsdk4's own writers from ovirtsdk4 types, and every XML
request body is read by its own readers, so the simulator and the SDK agree on the format by
construction; what remains to be faithful to are URLs, methods, status codes, fault texts and
the order of things, which follow the engine (see the package docstring for what is left out).
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from ovirtsdk4 import reader as sdk_reader
from ovirtsdk4 import types
from ovirtsdk4 import writer as sdk_writer

from . import search
from .state import MIB, EngineFault, EngineState, Template, Vm, utcnow

API = "/ovirt-engine/api"
STATE_KEY = web.AppKey("ovirt_state", EngineState)
AUTH_KEY = web.AppKey("ovirt_auth", dict)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

XML = "application/xml"


def linked(obj: Any, href: str) -> Any:
    """``obj`` with its ``href`` (the SDK's types take it as an attribute, not a constructor argument)."""
    obj.href = href
    return obj


def xml_response(obj: Any, status: int = 200, root: str | None = None) -> web.Response:
    """An SDK object (or list, with ``root``) written by the SDK's writer."""
    body = sdk_writer.Writer.write(obj, root=root, indent=True)
    return web.Response(text=body, status=status, content_type=XML, charset="UTF-8")


def fault_response(fault: EngineFault) -> web.Response:
    """An engine failure as a response: a fault document, or a bare status."""
    if fault.reason is None and fault.detail is None:
        # the engine answers an unknown id with a bare status, no body
        return web.Response(status=fault.status)
    return xml_response(types.Fault(reason=fault.reason, detail=fault.detail), fault.status)


def sso_json(body: dict[str, Any], status: int = 200) -> web.Response:
    """A JSON answer of the SSO service."""
    return web.json_response(body, status=status)


# -- authentication -----------------------------------------------------------------------------


async def sso_token(request: web.Request) -> web.Response:
    """``POST /ovirt-engine/sso/oauth/token``: the password grant, answered in JSON."""
    auth = request.app[AUTH_KEY]
    form = await request.post()
    params = {**request.query, **form}
    scope = str(params.get("scope", ""))
    # SsoUtils answers REST API clients (scope ovirt-app-api) in the OAuth form, others in OpenID's
    rest_scope = "ovirt-app-api" in scope.split()

    def error(code: str, message: str) -> web.Response:
        body = {"error_code": code, "error": message} if rest_scope else {"error": code, "error_description": message}
        return sso_json(body, 400)

    grant = params.get("grant_type")
    if grant != "password":
        return error("unsupported_grant_type", f"The grant type {grant} is not supported.")
    username = str(params.get("username", ""))
    password = str(params.get("password", ""))
    if not username:
        return error("invalid_request", "The request is missing required parameter: username.")
    if username != auth["username"] or not secrets.compare_digest(password, auth["password"]):
        return error("access_denied", f"Cannot authenticate user '{username}': The username or password is incorrect..")
    token = secrets.token_urlsafe(48)
    auth["tokens"][token] = username
    auth["last_use"][token] = time.monotonic()
    auth["issued"] += 1
    # OAuthTokenServlet: "exp" is the session's validTo, Long.MAX_VALUE for a password grant
    # (SsoService: no valid_to in the auth record); the token ends by idling instead
    return sso_json({"access_token": token, "scope": scope, "exp": str(2**63 - 1), "token_type": "bearer"})


def expire_tokens(app: web.Application) -> list[str]:
    """End every SSO session now, as the engine's token cleanup does with idle ones; return the tokens."""
    auth = app[AUTH_KEY]
    expired = list(auth["tokens"])
    for token in expired:
        _expire(auth, token)
    return expired


def _expire(auth: dict[str, Any], token: str) -> None:
    auth["tokens"].pop(token, None)
    auth["last_use"].pop(token, None)
    auth["expired"].append(token)


async def sso_revoke(request: web.Request) -> web.Response:
    """``POST /ovirt-engine/sso/oauth/revoke`` and ``/ovirt-engine/services/sso-logout``: forget a token."""
    auth = request.app[AUTH_KEY]
    form = await request.post()
    token = str(form.get("token") or request.query.get("token") or "")
    if auth["tokens"].pop(token, None) is not None:
        auth["last_use"].pop(token, None)
        auth["revoked"].append(token)
    return sso_json({})


def _authenticated(request: web.Request) -> bool:
    auth = request.app[AUTH_KEY]
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer":
        token = credentials.strip()
        if token not in auth["tokens"]:
            return False
        # TokenCleanupService.cleanupExpiredTokens: a session unused for SSO_TOKEN_TIMEOUT is
        # removed, and the API answers its token with 401 (ovirtsdk4 then logs in again)
        now = time.monotonic()
        timeout = auth["idle_timeout"]
        if timeout is not None and now - auth["last_use"].get(token, now) > timeout:
            _expire(auth, token)
            return False
        auth["last_use"][token] = now
        return True
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(credentials.strip()).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return user == auth["username"] and secrets.compare_digest(password, auth["password"])
    return False


@web.middleware
async def engine_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication for the API, and faults rendered the engine's way."""
    if request.path.startswith(API) and not _authenticated(request):
        return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="RESTAPI"'})
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if request.path.startswith(API) and exc.status in (404, 405):
            # no route: the engine's JAX-RS answers with a bare status
            return web.Response(status=exc.status)
        raise
    except EngineFault as fault:
        return fault_response(fault)
    except search.SearchSyntaxError as exc:
        return fault_response(EngineFault(400, "Operation Failed", f"[Search query syntax error: {exc}]"))


async def read_body(request: web.Request, expected: type) -> Any:
    """The request's XML body read by the SDK's reader; anything else is the engine's 400."""
    raw = await request.read()
    try:
        obj = sdk_reader.Reader.read(raw) if raw.strip() else None
    except Exception as exc:  # noqa: BLE001 - libxml2 and the readers raise several kinds
        raise EngineFault(400, "Operation Failed", f"Failed to parse the request body: {exc}") from None
    if obj is None:
        obj = expected()
    if not isinstance(obj, expected):
        raise EngineFault(400, "Operation Failed", f"Expected a <{expected.__name__.lower()}>, got {type(obj).__name__}")
    return obj


# -- views --------------------------------------------------------------------------------------


def cluster_view(state: EngineState, cluster: Any) -> types.Cluster:
    """A cluster as the engine shows it."""
    dc = cluster.data_center
    return linked(types.Cluster(
        id=cluster.id,
        name=cluster.name,
        description=cluster.description,
        data_center=linked(types.DataCenter(id=dc.id), f"{API}/datacenters/{dc.id}"),
        version=types.Version(major=4, minor=7),
    ), f"{API}/clusters/{cluster.id}")


def _memory_policy(guaranteed: int, max_memory: int) -> types.MemoryPolicy:
    return types.MemoryPolicy(guaranteed=guaranteed, max=max_memory, ballooning=True)


def template_view(template: Template) -> types.Template:
    """A template as the engine shows it."""
    cluster = template.cluster
    return linked(types.Template(
        id=template.id,
        name=template.name,
        description=template.description,
        comment=template.comment,
        status=types.TemplateStatus.OK,
        memory=template.memory,
        memory_policy=_memory_policy(template.guaranteed, template.max_memory),
        cpu=types.Cpu(topology=types.CpuTopology(sockets=template.sockets, cores=1, threads=1)),
        os=types.OperatingSystem(type=template.os_type),
        creation_time=template.creation_time,
        version=types.TemplateVersion(version_number=template.version_number,
                                      base_template=linked(types.Template(id=template.id), f"{API}/templates/{template.id}")),
        cluster=linked(types.Cluster(id=cluster.id), f"{API}/clusters/{cluster.id}") if cluster else None,
        type=types.VmType.SERVER,
    ), f"{API}/templates/{template.id}")


def vm_view(state: EngineState, vm: Vm, all_content: bool = False) -> types.Vm:
    """A VM as the engine shows it; its own initialization only with ``all_content=true``."""
    _, fqdn = state.guest_report(vm)
    return linked(types.Vm(
        id=vm.id,
        name=vm.name,
        description=vm.description,
        comment=vm.comment,
        status=vm.status,
        memory=vm.memory,
        memory_policy=_memory_policy(vm.guaranteed, vm.max_memory),
        cpu=types.Cpu(topology=types.CpuTopology(sockets=vm.sockets, cores=vm.cores, threads=vm.threads)),
        os=types.OperatingSystem(type=vm.os_type),
        type=types.VmType.SERVER,
        creation_time=vm.creation_time,
        start_time=vm.start_time,
        stop_time=vm.stop_time,
        fqdn=fqdn,
        initialization=vm.initialization if all_content else None,
        run_once=vm.run_once_initialization is not None and vm.status is not types.VmStatus.DOWN,
        cluster=linked(types.Cluster(id=vm.cluster.id), f"{API}/clusters/{vm.cluster.id}"),
        template=linked(types.Template(id=vm.template.id), f"{API}/templates/{vm.template.id}"),
        original_template=linked(types.Template(id=vm.template.id), f"{API}/templates/{vm.template.id}"),
        reported_devices=None,
    ), f"{API}/vms/{vm.id}")


def reported_devices(state: EngineState, vm: Vm) -> list[types.ReportedDevice]:
    """What the guest agent reports: its network devices and every address on them, once it runs."""
    devices = []
    for nic in state.guest_nics(vm):
        device_id = str(uuid.uuid5(uuid.UUID(vm.id), nic.mac))
        ips = [
            types.Ip(address=address,
                     version=types.IpVersion.V6 if ":" in address else types.IpVersion.V4)
            for address in nic.addresses
        ]
        devices.append(linked(types.ReportedDevice(
            id=device_id,
            name=nic.name,
            description="guest reported data",
            type=types.ReportedDeviceType.NETWORK,
            mac=types.Mac(address=nic.mac),
            ips=ips,
            vm=linked(types.Vm(id=vm.id), f"{API}/vms/{vm.id}"),
        ), f"{API}/vms/{vm.id}/reporteddevices/{device_id}"))
    return devices


# -- search -------------------------------------------------------------------------------------

_VM_FIELDS: dict[str, Callable[[Vm], str | None]] = {
    "name": lambda vm: vm.name,
    "comment": lambda vm: vm.comment,
    "description": lambda vm: vm.description,
    "status": lambda vm: vm.status.value,
    "cluster": lambda vm: vm.cluster.name,
    "id": lambda vm: vm.id,
    "fqdn": lambda vm: vm.fqdn,
    "ip": lambda vm: vm.address,
}
_TEMPLATE_FIELDS: dict[str, Callable[[Template], str | None]] = {
    "name": lambda t: t.name,
    "comment": lambda t: t.comment,
    "description": lambda t: t.description,
    "cluster": lambda t: t.cluster.name if t.cluster else None,
    "datacenter": lambda t: t.cluster.data_center.name if t.cluster else None,
    "id": lambda t: t.id,
}
_CLUSTER_FIELDS: dict[str, Callable[[Any], str | None]] = {
    "name": lambda c: c.name,
    "description": lambda c: c.description,
    "datacenter": lambda c: c.data_center.name,
    "id": lambda c: c.id,
}


def _boolean_parameter(request: web.Request, name: str, *, empty: bool, missing: bool) -> bool:
    """A boolean query parameter the way ParametersHelper.getBooleanParameter reads it."""
    text = request.query.get(name)
    if text is None:
        return missing
    if text == "":
        return empty
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return missing  # not a boolean: ignored (logged by the engine)


def _integer_parameter(request: web.Request, name: str) -> int | None:
    """An integer query parameter as ParametersHelper.getIntegerParameter reads it: junk is ignored."""
    try:
        return int(request.query[name])
    except (KeyError, ValueError):
        return None


def _search(request: web.Request, items: list[Any], fields: dict[str, Callable[[Any], str | None]]) -> list[Any]:
    parsed = search.parse_search(request.query.get("search", ""), set(fields))
    # AbstractBackendCollectionResource.getSearchParameters: case_sensitive defaults to false
    case_sensitive = _boolean_parameter(request, "case_sensitive", empty=True, missing=False)
    found = search.select(items, parsed.query, fields, case_sensitive=case_sensitive)
    max_count = _integer_parameter(request, "max")
    return search.order_and_page(found, parsed, fields, max(max_count, 0) if max_count is not None else None)


# -- handlers -------------------------------------------------------------------------------------


async def api_root(request: web.Request) -> web.Response:
    """``GET /api``: product information and the summary."""
    state = request.app[STATE_KEY]
    state.advance()
    major, minor, build = (int(p) for p in (state.product_version.split(".") + ["0", "0"])[:3])
    up = sum(1 for vm in state.vms.values() if vm.status is types.VmStatus.UP)
    api = types.Api(
        product_info=types.ProductInfo(
            name="oVirt Engine",
            vendor="ovirt.org",
            instance_id="9c1b6b2e-0000-4000-8000-000000000001",
            version=types.Version(major=major, minor=minor, build=build, revision=0,
                                  full_version=f"{state.product_version}-1.el9"),
        ),
        summary=types.ApiSummary(
            vms=types.ApiSummaryItem(total=len(state.vms), active=up),
            hosts=types.ApiSummaryItem(total=1, active=1),
            users=types.ApiSummaryItem(total=1, active=1),
            storage_domains=types.ApiSummaryItem(total=1, active=1),
        ),
        special_objects=types.SpecialObjects(
            blank_template=linked(types.Template(id="00000000-0000-0000-0000-000000000000"), f"{API}/templates/00000000-0000-0000-0000-000000000000"),
        ),
        time=utcnow(),
        authenticated_user=types.User(user_name=request.app[AUTH_KEY]["username"]),
    )
    return xml_response(api)


async def list_clusters(request: web.Request) -> web.Response:
    """``GET /clusters`` (``search=``)."""
    state = request.app[STATE_KEY]
    found = _search(request, list(state.clusters.values()), _CLUSTER_FIELDS)
    return xml_response([cluster_view(state, c) for c in found], root="clusters")


async def get_cluster(request: web.Request) -> web.Response:
    """``GET /clusters/{id}``."""
    state = request.app[STATE_KEY]
    cluster = state.clusters.get(request.match_info["id"])
    if cluster is None:
        raise EngineFault(404)
    return xml_response(cluster_view(state, cluster))


async def list_templates(request: web.Request) -> web.Response:
    """``GET /templates`` (``search=``)."""
    state = request.app[STATE_KEY]
    found = _search(request, list(state.templates.values()), _TEMPLATE_FIELDS)
    return xml_response([template_view(t) for t in found], root="templates")


async def get_template(request: web.Request) -> web.Response:
    """``GET /templates/{id}``."""
    template = request.app[STATE_KEY].templates.get(request.match_info["id"])
    if template is None:
        raise EngineFault(404)
    return xml_response(template_view(template))


async def list_vms(request: web.Request) -> web.Response:
    """``GET /vms`` (``search=``, ``case_sensitive``, ``max``, ``follow``, ``all_content``)."""
    state = request.app[STATE_KEY]
    state.advance()
    found = _search(request, list(state.vms.values()), _VM_FIELDS)
    all_content = request.query.get("all_content", "").lower() == "true"
    follow = "reported_devices" in request.query.get("follow", "").split(",")
    views = []
    for vm in found:
        view = vm_view(state, vm, all_content)
        if follow:
            view.reported_devices = reported_devices(state, vm)
        views.append(view)
    return xml_response(views, root="vms")


async def add_vm(request: web.Request) -> web.Response:
    """``POST /vms``: 201 with the new VM."""
    state = request.app[STATE_KEY]
    body = await read_body(request, types.Vm)
    vm = state.add_vm(body)
    return xml_response(vm_view(state, vm), 201)


async def get_vm(request: web.Request) -> web.Response:
    """``GET /vms/{id}`` (``follow=reported_devices``, ``all_content``)."""
    state = request.app[STATE_KEY]
    vm = state.vm(request.match_info["id"])
    view = vm_view(state, vm, request.query.get("all_content", "").lower() == "true")
    if "reported_devices" in request.query.get("follow", "").split(","):
        view.reported_devices = reported_devices(state, vm)
    return xml_response(view)


async def remove_vm(request: web.Request) -> web.Response:
    """``DELETE /vms/{id}``."""
    state = request.app[STATE_KEY]
    state.remove_vm(request.match_info["id"])
    return xml_response(types.Action(status="complete"))


async def vm_action(request: web.Request) -> web.Response:
    """``POST /vms/{id}/start|stop|shutdown`` with an ``<action>`` body."""
    state = request.app[STATE_KEY]
    vm_id, verb = request.match_info["id"], request.match_info["action"]
    action = await read_body(request, types.Action)
    if verb == "start":
        state.start_vm(vm_id, action)
    elif verb == "stop":
        state.stop_vm(vm_id, graceful=False)
    elif verb == "shutdown":
        state.stop_vm(vm_id, graceful=True)
    else:
        state.vm(vm_id)
        raise EngineFault(404)
    return xml_response(types.Action(status="complete"))


async def list_reported_devices(request: web.Request) -> web.Response:
    """``GET /vms/{id}/reporteddevices``."""
    state = request.app[STATE_KEY]
    vm = state.vm(request.match_info["id"])
    return xml_response(reported_devices(state, vm), root="reported_devices")


def create_app(seed: dict[str, Any], username: str, password: str, *, state: EngineState | None = None,
               token_idle_timeout: float | None = None) -> web.Application:
    """The simulator as an aiohttp application (run it with ``web.AppRunner`` or a TestServer).

    ``app[AUTH_KEY]`` holds the live tokens (``tokens``), how many were issued and which were
    revoked or expired: tests look there to see that a client logged out or in again. A token
    unused for ``token_idle_timeout`` seconds expires (the engine's SSO_TOKEN_TIMEOUT in
    ovirt-engine.conf, 360000 s by default there; never here unless given); :func:`expire_tokens`
    expires them all at once.
    """
    app = web.Application(middlewares=[engine_middleware])
    app[STATE_KEY] = state or EngineState(seed)
    app[AUTH_KEY] = {"username": username, "password": password, "tokens": {}, "issued": 0, "revoked": [],
                     "expired": [], "last_use": {}, "idle_timeout": token_idle_timeout}
    app.router.add_post("/ovirt-engine/sso/oauth/token", sso_token)
    app.router.add_post("/ovirt-engine/sso/oauth/revoke", sso_revoke)
    app.router.add_post("/ovirt-engine/services/sso-logout", sso_revoke)
    app.router.add_get(API, api_root)
    app.router.add_get(API + "/", api_root)
    app.router.add_get(API + "/clusters", list_clusters)
    app.router.add_get(API + "/clusters/{id}", get_cluster)
    app.router.add_get(API + "/templates", list_templates)
    app.router.add_get(API + "/templates/{id}", get_template)
    app.router.add_get(API + "/vms", list_vms)
    app.router.add_post(API + "/vms", add_vm)
    app.router.add_get(API + "/vms/{id}", get_vm)
    app.router.add_delete(API + "/vms/{id}", remove_vm)
    app.router.add_get(API + "/vms/{id}/reporteddevices", list_reported_devices)
    app.router.add_post(API + "/vms/{id}/{action}", vm_action)
    return app


__all__ = ["API", "AUTH_KEY", "STATE_KEY", "create_app", "expire_tokens", "MIB"]
