"""Plumbing shared by both APIs: declared endpoints (which also make the OpenAPI document),
body validation, error responses that name the offending field, and ``/healthz``.

While the store cannot be reached (the database stopped or unreachable), a request that needs
it is answered 503 with ``Retry-After`` (:data:`STORE_UNAVAILABLE`), never 500, and nothing of
it is half-written: each decision is one transaction. ``/healthz`` says so too (503,
``{"status": "unhealthy", "store": ...}``)."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..dispatch.health import PeerHealth
from ..errors import FieldError
from ..rules import RequestError
from ..store import Store, unavailable
from . import schemas

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: headers of an aiohttp error page that describe its plain-text body, not the refusal
_BODY_HEADERS = {"content-type", "content-length", "content-encoding", "transfer-encoding"}


@dataclass
class Endpoint:
    method: str
    path: str
    summary: str
    handler: Handler
    body: type[BaseModel] | None = None
    responses: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    #: query parameters: name -> description, or (description, JSON Schema of the value)
    query: dict[str, str | tuple[str, dict[str, Any]]] = field(default_factory=dict)
    content_type: str = "application/json"
    #: request headers the operation needs: name -> (JSON Schema of the value, description)
    headers: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    #: headers of a response: status -> {name: (JSON Schema of the value, description)}
    response_headers: dict[int, dict[str, tuple[dict[str, Any], str]]] = field(default_factory=dict)


class Endpoints:
    """An API's endpoints: registered on the aiohttp router and described in OpenAPI."""

    def __init__(self, title: str, description: str, *, mtls_prefix: str | None = None,
                 signed_prefixes: tuple[str, ...] = ()) -> None:
        self.title = title
        self.description = description
        #: paths under this prefix need the application's client certificate ...
        self.mtls_prefix = mtls_prefix
        #: ... except these, which authenticate by a signature over the request instead
        self.signed_prefixes = signed_prefixes
        self.items: list[Endpoint] = [
            Endpoint("GET", "/openapi.json", "This document", self._serve_openapi, responses={200: None})
        ]

    def add(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        body: type[BaseModel] | None = None,
        responses: dict[int, type[BaseModel] | None],
        query: dict[str, str | tuple[str, dict[str, Any]]] | None = None,
        content_type: str = "application/json",
        headers: dict[str, tuple[dict[str, Any], str]] | None = None,
        response_headers: dict[int, dict[str, tuple[dict[str, Any], str]]] | None = None,
    ) -> Callable[[Handler], Handler]:
        def decorate(handler: Handler) -> Handler:
            self.items.append(
                Endpoint(method, path, summary, handler, body, responses, query or {}, content_type, headers or {},
                         response_headers or {})
            )
            return handler

        return decorate

    def needs_certificate(self, path: str) -> bool:
        """Whether ``path`` is served only to a client certificate (the middleware's rule too)."""
        if self.mtls_prefix is None or not path.startswith(self.mtls_prefix):
            return False
        return not path.startswith(self.signed_prefixes)

    def install(self, app: web.Application) -> None:
        for ep in self.items:
            app.router.add_route(ep.method, ep.path, ep.handler)

    async def _serve_openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi())

    def openapi(self) -> dict[str, Any]:
        components: dict[str, Any] = {}

        def ref(model: type[BaseModel]) -> dict[str, str]:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                components[name] = sub
            components[model.__name__] = schema
            return {"$ref": f"#/components/schemas/{model.__name__}"}

        paths: dict[str, Any] = {}
        for ep in self.items:
            op: dict[str, Any] = {"summary": ep.summary, "operationId": ep.handler.__name__, "responses": {}}
            params = [
                {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
                for seg in ep.path.split("/")
                if seg.startswith("{")
            ]
            for name, spec in ep.query.items():
                desc, schema = spec if isinstance(spec, tuple) else (spec, {"type": "string"})
                params.append({"name": name, "in": "query", "required": False, "schema": schema,
                               "description": desc})
            params += [
                {"name": name, "in": "header", "required": True, "schema": schema, "description": desc}
                for name, (schema, desc) in ep.headers.items()
            ]
            if params:
                op["parameters"] = params
            responses = dict(ep.responses)
            if ep.body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(ep.body)}}}
                # what parse_body and the size limit answer for any body
                for status in (400, 413, 415, 422):
                    responses.setdefault(status, schemas.Error)
            if self.needs_certificate(ep.path):
                op["security"] = [{"applicationCertificate": []}]
                responses.setdefault(401, schemas.Error)
                responses.setdefault(403, schemas.Error)
            if ep.content_type == "application/json" and ep.handler != self._serve_openapi:
                responses.setdefault(503, schemas.Error)  # the store unreachable (errors_middleware)
            for status, model in sorted(responses.items()):
                entry: dict[str, Any] = {"description": str(status)}
                if model is not None:
                    entry["content"] = {ep.content_type: {"schema": ref(model)}}
                elif ep.content_type != "application/json":
                    entry["content"] = {ep.content_type: {"schema": {"type": "string"}}}
                if status in ep.response_headers:
                    entry["headers"] = {name: {"schema": schema, "description": desc, "required": True}
                                        for name, (schema, desc) in ep.response_headers[status].items()}
                op["responses"][str(status)] = entry
            paths.setdefault(ep.path, {})[ep.method.lower()] = op
        doc_components: dict[str, Any] = {"schemas": components}
        if self.mtls_prefix:
            doc_components["securitySchemes"] = {"applicationCertificate": {
                "type": "mutualTLS", "description": "client certificate issued to the application"}}
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": __version__, "description": self.description},
            "paths": paths,
            "components": doc_components,
        }


def error_response(
    status: int, message: str, field_name: str | None = None, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": message, "field": field_name}, status=status, headers=headers)


#: the body limit an app was made with (its client_max_size), for the messages and the webhook
max_body_key = web.AppKey("max_body", int)


#: the answer to a request that needed the store while it could not be reached
STORE_UNAVAILABLE = ("governord cannot reach its database: try again shortly (a request repeated with its "
                     "idempotency_key is never taken twice)")
#: whole seconds a client is asked to wait before trying again then
STORE_RETRY_AFTER = 2


class _OutageLog:
    """One log line per :data:`INTERVAL` seconds about requests refused for the store, not one
    per request (a busy API would write hundreds a second while the database is away)."""

    INTERVAL = 5.0

    def __init__(self) -> None:
        self._last = 0.0
        self._quiet = 0

    def refused(self, path: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last < self.INTERVAL:
            self._quiet += 1
            return
        log.warning("the store is unreachable, answering 503: %s", reason,
                    extra={"path": path, "refused_since_last_line": self._quiet})
        self._last, self._quiet = now, 0


_outages = _OutageLog()


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn refusals into ``{"error", "field"}`` bodies; never leak a traceback. A request that
    failed because the store could not be reached is a 503 with ``Retry-After``."""
    try:
        return await handler(request)
    except RequestError as exc:
        return error_response(exc.status, str(exc), exc.field)
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body larger than {request.app[max_body_key]} bytes")
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            # keep what the status needs besides the body (a 405's Allow, RFC 9110 15.5.6)
            kept = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
            return error_response(exc.status, exc.reason, headers=kept)
        raise
    except Exception as exc:
        reason = unavailable(exc)
        if reason is not None:
            _outages.refused(request.path, reason)
            return error_response(503, STORE_UNAVAILABLE, headers={"Retry-After": str(STORE_RETRY_AFTER)})
        log.exception("API handler failed", extra={"path": request.path})
        return error_response(500, "internal error (logged)")


#: deepest nesting of arrays and objects a request body may have: every body either API takes
#: is a few levels deep, and Python's json module (like any recursive parser) recurses once per
#: level, so 30,000 levels raised RecursionError before this bound
MAX_JSON_DEPTH = 64

#: a JSON string (escapes included; an unterminated one runs to the end of the text)
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nests_deeper_than(text: str, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest more than ``limit`` levels deep,
    counted without recursion and without parsing (brackets inside strings do not count), in
    C-speed passes over the text. The answer for text that is not JSON does not matter: the
    parser refuses it next."""
    if text.count("[") + text.count("{") <= limit:
        return False  # nearly every body: not enough brackets to go deeper
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit


def load_json(raw: bytes) -> Any:
    """A request body's JSON, as :func:`json.loads` reads it, refused (400) if it is not JSON or
    nests deeper than :data:`MAX_JSON_DEPTH`: checked before anything recursive reads it."""
    try:
        # json.loads' own decoding (UTF-8, -16 or -32), so the text checked is the text parsed
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")
    except UnicodeDecodeError as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    if nests_deeper_than(text, MAX_JSON_DEPTH):
        raise RequestError(400, f"body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except ValueError as exc:  # also an integer of more digits than int() reads
        raise RequestError(400, f"body is not valid JSON: {exc}") from None


async def parse_body(request: web.Request, model: type[BaseModel]) -> Any:
    """Read and validate a JSON body; 400 if it is not a JSON object (or nests too deep), 422
    naming the first bad field."""
    if request.content_type != "application/json":
        raise RequestError(415, "send Content-Type: application/json")
    data = load_json(await request.read() or b"null")
    if not isinstance(data, dict):
        # not the request at all, like a body that is not JSON; a 422 is for a field
        raise RequestError(400, f"body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, field_name = first_problem(exc)
        raise RequestError(422, message, field=field_name) from None


def first_problem(exc: ValidationError) -> tuple[str, str | None]:
    """The message and the field (dotted path) of a validation error's first problem."""
    err = exc.errors()[0]
    loc: str | None = ".".join(str(p) for p in err["loc"]) if err["loc"] else None
    cause = err.get("ctx", {}).get("error")
    if loc is None and isinstance(cause, FieldError):
        loc = cause.field
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    else:
        message = err["msg"].removeprefix("Value error, ")
    if loc is None:
        return message, None
    # an empty key is a field too (the body {"": 1} has one), quoted so the message shows it
    return f"{loc or repr(loc)}: {message}", loc


def reply(model: type[BaseModel], data: Any, status: int = 200) -> web.Response:
    """Serialise through the response model, so what is sent is what the OpenAPI says.

    pydantic writes the JSON bytes itself: no intermediate dicts and no ``json.dumps`` string,
    which for a list of 10,000 hosts was two more copies of the whole answer in memory."""
    body = model.__pydantic_serializer__.to_json(model.model_validate(data))
    return web.Response(body=body, status=status, content_type="application/json")


async def healthz(store: Store, *, detail: bool) -> web.Response:
    """200 ``{"status": "ok", "store": "ok"}`` while the store answers (see :meth:`Store.health
    <governord.store.Store.health>`: at most one ``SELECT 1`` a second), else 503
    ``{"status": "unhealthy", "store": why}``. ``detail``: the driver's own words (the
    operators' socket); otherwise only the kind of failure, as the database's address is
    nobody else's business."""
    problem = await store.health()
    if problem is None:
        return reply(schemas.Health, {"status": "ok", "store": "ok"})
    return reply(schemas.Health, {"status": "unhealthy", "store": _store_problem(problem, detail)}, 503)


def _store_problem(problem: str, detail: bool) -> str:
    """Why the store cannot be reached: the driver's own words (``detail``), or only the kind of
    failure, as the database's address is nobody else's business."""
    return problem if detail else f"unreachable ({problem.split(':', 1)[0]})"


async def readyz(store: Store, health: PeerHealth, *, detail: bool) -> web.Response:
    """200 ``{"status": "ready", ...}`` while the store answers, a round of probes has run since the
    start or the last reload, and no provider or registrar instance is down; else 503 ``"not
    ready"`` with the reasons. ``detail``: the peers and the failures in their own words (the
    operators' socket); otherwise only which peers, as their addresses and errors are nobody
    else's business."""
    problem = await store.health()
    store_state = "ok" if problem is None else _store_problem(problem, detail)
    reasons = ([] if problem is None else [f"store: {store_state}"]) + health.readiness(detail=detail)
    body = {"status": "not ready" if reasons else "ready", "store": store_state, "reasons": reasons,
            "peers": health.view() if detail else None}
    return reply(schemas.Readiness, body, 503 if reasons else 200)

