"""Bounded connections on the application API's TLS listener.

Every connection holds a file descriptor, so every way of holding one without doing anything
useful is bounded:

* at most ``max_connections`` connections at once, and ``max_connections_per_peer`` from one
  address: a connection over either cap is closed as soon as it is accepted, before its TLS
  handshake (counted, logged at most once per 10 s with how many were refused meanwhile);
* the TLS handshake must end within ``handshake_timeout`` (asyncio's ``ssl_handshake_timeout``;
  the same bound is given to the TLS shutdown of a closing connection);
* the first request's head must be complete within ``request_timeout`` of the handshake, and
  every request body within ``request_timeout`` of its head (a body cut off is answered 408 and
  the connection closed), so a client trickling a request a byte at a time is cut;
* between requests, an idle connection is closed after ``keepalive_timeout`` (aiohttp's timer,
  which also closes a connection whose next request's head is still incomplete then).

The listener accepts connections itself (:class:`GuardedSite`) rather than through
``loop.create_server``: only there is the peer known before the handshake, so that a refused
connection costs no TLS work, and only there can running out of descriptors be answered with a
pause and one log line. asyncio's own accept loop (the admin socket's) reports running out of
descriptors through the loop's exception handler, once per attempt with a traceback: thousands
of lines a second. :func:`install_exception_handler` puts those through the same rate-limited
line instead.

At start the daemon raises its soft descriptor limit to the hard one
(:func:`governord.descriptors.raise_descriptor_limit`); the configuration is refused if
``max_connections`` plus the descriptors reserved for the rest does not fit under it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..config import ApiSection
from ..rules import RequestError
from .common import Handler

log = logging.getLogger(__name__)

#: seconds between lines of one rate-limited kind
LOG_INTERVAL = 10.0
#: seconds accepting pauses when the process is out of descriptors (asyncio's own delay too)
ACCEPT_RETRY_DELAY = 1.0
#: accept()'s errors that mean "no descriptor or memory for one more connection now"
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: the message asyncio's accept loop gives the loop's exception handler for those
ASYNCIO_OUT_OF_RESOURCES = "socket.accept() out of system resource"


class RateLimitedLog:
    """At most one line per ``interval`` seconds for one kind of event: the first is logged at
    once, those within the next ``interval`` are counted, and at its end one line says how many
    there were (``suppressed=N``, with the last one's message and fields)."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        #: events left out in the running interval, and the last of them
        self.suppressed = 0
        self._last: tuple[int, str, dict[str, Any]] | None = None
        self._window: asyncio.TimerHandle | None = None

    def log(self, level: int, message: str, **fields: Any) -> bool:
        """Log, or count if a line of this kind was logged less than ``interval`` ago; True if logged."""
        if self._window is not None:
            self.suppressed += 1
            self._last = (level, message, fields)
            return False
        self._emit(level, message, fields, 0)
        return True

    def _emit(self, level: int, message: str, fields: dict[str, Any], suppressed: int) -> None:
        self.logger.log(level, message, extra={**fields, "suppressed": suppressed, "per_seconds": self.interval})
        self._window = asyncio.get_running_loop().call_later(self.interval, self._end_window)

    def _end_window(self) -> None:
        self._window = None
        if self.suppressed and self._last is not None:
            level, message, fields = self._last
            suppressed, self.suppressed, self._last = self.suppressed, 0, None
            self._emit(level, message, fields, suppressed)


# -- the policy and its bookkeeping ---------------------------------------------------------------


@dataclass
class ConnectionLimits:
    """The bounds of :mod:`this module <governord.api.connections>` and the count of open
    connections; ``count(reason, stage)`` counts a refusal (the refusals metric)."""

    handshake_timeout: float
    request_timeout: float
    keepalive_timeout: float
    max_connections: int
    max_connections_per_peer: int
    count: Callable[[str, str], None] = lambda reason, stage: None
    open: int = 0
    per_peer: Counter[str] = field(default_factory=Counter)
    #: aiohttp's protocol of an open connection -> its guard (for the request middleware)
    guards: dict[Any, GuardedProtocol] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refusals = RateLimitedLog(log)
        self.timeouts = RateLimitedLog(log)
        self.resources = RateLimitedLog(log)
        self.failures = RateLimitedLog(log)

    @classmethod
    def from_config(cls, api: ApiSection, count: Callable[[str, str], None]) -> ConnectionLimits:
        return cls(api.handshake_timeout, api.request_timeout, api.keepalive_timeout, api.max_connections,
                   api.max_connections_per_peer, count)

    def admit(self, peer: str) -> str | None:
        """Take a place for a connection from ``peer``; the reason if there is none."""
        if self.open >= self.max_connections:
            return "too_many_connections"
        if self.per_peer[peer] >= self.max_connections_per_peer:
            return "too_many_from_peer"
        self.open += 1
        self.per_peer[peer] += 1
        return None

    def release(self, peer: str) -> None:
        self.open -= 1
        self.per_peer[peer] -= 1
        if self.per_peer[peer] <= 0:
            del self.per_peer[peer]

    def refused(self, reason: str, stage: str, peer: str, description: str, **fields: Any) -> None:
        self.count(reason, stage)
        self.refusals.log(logging.WARNING, f"refused: {description}", reason=reason, stage=stage, peer=peer,
                          **fields)

    def timed_out(self, reason: str, stage: str, peer: str, description: str) -> None:
        self.count(reason, stage)
        self.timeouts.log(logging.INFO, f"closed: {description}", reason=reason, stage=stage, peer=peer)

    def out_of_descriptors(self, exc: BaseException | None, where: str) -> None:
        self.count("out_of_descriptors", "connection")
        error = errno.errorcode.get(getattr(exc, "errno", 0) or 0, str(exc))
        self.resources.log(logging.ERROR, "out of file descriptors: not accepting connections for a moment",
                           listener=where, error=error, limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                           open_connections=self.open)


def install_exception_handler(loop: asyncio.AbstractEventLoop, limits: ConnectionLimits) -> None:
    """Route asyncio's "out of system resource" on accept (one traceback per attempt) to one
    rate-limited line; everything else goes to the loop's default handler as before."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == ASYNCIO_OUT_OF_RESOURCES or (
                isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)):
            sock = context.get("socket")
            where = "unknown"
            if sock is not None:
                try:
                    where = str(sock.getsockname()) or "unknown"
                except OSError:
                    pass
            limits.out_of_descriptors(exc, where)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handle)


# -- one connection ---------------------------------------------------------------------------------


class GuardedProtocol(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol of one connection: gives back the
    connection's place when it closes, and closes it if no request head arrives in time."""

    def __init__(self, inner: asyncio.Protocol, limits: ConnectionLimits, peer: str) -> None:
        self.inner = inner
        self.limits = limits
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self._first_request: asyncio.TimerHandle | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.limits.guards[self.inner] = self
        loop = asyncio.get_running_loop()
        self._first_request = loop.call_later(self.limits.request_timeout, self._no_request)
        self.inner.connection_made(transport)

    def request_started(self) -> None:
        """A request head arrived (the middleware saw it)."""
        if self._first_request is not None:
            self._first_request.cancel()
            self._first_request = None

    def _no_request(self) -> None:
        self._first_request = None
        self.limits.timed_out("request_timeout", "connection", self.peer,
                              f"no request within {self.limits.request_timeout:g} s of the handshake")
        self.abort()

    def abort(self) -> None:
        """Close at once, without waiting for the client's TLS close_notify."""
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._first_request is not None:
            self._first_request.cancel()
            self._first_request = None
        self.limits.guards.pop(self.inner, None)
        if not self.closed:
            self.closed = True
            self.limits.release(self.peer)
        self.inner.connection_lost(exc)


# -- the listener -----------------------------------------------------------------------------------


class _Acceptor:
    """The listening sockets of a :class:`GuardedSite` and their accept loop (what aiohttp's
    runner needs of an ``asyncio.Server``: ``sockets`` and ``close``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 factory: Callable[[], asyncio.Protocol], context: ssl.SSLContext | None,
                 limits: ConnectionLimits, backlog: int) -> None:
        self.loop = loop
        self.sockets = sockets
        self.factory = factory
        self.context = context
        self.limits = limits
        self.backlog = backlog
        self._serving = True
        #: connections in their TLS handshake
        self._handshakes: set[asyncio.Task[None]] = set()
        for sock in sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _resume(self, sock: socket.socket) -> None:
        if self._serving:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self.backlog):
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES:
                    self.limits.failures.log(logging.ERROR, "accept failed", error=str(exc))
                    return
                # Linux keeps reporting the socket readable: stop watching it for a moment
                self.limits.out_of_descriptors(exc, str(sock.getsockname()))
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume, sock)
                return
            peer = str(address[0]) if isinstance(address, tuple) else str(address)
            refusal = self.limits.admit(peer)
            if refusal is not None:
                conn.close()
                description = ("connection over the cap" if refusal == "too_many_connections"
                               else "connection over the per-address cap")
                self.limits.refused(refusal, "connection", peer, description,
                                    open_connections=self.limits.open)
                continue
            conn.setblocking(False)
            task = self.loop.create_task(self._serve(conn, peer))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        guard: GuardedProtocol | None = None

        def protocol() -> asyncio.Protocol:
            nonlocal guard
            guard = GuardedProtocol(self.factory(), self.limits, peer)
            return guard

        limits = self.limits
        try:
            await self.loop.connect_accepted_socket(
                protocol, conn, ssl=self.context,
                ssl_handshake_timeout=limits.handshake_timeout if self.context else None,
                ssl_shutdown_timeout=limits.handshake_timeout if self.context else None)
        except BaseException as exc:
            conn.close()
            # the connection never reached aiohttp: its place is free again
            if guard is None or guard.transport is None:
                limits.release(peer)
                if guard is not None:
                    guard.closed = True
            if isinstance(exc, ConnectionAbortedError):  # asyncio's handshake timeout
                limits.timed_out("handshake_timeout", "handshake", peer,
                                 f"no TLS handshake within {limits.handshake_timeout:g} s")
            elif not isinstance(exc, Exception):
                raise
            # a failed handshake is reported by ApplicationTLS; a vanished client needs no word

    def close(self) -> None:
        self._serving = False
        for sock in self.sockets:
            if sock.fileno() != -1:
                self.loop.remove_reader(sock.fileno())
                sock.close()
        for task in list(self._handshakes):
            task.cancel()

    def is_serving(self) -> bool:
        return self._serving

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)


class GuardedSite(web.BaseSite):
    """A TCP (TLS) site of an aiohttp runner whose connections are bounded by ``limits``."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, ssl_context: ssl.SSLContext | None,
                 limits: ConnectionLimits, backlog: int = 128) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self.host = host
        self.port = port
        self.limits = limits

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        server = self._runner.server
        assert server is not None
        self._server = _Acceptor(loop, sockets, server, self._ssl_context, self.limits,  # type: ignore[assignment]
                                 self._backlog)


# -- requests ---------------------------------------------------------------------------------------


limits_key = web.AppKey("connection_limits", ConnectionLimits)


class BodyTimeout(RequestError):
    """A request body that did not arrive in time."""


@web.middleware
async def request_deadlines(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The outermost middleware: tells the connection's guard a request arrived, and cuts a body
    that does not arrive within ``request_timeout`` of its head (408, and the connection closed)."""
    limits = request.app.get(limits_key)
    if limits is None:
        return await handler(request)
    guard = limits.guards.get(request.protocol)
    if guard is not None:
        guard.request_started()
    timer: asyncio.TimerHandle | None = None
    cut = False
    if not request.content.is_eof():

        def cut_body() -> None:
            nonlocal cut
            if request.content.is_eof():
                return  # all there: the handler is just slow, which is not the client's doing
            cut = True
            limits.timed_out("request_timeout", "request", request.remote or "unknown",
                             f"request body not received within {limits.request_timeout:g} s")
            # wakes the handler's read with the error, which the errors middleware answers
            request.content.set_exception(
                BodyTimeout(408, f"request body not received within {limits.request_timeout:g} s"))

        timer = asyncio.get_running_loop().call_later(limits.request_timeout, cut_body)
    try:
        response = await handler(request)
    finally:
        if timer is not None:
            timer.cancel()
    if cut:
        # answer, then close: the rest of the body is not waited for
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response
