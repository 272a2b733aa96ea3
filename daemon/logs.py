"""Structured log lines on stderr, one event per line in logfmt (``key=value``), which journald
stores as is and which tools such as ``lnav`` or Loki parse. Fields given with ``extra=`` become
keys; secrets never reach a log because config values are :class:`~governord.config.Secret`."""

from __future__ import annotations

import logging
import sys
import time

from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [
            f"ts={stamp}",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a request line or header over its limits, bad
    framing) as an ERROR with a traceback, and answers it before any application code runs. Any
    client can send one, so it is the client's mistake, not the daemon's: a WARNING line with
    the reason, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args, record.exc_info, record.exc_text = "refused a malformed request", (), None, None
            record.peer = peer
            record.reason = f"{type(exc).__name__}: {exc.message}"[:160]  # the message quotes the client's bytes
        return True


def quiet_malformed_requests() -> None:
    """Install :class:`MalformedRequestFilter` on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(MalformedRequestFilter())


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # the SDKs are chatty at INFO; their warnings still come through
    for noisy in ("aiohttp.access", "urllib3", "apypie", "pyVmomi"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_malformed_requests()
