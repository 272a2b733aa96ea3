"""Signed notifications to applications: when a request an application made with a
``callback_url`` is done (its hosts ready, or one failed), governord POSTs the request's status
there, signed with the application's webhook secret (the scheme of :mod:`governord.webhooks`),
and retries with backoff until the application answers 2xx or the attempts run out.

The outbox is a table, so a restart never loses a notification; a repeat carries the same
delivery id (the request id), so the application can de-duplicate. In a fleet the leader alone
delivers (see :mod:`governord.fleet`); a leader that dies between sending and recording a
delivery makes the next leader send it again: at least once, never lost.

Where a callback may go is the application's ``[applications.APP.callbacks]`` rules with the
policy of :mod:`governord.outbound`: https unless http is allowed, no redirect followed (a 3xx
is a failed attempt), and every address the host resolves to checked at each attempt, the
connection made only to a checked address. A refused destination is a failed attempt that was
never sent: its reason in ``last_error``, a ``callback-refused`` audit event, tried again with
backoff (the application may fix its DNS, an operator its rules) until the attempts run out.

The same outbox carries host events (:func:`enqueue_event`): a host that starts draining before
its retirement (``draining``), one whose drain timed out and stays (``drain-cancelled``). Their
body is written with the event, under a delivery id of its own (in the ``request_id`` column),
and sent as it is, with the same signature, rules and retries.

One callback never holds up the others: a URL no client could ever send to (one stored before
the API checked URLs as strictly as it does now, or written into the table by hand) is given up
at its first round, with the reason in ``last_error``, a ``callback-given-up`` audit event and a
log line; any other failure of one callback counts as a failed attempt of that callback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Set
from typing import TYPE_CHECKING, Any

import aiohttp
import yarl
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from .. import webhooks
from ..config import CallbackRules, Config
from ..outbound import Guard, Policy
from ..store import log_failed, unavailable
from ..store.schema import callbacks

if TYPE_CHECKING:
    from ..fleet import Fleet
    from ..store import Row, Store

#: what the Notifier sends: a request's status as its application sees it
RequestStatus = Callable[["Row"], Awaitable[dict[str, Any]]]

log = logging.getLogger(__name__)

#: attempts before giving up, and the first delay (doubled each time, at most MAX_DELAY)
ATTEMPTS = 8
FIRST_DELAY = 1.0
MAX_DELAY = 300.0
TERMINAL = {"completed", "failed", "declined", "denied", "expired"}
#: callbacks looked at per round, the longest due first
BATCH = 50
#: when a callback whose request is not done yet is looked at again (no attempt is counted)
UNFINISHED_DELAY = 2.0
#: the actor of the audit events the notifier writes
ACTOR = "governord"


def unsendable(url: str) -> str | None:
    """Why no client could ever POST to ``url`` (a retry would not help), or None if one could.

    Checks what aiohttp and the resolver would refuse: no URL at all, a scheme other than
    http(s), no host, a port out of range, a host name the IDNA codec refuses (an empty label,
    a label longer than 63 characters), as ``socket.getaddrinfo`` encodes it."""
    try:
        parsed = yarl.URL(url)
        host, port = parsed.host, parsed.port
    except (ValueError, TypeError) as exc:  # UnicodeError is a ValueError
        return f"not a URL: {exc}"
    if parsed.scheme not in ("http", "https"):
        return f"not an http(s) URL (scheme {parsed.scheme!r})"
    if not host:
        return "no host in the URL"
    if port is None or not 1 <= port <= 65535:
        return f"no usable port ({port})"
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        try:
            host.encode("idna")
        except UnicodeError as exc:
            return f"not a host name that can be looked up: {exc}"
    return None


def enqueue(conn: Connection, *, request_id: str, app: str, url: str) -> None:
    """Owe the application a notification for this request (inside the request's transaction)."""
    now = time.time()
    conn.execute(insert(callbacks).values(request_id=request_id, app=app, url=url, next_at=now, created_at=now))


def event_host(row: Row) -> dict[str, Any]:
    """The host as a host event names it."""
    return {"id": row["id"], "name": row["name"], "fqdn": row["fqdn"], "app": row["app"], "role": row["role"],
            "component": row["component"], "addresses": row["addresses"]}


def enqueue_event(conn: Connection, *, app: str, url: str, host_id: str, event: str,
                  detail: dict[str, Any]) -> str:
    """Owe the application a host event (inside the transaction that made it happen): the body
    ``{"event": EVENT, "delivery": ID, **detail}`` is kept as it is sent. Returns its delivery id."""
    now = time.time()
    delivery = str(uuid.uuid4())
    payload = {"event": event, "delivery": delivery, **detail}
    conn.execute(insert(callbacks).values(request_id=delivery, app=app, url=url, next_at=now, created_at=now,
                                          host_id=host_id, payload=payload))
    return delivery


class Notifier:
    """Delivers due callbacks in the background (one task, started and stopped with the runtime)."""

    def __init__(self, store: Store, request_status: RequestStatus, config: Config, listeners: Set[int],
                 fleet: Fleet, *, interval: float = 1.0) -> None:
        self.store = store
        #: callbacks are delivered by the fleet's leader alone
        self.fleet = fleet
        #: the status of a request as its application sees it (the Governor's)
        self.request_status = request_status
        self.config = config
        #: governord's own TCP ports (a set the daemon adds to once it has bound them)
        self.listeners = listeners
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="callbacks")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def reconfigure(self, config: Config) -> None:
        """Take a reloaded config: the next delivery follows its rules and secrets."""
        self.config = config

    def policy(self, app: str) -> Policy:
        """The application's callback rules as they are now, with governord's own listeners."""
        section = self.config.applications.get(app)
        # an application removed from the config: the defaults
        rules = section.callbacks if section is not None else CallbackRules()
        return Policy.of(app, rules, self.listeners)

    async def _run(self) -> None:
        while True:
            try:
                if self.fleet.is_leader:
                    await self.deliver_due()
            except Exception as exc:  # noqa: BLE001 - one bad round must not stop notifications
                log_failed(log, "delivering callbacks", exc)
            await asyncio.sleep(self.interval)

    async def deliver_due(self) -> None:
        store = self.store
        async with store.engine.connect() as conn:
            due = [dict(r) for r in (await conn.execute(
                select(callbacks).where(callbacks.c.delivered_at.is_(None), callbacks.c.gave_up_at.is_(None),
                                        callbacks.c.next_at <= time.time())
                .order_by(callbacks.c.next_at).limit(BATCH))).mappings()]
        unfinished = []
        for row in due:
            if not self.fleet.is_leader:
                break  # paused or cut off past the leader lease: another instance delivers now
            try:
                if not await self._deliver(row):
                    unfinished.append(row["request_id"])
            except Exception as exc:  # noqa: BLE001 - one callback's failure is that callback's alone
                if unavailable(exc) is not None:
                    raise  # the store's, not the callback's: no attempt counted, the round ends
                log.exception("callback failed", extra={"request": row["request_id"]})
                await self._failed(row, f"{type(exc).__name__}: {exc}", retry=True)
        if unfinished:
            # look again later, after the others: requests still in progress (or waiting for an
            # approval for days) must not fill every round and starve the finished ones
            async with store.transaction() as conn:
                await conn.execute(update(callbacks).where(callbacks.c.request_id.in_(unfinished))
                                   .values(next_at=time.time() + UNFINISHED_DELAY))

    async def _deliver(self, row: dict[str, Any]) -> bool:
        """Try to send the callback if its request is done; False if the request is not done."""
        reason = unsendable(row["url"])
        if reason is not None:
            await self._failed(row, f"callback_url {row['url']!r} cannot be sent to: {reason}", retry=False)
            return True
        if row.get("payload") is not None:  # a host event: its body was written with it
            await self._attempt(row, json.dumps(row["payload"], sort_keys=True).encode())
            return True
        request = await self.store.get_request(row["request_id"])
        if request is None:
            return True
        status = await self.request_status(request)
        if status["status"] not in TERMINAL:
            return False
        await self._attempt(row, json.dumps({"event": f"request-{status['status']}", "request": status},
                                            sort_keys=True).encode())
        return True

    async def _attempt(self, row: dict[str, Any], body: bytes) -> None:
        section = self.config.applications.get(row["app"])
        secrets = [s.reveal().encode() for s in section.webhook.secrets] if section and section.webhook else []
        if not secrets:
            await self._failed(row, f"application {row['app']} has no webhook secret to sign with", retry=False)
            return
        headers = {**webhooks.signature_headers(secrets[0], body, delivery=row["request_id"]),
                   "Content-Type": "application/json"}
        policy = self.policy(row["app"])
        if (refusal := policy.url_refusal(row["url"])) is not None:  # the rules changed since the request
            await self._refused(row, f"callback_url {row['url']!r} refused: {refusal}")
            return
        guard = Guard(policy)
        # a session per attempt: its connector's resolver and sockets check this application's
        # rules, and nothing (no DNS cache, no kept connection) is shared with another
        # application's callbacks; no proxy from the environment (trust_env is off)
        async with aiohttp.ClientSession(connector=guard.connector(), timeout=aiohttp.ClientTimeout(total=30)) as session:
            try:
                async with session.post(row["url"], data=body, headers=headers, allow_redirects=False) as resp:
                    if 200 <= resp.status < 300:
                        await self._update(row, delivered_at=time.time(), attempts=row["attempts"] + 1,
                                           last_error=None)
                        log.info("callback delivered", extra={"request": row["request_id"], "url": row["url"]})
                        return
                    error = f"HTTP {resp.status}"
                    if 300 <= resp.status < 400:
                        error += f" (a redirect, not followed; Location: {resp.headers.get('Location', '')[:200]!r})"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if guard.refused is not None:
                    await self._refused(row, guard.refused)
                    return
                error = f"{type(exc).__name__}: {exc}"
        await self._failed(row, error, retry=True)

    async def _refused(self, row: dict[str, Any], error: str) -> None:
        """An attempt the policy stopped before anything was sent: audited, then counted as a
        failed attempt (tried again later, as DNS or the rules may change)."""
        async with self.store.transaction() as conn:
            await self.store.add_event(conn, "callback-refused", actor=ACTOR, request_id=row["request_id"],
                                       host_id=row.get("host_id"), detail={"app": row["app"], "url": row["url"], "error": error})
        log.warning("callback refused", extra={"request": row["request_id"], "url": row["url"], "error": error})
        await self._failed(row, error, retry=True)

    async def _failed(self, row: dict[str, Any], error: str, *, retry: bool) -> None:
        """Count a failed attempt: try again later with backoff, or (out of attempts, or
        ``retry`` False: nothing will change) give the callback up, audited and logged."""
        attempts = row["attempts"] + 1
        if retry and attempts < ATTEMPTS:
            delay = min(FIRST_DELAY * 2 ** (attempts - 1), MAX_DELAY)
            await self._update(row, attempts=attempts, next_at=time.time() + delay, last_error=error)
            return
        store = self.store
        async with store.transaction() as conn:
            await conn.execute(update(callbacks).where(callbacks.c.request_id == row["request_id"]).values(
                attempts=attempts, gave_up_at=time.time(), last_error=error))
            await store.add_event(conn, "callback-given-up", actor=ACTOR, request_id=row["request_id"],
                                  host_id=row.get("host_id"), detail={"app": row["app"], "url": row["url"], "attempts": attempts, "error": error})
        log.warning("callback given up", extra={"request": row["request_id"], "url": row["url"], "error": error})

    async def _update(self, row: dict[str, Any], **values: Any) -> None:
        async with self.store.transaction() as conn:
            await conn.execute(update(callbacks).where(callbacks.c.request_id == row["request_id"]).values(**values))
