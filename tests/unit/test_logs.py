"""Log lines: a request aiohttp cannot parse is the client's mistake, logged as one WARNING line
with the peer and the reason, never as an ERROR with a traceback."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from governord.logs import LogfmtFormatter, quiet_malformed_requests


async def _send_raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read(65536)
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",          # request line over 8 KiB
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",  # a header over 8 KiB
])
async def test_a_malformed_request_is_a_warning_without_traceback(
    caplog: pytest.LogCaptureFixture, request_bytes: bytes
) -> None:
    quiet_malformed_requests()
    quiet_malformed_requests()  # installing twice adds no second filter
    assert len(logging.getLogger("aiohttp.server").filters) == 1
    app = web.Application()
    app.router.add_get("/", lambda request: web.Response(text="ok"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    try:
        answer = await _send_raw(runner.addresses[0][1], request_bytes)
        assert answer.split(b" ", 2)[1] == b"400"
        for _ in range(50):  # the log line is written as the connection is answered
            if caplog.records:
                break
            await asyncio.sleep(0.01)
    finally:
        await runner.cleanup()
    [record] = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == "refused a malformed request"
    assert record.peer == "127.0.0.1" and record.reason.startswith("LineTooLong: ")  # type: ignore[attr-defined]
    line = LogfmtFormatter().format(record)
    assert "level=warning" in line and "exc=" not in line and len(line) < 400
