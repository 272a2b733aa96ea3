"""Signed notifications to applications: when a request an application made with a
``callback_url`` is done (its hosts ready, or one failed), governord POSTs the request's status
there, signed with the application's webhook secret (the scheme of :mod:`governord.webhooks`),
and retries with backoff until the application answers 2xx or the attempts run out.

The outbox is a table, so a restart never loses a notification; a repeat carries the same
delivery id (the request id), so the application can de-duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from . import webhooks
from .schema import callbacks

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)

#: attempts before giving up, and the first delay (doubled each time, at most MAX_DELAY)
ATTEMPTS = 8
FIRST_DELAY = 1.0
MAX_DELAY = 300.0
TERMINAL = {"completed", "failed", "declined", "denied", "expired"}


def enqueue(conn: Connection, *, request_id: str, app: str, url: str) -> None:
    """Owe the application a notification for this request (inside the request's transaction)."""
    now = time.time()
    conn.execute(insert(callbacks).values(request_id=request_id, app=app, url=url, next_at=now, created_at=now))


class Notifier:
    """Delivers due callbacks in the background (one task, started and stopped with the runtime)."""

    def __init__(self, runtime: Runtime, *, interval: float = 1.0) -> None:
        self.runtime = runtime
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self._task = asyncio.create_task(self._run(), name="callbacks")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            try:
                await self.deliver_due()
            except Exception:  # noqa: BLE001 - one bad round must not stop notifications
                log.exception("delivering callbacks failed")
            await asyncio.sleep(self.interval)

    async def deliver_due(self) -> None:
        store = self.runtime.store
        async with store.engine.connect() as conn:
            due = [dict(r) for r in (await conn.execute(
                select(callbacks).where(callbacks.c.delivered_at.is_(None), callbacks.c.gave_up_at.is_(None),
                                        callbacks.c.next_at <= time.time()).limit(50))).mappings()]
        for row in due:
            request = await store.get_request(row["request_id"])
            if request is None:
                continue
            status = await self.runtime.governor.request_status(request)
            if status["status"] not in TERMINAL:
                continue
            await self._attempt(row, status)

    async def _attempt(self, row: dict[str, Any], status: dict[str, Any]) -> None:
        section = self.runtime.config.applications.get(row["app"])
        secrets = [s.reveal().encode() for s in section.webhook.secrets] if section and section.webhook else []
        body = json.dumps({"event": f"request-{status['status']}", "request": status}, sort_keys=True).encode()
        error = None
        if not secrets:
            error = f"application {row['app']} has no webhook secret to sign with"
        else:
            headers = {**webhooks.signature_headers(secrets[0], body, delivery=row["request_id"]),
                       "Content-Type": "application/json"}
            assert self._session is not None
            try:
                async with self._session.post(row["url"], data=body, headers=headers) as resp:
                    if 200 <= resp.status < 300:
                        await self._update(row, delivered_at=time.time(), attempts=row["attempts"] + 1,
                                           last_error=None)
                        log.info("callback delivered", extra={"request": row["request_id"], "url": row["url"]})
                        return
                    error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        attempts = row["attempts"] + 1
        if attempts >= ATTEMPTS or not secrets:
            await self._update(row, attempts=attempts, gave_up_at=time.time(), last_error=error)
            log.warning("callback given up", extra={"request": row["request_id"], "error": error})
            return
        delay = min(FIRST_DELAY * 2 ** (attempts - 1), MAX_DELAY)
        await self._update(row, attempts=attempts, next_at=time.time() + delay, last_error=error)

    async def _update(self, row: dict[str, Any], **values: Any) -> None:
        async with self.runtime.store.transaction() as conn:
            await conn.execute(update(callbacks).where(callbacks.c.request_id == row["request_id"]).values(**values))
