"""``governord-autosign CERTNAME`` (the CSR, PEM, on stdin): the executable puppet.conf's
``autosign`` setting names. Puppet runs it with the certificate name as its only argument
(``governord-autosign -- CERTNAME`` is taken too) and signs the request only if it exits 0.

It asks the daemon on the autosign socket (``$GOVERNORD_AUTOSIGN_SOCKET``, default
``/run/governord-autosign/autosign.sock``; the daemon's ``[api] autosign_socket``), which
answers this question and nothing else, and exits 0 only on an explicit "sign" answer. A usage
error (exit 2), an unreachable daemon or any failure talking to it (exit 3), an HTTP error, an
answer it cannot read or a refusal (exit 1) all leave the request unsigned. The reason goes to
stderr, which puppetserver logs. ``governord-autosign --version`` prints its version.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from typing import Any

DEFAULT_SOCKET = "/run/governord-autosign/autosign.sock"
SOCKET_ENV = "GOVERNORD_AUTOSIGN_SOCKET"
#: a CSR is a few KiB; more than this on stdin is not one
MAX_CSR_BYTES = 64 * 1024
#: seconds the daemon has to answer (puppetserver waits for the policy meanwhile)
TIMEOUT = 60.0

EXIT_SIGN, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
USAGE = "usage: governord-autosign [--] CERTNAME < CSR"


def certname_of(args: list[str]) -> str | None:
    """The certificate name in the arguments Puppet passed (``CERTNAME`` or ``-- CERTNAME``);
    None if they are not that. Without ``--``, an argument that starts with ``-`` is an option,
    which this program has none of: a usage error, never a certificate name."""
    if args[:1] == ["--"]:
        return args[1] if len(args) == 2 and args[1] else None
    if len(args) != 1 or not args[0] or args[0].startswith("-"):
        return None
    return args[0]


async def ask(socket_path: str, certname: str, csr: str) -> tuple[int, Any]:
    """POST the request to the daemon's autosign socket: (HTTP status, decoded JSON or None)."""
    import aiohttp

    connector = aiohttp.UnixConnector(path=socket_path)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        async with session.post("http://governord/v1/autosign", json={"certname": certname, "csr": csr}) as resp:
            try:
                data = await resp.json(content_type=None)
            except ValueError:
                data = None
            return resp.status, data


def decide(args: list[str], stdin: Any, environ: Mapping[str, str]) -> tuple[int, str]:
    """The exit status and the line for stderr (empty when signed)."""
    certname = certname_of(args)
    if certname is None:
        return EXIT_USAGE, USAGE
    raw = stdin.read(MAX_CSR_BYTES + 1)
    if len(raw) > MAX_CSR_BYTES:
        return EXIT_REFUSED, f"not signing {certname}: more than {MAX_CSR_BYTES} bytes on stdin is no CSR"
    csr = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    socket_path = environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    try:
        status, data = asyncio.run(ask(socket_path, certname, csr))
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the answer is "not signed"
        return EXIT_UNREACHABLE, (f"not signing {certname}: cannot ask governord at {socket_path}: "
                                  f"{type(exc).__name__}: {exc}")
    if status == 200 and isinstance(data, dict) and data.get("sign") is True:
        return EXIT_SIGN, ""
    reason = (data.get("reason") or data.get("error")) if isinstance(data, dict) else None
    if status == 403 and reason:  # the daemon's refusal
        return EXIT_REFUSED, f"not signing {certname}: {reason}"
    return EXIT_REFUSED, f"not signing {certname}: governord answered HTTP {status}: {reason or data!r}"


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        # the one option: never a certificate name (a name that starts with "-" is refused anyway)
        from . import __version__

        print(f"governord-autosign {__version__}")
        sys.exit(EXIT_SIGN)
    try:
        code, message = decide(sys.argv[1:], sys.stdin.buffer, os.environ)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except Exception as exc:  # noqa: BLE001 - never exit 0 by accident
        code, message = EXIT_REFUSED, f"not signing: {type(exc).__name__}: {exc}"
    if message:
        print(f"governord-autosign: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
