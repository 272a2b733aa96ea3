"""Puppet's autosign policy's own API, on its own Unix socket (``[api] autosign_socket``).

It decides certificate signing requests and answers nothing else: whoever may open the socket
(the puppetserver's user) can ask whether a CSR is signed, and learns the reason, but cannot
list hosts, read tokens or act as an operator. ``governord-autosign`` is its client; the admin
socket does not serve this decision.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from . import schemas
from .common import errors_middleware, max_body_key, parse_body, reply

if TYPE_CHECKING:
    from ..runtime import Runtime

runtime_key: web.AppKey[Runtime] = web.AppKey("runtime")

#: the one path served
PATH = "/v1/autosign"
#: a CSR may be up to 64 KiB (schemas.AutosignRequest); its JSON body a little more
MAX_BODY_BYTES = 128 * 1024
#: who the decisions are audited as
ACTOR = "puppet-autosign"


async def autosign(request: web.Request) -> web.Response:
    """Decide a Puppet certificate request: 200 ``{"sign": true}`` signs, 403 refuses."""
    body: schemas.AutosignRequest = await parse_body(request, schemas.AutosignRequest)
    runtime: Runtime = request.app[runtime_key]
    sign, reason, row = await runtime.governor.verify_autosign(body.certname, body.csr, actor=ACTOR)
    return reply(schemas.AutosignDecision, {"sign": sign, "reason": reason, "host": row["name"] if row else None},
                 200 if sign else 403)


def create_autosign_api(runtime: Runtime) -> web.Application:
    """The autosign socket's application: ``POST /v1/autosign``; every other path is a 404."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    app[max_body_key] = MAX_BODY_BYTES
    app[runtime_key] = runtime
    app.router.add_post(PATH, autosign)
    return app
