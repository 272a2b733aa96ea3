"""A fault-injecting HTTP(S) reverse proxy to put in front of a lab peer (vcsim, the Foreman and
Satellite simulators), so that governord meets the failures real networks and servers produce.

Every request is forwarded to the one upstream it fronts, except that, at configured rates, it
gets one of these faults instead:

``error``
    an answer of 502, 503 or 504 with a short HTML body, the way the reverse proxy in front of
    Foreman (Apache), Satellite (Apache) or vCenter (envoy/rhttpproxy) answers when its back end
    fails. SOAP clients see a plain 503, never a 500 (a 500 from vCenter always carries a SOAP
    fault).
``slow``
    the request is forwarded and answered, but the answer is held ``slow_seconds`` (longer than
    the client's timeout): the client gives up on a request that *did* take effect.
``drop``
    the connection is closed mid-request: before anything is forwarded, or after the upstream
    acted and part of its answer was sent.

``error`` and ``drop`` each happen *before* (the upstream never sees the request) or *after*
(the upstream acted; its answer is lost) with equal odds: the second kind is what tests that a
client's retries are idempotent.

Decisions come from one ``random.Random(seed)``, one draw per request in arrival order: the same
seed gives the same sequence of faults, and a run with one client in flight at a time is replayed
exactly. Each fault is logged to stderr (``FAULT <n> <kind>-<phase> <method> <path>``) so a
failing run shows which request got what.

A TLS upstream (vcsim) is fronted by a TLS listener (``--tls-cert``/``--tls-key``): the proxy
terminates TLS, so it can act on HTTP, and talks TLS to the upstream again.

Paths under ``/_faultproxy/`` are the proxy's own and never faulted: ``GET /_faultproxy/stats``
returns the counts as JSON, ``PUT /_faultproxy/rates`` (JSON ``{"error": 0.1, ...}``) changes
the rates while running.

    python -m lab.faultproxy --upstream http://127.0.0.1:3000 --seed 7 --rate 0.2

prints ``LISTENING http://127.0.0.1:PORT`` (the upstream's path appended) once it accepts
connections, like every lab peer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import ssl
import sys
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

if TYPE_CHECKING:
    from .process import PeerProcess

log = logging.getLogger("faultproxy")

KINDS = ("error", "slow", "drop")
#: the proxy's own paths (never forwarded, never faulted)
CONTROL_PREFIX = "/_faultproxy/"
#: headers that belong to one connection, not to the message (RFC 9110 7.6.1), plus the ones
#: aiohttp sets itself from the body it sends
_HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Proxy-Connection", "Content-Length", "Host",
))
#: what a front-end web server says when its back end fails
_ERROR_BODY = ("<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\n<html><head><title>{status} {reason}"
               "</title></head><body><h1>{reason}</h1><p>The server is temporarily unable to service your "
               "request.</p></body></html>\n")


@dataclass
class FaultRates:
    """How often each fault happens, as a fraction of requests (their sum is at most 1)."""

    error: float = 0.0
    slow: float = 0.0
    drop: float = 0.0

    @classmethod
    def spread(cls, rate: float) -> FaultRates:
        """``rate`` of all requests faulted, split evenly between the three kinds."""
        return cls(error=rate / 3, slow=rate / 3, drop=rate / 3)

    def check(self) -> None:
        for kind in KINDS:
            if not 0.0 <= getattr(self, kind) <= 1.0:
                raise ValueError(f"rate of {kind} must be between 0 and 1, not {getattr(self, kind)}")
        if self.total > 1.0 + 1e-9:
            raise ValueError(f"the rates add up to {self.total:.3f}, more than every request")

    @property
    def total(self) -> float:
        return self.error + self.slow + self.drop


@dataclass
class FaultSettings:
    """What a lab's proxies inject (one proxy per peer, each with its own seed from ``seed``)."""

    rates: FaultRates = field(default_factory=lambda: FaultRates.spread(0.2))
    seed: int = 0
    #: how long a ``slow`` answer is held; must exceed ``client_timeout``
    slow_seconds: float = 6.0
    #: the call timeout governord's providers and registrars are configured with behind a proxy
    client_timeout: float = 4.0
    #: statuses an ``error`` answers with
    error_statuses: tuple[int, ...] = (502, 503, 504)

    def __post_init__(self) -> None:
        self.rates.check()
        if self.slow_seconds <= self.client_timeout:
            raise ValueError(f"slow_seconds ({self.slow_seconds}) must exceed client_timeout ({self.client_timeout}),"
                             " or a slow answer is only slow")


@dataclass(frozen=True)
class Decision:
    """What happens to one request."""

    number: int
    kind: str | None
    #: "before" or "after" the upstream sees the request
    phase: str
    status: int
    #: for a drop after forwarding: the fraction of the answer's body sent before closing
    fraction: float

    @property
    def label(self) -> str:
        return "pass" if self.kind is None else (f"{self.kind}-{self.phase}" if self.kind != "slow" else "slow")


class FaultProxy:
    """The proxy: an aiohttp application forwarding to ``upstream`` with faults."""

    def __init__(self, upstream: str, settings: FaultSettings, *, upstream_verify_tls: bool = True) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {upstream!r}")
        self.upstream = f"{parts.scheme}://{parts.netloc}"
        self.upstream_path = parts.path.rstrip("/")
        self.settings = settings
        self.rates = settings.rates
        self._rng = random.Random(settings.seed)
        self._number = 0
        self.counts: Counter[str] = Counter()
        self._verify = upstream_verify_tls
        self._session: aiohttp.ClientSession | None = None

    # -- decisions ----------------------------------------------------------------------------

    def decide(self) -> Decision:
        """The next request's fate: a fixed number of draws per request keeps the sequence aligned."""
        self._number += 1
        pick, phase, status, fraction = (self._rng.random() for _ in range(4))
        kind = None
        threshold = 0.0
        for name in KINDS:
            threshold += getattr(self.rates, name)
            if pick < threshold:
                kind = name
                break
        statuses = self.settings.error_statuses
        return Decision(self._number, kind, "before" if phase < 0.5 else "after",
                        statuses[min(int(status * len(statuses)), len(statuses) - 1)], fraction)

    # -- the application ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get(CONTROL_PREFIX + "stats", self._stats)
        app.router.add_put(CONTROL_PREFIX + "rates", self._set_rates)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, _app: web.Application) -> None:
        # no cookie jar: the client's cookies (vCenter's session) pass through as headers
        connector = aiohttp.TCPConnector(ssl=None if self._verify else False, limit=256)
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None))

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def _stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"requests": self._number, "counts": dict(self.counts),
                                  "rates": asdict(self.rates), "seed": self.settings.seed})

    async def _set_rates(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            rates = FaultRates(**{k: float(v) for k, v in body.items()})
            rates.check()
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=422)
        self.rates = rates
        log.info("rates now %s", asdict(rates))
        return web.json_response(asdict(rates))

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        decision = self.decide()
        self.counts[decision.label] += 1
        if decision.kind is not None:
            log.info("FAULT %d %s %s %s", decision.number, decision.label, request.method, request.path_qs)
        if decision.kind == "drop" and decision.phase == "before":
            return self._drop(request)
        if decision.kind == "error" and decision.phase == "before":
            return self._error(decision.status)
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP)
        assert self._session is not None
        try:
            async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                             data=body, allow_redirects=False) as upstream:
                payload = await upstream.read()
                status, reason = upstream.status, upstream.reason
                answer_headers = CIMultiDict(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP)
        except aiohttp.ClientError as exc:
            # the upstream itself failed: say so the way a front-end server does
            log.warning("upstream failed for %s %s: %s", request.method, request.path_qs, exc)
            return self._error(502)
        if decision.kind == "error":
            return self._error(decision.status)
        if decision.kind == "slow":
            # the upstream acted; the client gives up waiting for the answer
            await asyncio.sleep(self.settings.slow_seconds)
        answer = web.StreamResponse(status=status, reason=reason, headers=answer_headers)
        answer.content_length = len(payload)
        if decision.kind == "drop":
            await answer.prepare(request)
            await answer.write(payload[: int(len(payload) * decision.fraction)])
            return self._drop(request)
        await answer.prepare(request)
        await answer.write(payload)
        await answer.write_eof()
        return answer

    def _error(self, status: int) -> web.Response:
        reason = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}.get(status, "Error")
        return web.Response(status=status, reason=reason, content_type="text/html",
                            text=_ERROR_BODY.format(status=status, reason=reason))

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        # abort: no FIN handshake, no rest of the answer; the client sees a reset or a short read
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # aiohttp ends the handler quietly on a cancelled, dropped connection


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return context


async def serve(proxy: FaultProxy, host: str, port: int, tls: ssl.SSLContext | None) -> None:
    """Listen, announce the URL on stdout, and serve until SIGTERM or SIGINT."""
    runner = web.AppRunner(proxy.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    scheme = "https" if tls else "http"
    print(f"LISTENING {scheme}://{bound_host}:{bound_port}{proxy.upstream_path}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("STATS %s", json.dumps({"requests": proxy._number, "counts": dict(proxy.counts)}))
        await runner.cleanup()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lab.faultproxy", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="the peer's URL (its path is kept in the announced URL)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault sequence")
    parser.add_argument("--rate", type=float, default=None,
                        help="fraction of requests faulted, split evenly between error, slow and drop")
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--slow-rate", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    parser.add_argument("--slow-seconds", type=float, default=6.0, help="how long a slow answer is held")
    parser.add_argument("--client-timeout", type=float, default=4.0,
                        help="the clients' timeout (slow answers must be held longer)")
    parser.add_argument("--error-status", type=int, action="append", default=None,
                        help="status an error answers with (repeatable; default 502, 503, 504)")
    parser.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="... and this key")
    parser.add_argument("--upstream-insecure", action="store_true",
                        help="do not verify the upstream's TLS certificate (a lab peer's self-signed one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rates = (FaultRates.spread(args.rate) if args.rate is not None
             else FaultRates(error=args.error_rate, slow=args.slow_rate, drop=args.drop_rate))
    try:
        settings = FaultSettings(rates=rates, seed=args.seed, slow_seconds=args.slow_seconds,
                                 client_timeout=args.client_timeout,
                                 error_statuses=tuple(args.error_status or (502, 503, 504)))
        proxy = FaultProxy(args.upstream, settings, upstream_verify_tls=not args.upstream_insecure)
    except ValueError as exc:
        print(f"faultproxy: {exc}", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("faultproxy: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls = server_tls(args.tls_cert, args.tls_key) if args.tls_cert else None
    asyncio.run(serve(proxy, args.host, args.port, tls))
    return 0


# -- for the lab ------------------------------------------------------------------------------


def start_faultproxy(upstream: PeerProcess, settings: FaultSettings, *, seed: int, workdir: Path) -> PeerProcess:
    """Start a proxy process in front of ``upstream`` (TLS in front of TLS) and return it as a
    peer whose ``url`` is what governord should be given instead of the upstream's."""
    from .process import start_peer
    from .vcsim import make_tls_files

    name = f"faultproxy-{upstream.name}"
    rates = settings.rates
    argv = [sys.executable, "-m", "lab.faultproxy", "--upstream", upstream.url, "--seed", str(seed),
            "--error-rate", str(rates.error), "--slow-rate", str(rates.slow), "--drop-rate", str(rates.drop),
            "--slow-seconds", str(settings.slow_seconds), "--client-timeout", str(settings.client_timeout)]
    for status in settings.error_statuses:
        argv += ["--error-status", str(status)]
    if upstream.url.startswith("https://"):
        tls = make_tls_files(workdir / f"{name}-tls")
        argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--upstream-insecure"]
    peer, _ = start_peer(name, argv, cwd=Path(__file__).resolve().parents[1], log_path=workdir / f"{name}.log")
    peer.extra["upstream"] = upstream.url
    return peer


def _control(proxy: PeerProcess, what: str, body: dict[str, Any] | None = None) -> Any:
    import urllib.request

    parts = urllib.parse.urlsplit(proxy.url)
    context = ssl._create_unverified_context() if parts.scheme == "https" else None  # noqa: S323 - own lab cert
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.netloc}{CONTROL_PREFIX}{what}", method="GET" if body is None else "PUT",
        data=None if body is None else json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:  # noqa: S310 - loopback lab peer
        return json.loads(answer.read())


def proxy_stats(proxy: PeerProcess) -> dict[str, Any]:
    """The counts of a running proxy (``GET /_faultproxy/stats``)."""
    return _control(proxy, "stats")  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LoggedFault:
    """One ``FAULT`` line of a proxy's log: which request (its number) got what."""

    number: int
    label: str
    method: str
    path: str


def logged_faults(proxy: PeerProcess, first: int = 1, last: int | None = None) -> list[LoggedFault]:
    """The faults a running proxy logged for requests ``first`` to ``last`` (its numbering, as
    ``proxy_stats(...)["requests"]`` counts them), in order."""
    assert proxy.log_path is not None, f"{proxy.name} has no log"
    found: list[LoggedFault] = []
    for line in proxy.log_path.read_text(errors="replace").splitlines():
        words = line.split(" FAULT ", 1)[1].split(" ", 3) if " FAULT " in line else []
        if len(words) == 4 and words[0].isdigit():
            fault = LoggedFault(int(words[0]), words[1], words[2], words[3])
            if fault.number >= first and (last is None or fault.number <= last):
                found.append(fault)
    return found


#: one try of a plugin call behind the proxy: whether it succeeded, the faults its requests
#: got, the error it raised
TryOutcome = tuple[bool, list[LoggedFault], "BaseException | None"]


async def one_try_each(proxy: PeerProcess, tries: Iterable[Callable[[], Awaitable[object]]],
                       errors: tuple[type[BaseException], ...]) -> list[TryOutcome]:
    """Run each try once (no retry above it), noting the faults the proxy logged for its
    requests; an exception of ``errors`` is the try's outcome, any other one fails the test."""
    outcomes: list[TryOutcome] = []
    for attempt in tries:
        first = proxy_stats(proxy)["requests"] + 1
        error: BaseException | None = None
        try:
            await attempt()
        except errors as exc:
            error = exc
        outcomes.append((error is None, logged_faults(proxy, first, proxy_stats(proxy)["requests"]), error))
    return outcomes


def describe_tries(what: str, results: dict[int, list[TryOutcome]]) -> str:
    """Lines for a test's output: per ``call_tries`` setting, how many tries succeeded and how
    many of those despite faults."""
    lines = [what]
    for tries, outcomes in results.items():
        lines.append(f"  call_tries={tries}: {sum(ok for ok, _, _ in outcomes)} succeeded, "
                     f"{sum(ok and bool(faults) for ok, faults, _ in outcomes)} of them despite faults; "
                     f"faults per try {[len(faults) for _, faults, _ in outcomes]}")
    return "\n".join(lines)


def set_proxy_rates(proxy: PeerProcess, rates: FaultRates) -> None:
    """Change what a running proxy injects from now on (``PUT /_faultproxy/rates``)."""
    _control(proxy, "rates", asdict(rates))


if __name__ == "__main__":
    sys.exit(main())
