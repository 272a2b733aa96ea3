"""The HTTP side: XML-RPC over ``POST /rpc/api``, one thread per request."""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import xmlrpc.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from . import handlers  # noqa: F401  (registers the API methods)
from .dispatch import dispatch
from .model import SESSION_PURGE_INTERVAL, State, read_seed

log = logging.getLogger("satellite_sim")

API_PATH = "/rpc/api"
#: Largest request body read; the real API never needs more.
MAX_BODY = 10 * 1024 * 1024


class _RpcHandler(BaseHTTPRequestHandler):
    server: _RpcServer
    server_version = "Apache"
    sys_version = ""

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        if self.path.split("?", 1)[0] != API_PATH:
            self.send_error(404)
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.send_error(400)
            return
        if length <= 0 or length > MAX_BODY:
            self.send_error(400)
            return
        body = self.rfile.read(length)
        try:
            params, method = xmlrpc.client.loads(body)
        except Exception as exc:  # noqa: BLE001 (any parse failure is a malformed request)
            payload = xmlrpc.client.dumps(xmlrpc.client.Fault(-1, f"redstone.xmlrpc.XmlRpcException: {exc}"))
        else:
            payload = self._call(method or "", params)
        data = payload.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _call(self, method: str, params: tuple[Any, ...]) -> str:
        try:
            result = dispatch(self.server.state, method, params)
        except xmlrpc.client.Fault as fault:
            log.info("%s -> fault %s %s", method, fault.faultCode, fault.faultString)
            return xmlrpc.client.dumps(fault, methodresponse=True)
        log.info("%s -> ok", method)
        return xmlrpc.client.dumps((result,), methodresponse=True)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.send_error(405 if self.path.split("?", 1)[0] == API_PATH else 404)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server API)
        log.debug("%s - %s", self.address_string(), format % args)


class _RpcServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        super().__init__(address, _RpcHandler)
        self.state = state


class SatelliteSimulator:
    """An in-process simulated Satellite/Spacewalk/Uyuni API server.

    ``start()`` binds and serves in a background thread and returns the ``/rpc/api`` URL;
    ``stop()`` shuts it down. ``python -m lab.satellite_sim`` runs the same server as a process.
    """

    def __init__(
        self,
        *,
        username: str,
        password: str,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: str | Path | None = None,
        session_lifetime: float = 3600.0,
        session_purge_interval: float = SESSION_PURGE_INTERVAL,
        delete_delay: float = 1.0,
        flavor: str = "uyuni",
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
    ) -> None:
        self.state = State(
            session_lifetime=session_lifetime, delete_delay=delete_delay,
            session_purge_interval=session_purge_interval, flavor=flavor,
        )
        self._purging = threading.Event()
        self._purger: threading.Thread | None = None
        self._tls: ssl.SSLContext | None = None
        if tls_cert is not None:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(str(tls_cert), str(tls_key) if tls_key else None)
        self.state.load_seed(read_seed(seed))
        self.state.set_login(username, password)
        self._address = (host, port)
        self._server: _RpcServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The XML-RPC endpoint (only after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("simulator is not started")
        host, port = self._server.server_address[:2]
        if isinstance(host, bytes):
            host = host.decode()
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{port}{API_PATH}"

    def bind(self) -> str:
        """Bind the listening socket without serving yet; returns the URL."""
        if self._server is None:
            self._server = _RpcServer(self._address, self.state)
            if self._tls is not None:
                self._server.socket = self._tls.wrap_socket(self._server.socket, server_side=True)
        return self.url

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (the session cleanup runs beside it)."""
        self.bind()
        assert self._server is not None
        self._start_purger()
        self._server.serve_forever(poll_interval=0.2)

    def _start_purger(self) -> None:
        if self._purger is not None:
            return

        def run() -> None:
            while not self._purging.wait(self.state.session_purge_interval):
                purged = self.state.purge_sessions()
                if purged:
                    log.info("session cleanup: %d expired session(s) deleted", purged)

        self._purging.clear()
        self._purger = threading.Thread(target=run, name="satellite-sim-session-cleanup", daemon=True)
        self._purger.start()

    def start(self) -> str:
        """Serve in a background thread; returns the URL."""
        url = self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="satellite-sim", daemon=True)
        self._thread.start()
        return url

    def stop(self) -> None:
        """Stop serving and drop pending asynchronous work."""
        self.state.cancel_timers()
        self._purging.set()
        if self._purger is not None:
            self._purger.join(5)
            self._purger = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None
        self._thread = None

    def __enter__(self) -> SatelliteSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def configure_logging(verbose: bool) -> None:
    """Log requests to stderr (stdout carries only the LISTENING line)."""
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
