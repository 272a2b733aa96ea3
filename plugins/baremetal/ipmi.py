"""IPMI 2.0 (RMCP+, "lanplus") BMCs through pyghmi's :class:`pyghmi.ipmi.command.Command`.

pyghmi gotchas this module works around:

- Credentials are handed over as bytes. pyghmi keeps a process-wide session cache keyed by the
  credentials as passed, but stores them encoded; with ``str`` credentials a second
  ``Command`` for the same BMC in the same process never matches the cached session and waits
  forever for a login that already happened (pyghmi 1.6.19).
- ``wait=True`` on power changes polls with one-second sleeps; the provider waits itself,
  with short reads, so ``wait=False`` is used.
- ``get_bootdev()`` cannot be trusted to read back a one-time boot device (ipmi_sim reports the
  "valid" bit cleared and pyghmi then says ``default``), so nothing here relies on reading it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyghmi.exceptions import IpmiException
from pyghmi.ipmi import command

from governord.models import PowerState

from .bmc import Bmc, BmcError

T = TypeVar("T")

#: Login failures that no retry can fix (pyghmi's texts for RMCP+ status codes and RAKP checks).
_AUTH_FAILURES = (
    "incorrect password",
    "unauthorized name",
    "unauthorized role",
    "invalid role",
    "invalid username length",
    "insufficient privilege",
)

_POWER = {"on": PowerState.ON, "off": PowerState.OFF}


class IpmiBmc(Bmc):
    """A BMC spoken to over IPMI 2.0 (UDP)."""

    def __init__(self, address: str, port: int, username: str, password: str) -> None:
        self.address = address
        self.port = port
        self.endpoint = f"ipmi://{address}:{port}"
        self._username = username.encode()
        self._password = password.encode()
        self._lock = threading.Lock()
        self._command: Any | None = None

    def _run(self, what: str, func: Callable[[Any], T]) -> T:
        with self._lock:
            try:
                if self._command is None:
                    # logs in (RMCP+; pyghmi falls back from cipher suite 17 to 3 by itself)
                    self._command = command.Command(
                        bmc=self.address, userid=self._username, password=self._password, port=self.port
                    )
                return func(self._command)
            except IpmiException as exc:
                self._command = None  # the session may be broken: log in afresh next time
                text = str(exc) if exc.args and exc.args[0] else "no answer (BMC unreachable or timed out)"
                permanent = any(marker in text.lower() for marker in _AUTH_FAILURES)
                raise BmcError(f"{what} via {self.endpoint}: {text}", retryable=not permanent) from exc
            except OSError as exc:
                self._command = None
                raise BmcError(f"{what} via {self.endpoint}: {exc}", retryable=True) from exc

    def power(self) -> PowerState:
        answer = self._run("read power", lambda c: c.get_power())
        state = _POWER.get(str(answer.get("powerstate", "")).lower()) if isinstance(answer, dict) else None
        if state is None:
            raise BmcError(f"read power via {self.endpoint}: unexpected answer {answer!r}", retryable=True)
        return state

    def power_on(self) -> None:
        self._run("power on", lambda c: c.set_power("on", wait=False))

    def power_off(self) -> None:
        self._run("power off", lambda c: c.set_power("off", wait=False))

    def set_network_boot_once(self) -> None:
        self._run("set one-time network boot", lambda c: c.set_bootdev("network", persist=False))

    def clear_boot_override(self) -> None:
        self._run("clear boot override", lambda c: c.set_bootdev("default"))

    def close(self) -> None:
        with self._lock:
            cmd, self._command = self._command, None
        if cmd is not None:
            try:
                cmd.ipmi_session.logout()
            except Exception:  # noqa: BLE001, S110 - logging out is best effort
                pass


__all__ = ["IpmiBmc"]
