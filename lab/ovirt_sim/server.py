"""Serving the simulator: on an event loop (the CLI) or in a thread of the calling process."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path
from typing import Any

from aiohttp import web

from .app import API, create_app
from .state import EngineState, Timing


def ssl_context(cert: str | Path | None, key: str | Path | None) -> ssl.SSLContext | None:
    """A server TLS context from PEM files, or None for plain HTTP."""
    if cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key) if key else None)
    return context


async def start_site(app: web.Application, host: str, port: int,
                     tls: ssl.SSLContext | None) -> tuple[web.AppRunner, str]:
    """Listen; return the runner and the API URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    scheme = "https" if tls is not None else "http"
    return runner, f"{scheme}://{bound_host}:{bound_port}{API}"


class OVirtSimServer:
    """The simulator in a background thread of this process (for tests that want its state)."""

    def __init__(self, seed: dict[str, Any], username: str, password: str, *, host: str = "127.0.0.1",
                 port: int = 0, timing: Timing | None = None, tls: ssl.SSLContext | None = None,
                 token_idle_timeout: float | None = None) -> None:
        self.state = EngineState(seed, timing)
        self.app = create_app(seed, username, password, state=self.state, token_idle_timeout=token_idle_timeout)
        self._host, self._port, self._tls = host, port, tls
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ovirt-sim", daemon=True)
        self._runner: web.AppRunner | None = None
        self.url = ""

    def start(self) -> str:
        """Listen and return the API URL."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(start_site(self.app, self._host, self._port, self._tls), self._loop)
        self._runner, self.url = future.result(30)
        return self.url

    def stop(self) -> None:
        """Stop listening and end the thread."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> OVirtSimServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
