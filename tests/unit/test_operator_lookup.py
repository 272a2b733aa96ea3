"""An operator names hosts and requests by a unique prefix of their ids (admin API, so
governord-ctl); a prefix that matches several is a 409 listing them, never a guess; the
applications' API and the Cluster Autoscaler's lookups take whole ids only."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import insert

from governord.api import admin_api
from governord.runtime import Runtime
from governord.store.schema import requests

from .conftest import BACKENDS

STORE_BACKENDS = BACKENDS


def _request(request_id: str) -> dict[str, Any]:
    now = time.time()
    return {"id": request_id, "app": "demo", "actor": "t", "kind": "scale", "params": {"role": "node", "add": 1},
            "state": "declined", "reason": "a test row", "host_ids": [], "created_at": now, "updated_at": now}


async def test_ids_by_unique_prefix_and_ambiguity_named(runtime: Runtime, aiohttp_client: Callable[..., Any]) -> None:
    async with runtime.store.engine.begin() as conn:
        await conn.execute(insert(requests), [_request("abcdef01-0000-4000-8000-000000000001"),
                                              _request("abcdef02-0000-4000-8000-000000000002")])
    admin = await aiohttp_client(admin_api.create_admin_api(runtime))
    one = await admin.get("/v1/requests/abcdef01")
    assert one.status == 200 and (await one.json())["id"] == "abcdef01-0000-4000-8000-000000000001"
    both = await admin.get("/v1/requests/abcdef")
    body = await both.json()
    assert both.status == 409 and body["field"] == "request_id"
    assert "abcdef01-0000-4000-8000-000000000001" in body["error"] and "abcdef02" in body["error"]
    assert (await admin.get("/v1/requests/abcde")).status == 404  # too short to be taken as a prefix
    assert (await admin.get("/v1/requests/abcdef03")).status == 404

    # hosts too: by a prefix of the id, not of a name
    made = await runtime.governor.scale("demo", "node", add=1, actor="t")
    [host_id] = made.request["host_ids"]
    found = await admin.get(f"/v1/hosts/{host_id[:10]}")
    assert found.status == 200 and (await found.json())["id"] == host_id
    assert (await admin.get("/v1/hosts/demo-nod")).status == 404
    # the store's plain lookup (the autoscaler's providerIDs) takes whole ids only
    assert await runtime.store.get_host(host_id[:10]) is None
    assert await runtime.store.get_request("abcdef01") is None
