"""Redfish BMCs through sushy (OpenStack Ironic's Redfish client).

The System resource is read fresh for every question (sushy objects cache their JSON), and
sushy's own retries are cut down: with ``server_side_retries=0`` sushy silently uses three
attempts two seconds apart on a refused connection, so one attempt is asked for and the engine's
backoff does the retrying.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import sushy
from sushy import exceptions as sushy_exc

from governord.errors import PASSING_HTTP_STATUSES
from governord.models import PowerState

from .bmc import Bmc, BmcError

T = TypeVar("T")

_POWER = {
    sushy.PowerState.ON: PowerState.ON,
    sushy.PowerState.OFF: PowerState.OFF,
    # still drawing power: for every decision here that is "not off"
    sushy.PowerState.POWERING_ON: PowerState.ON,
    sushy.PowerState.POWERING_OFF: PowerState.ON,
    sushy.PowerState.PAUSED: PowerState.SUSPENDED,
}


class RedfishBmc(Bmc):
    """One ComputerSystem behind a Redfish service."""

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        system_id: str | None,
        verify: bool | Path,
        timeout: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.system_id = system_id
        self.endpoint = f"{self.base_url}/redfish/v1/Systems/{system_id or '(only)'}"
        self._username = username
        self._password = password
        self._verify: bool | str = str(verify) if isinstance(verify, Path) else verify
        self._timeout = timeout
        self._lock = threading.Lock()
        self._root: Any | None = None
        self._system_path: str | None = None

    def _connect(self) -> tuple[Any, str]:
        if self._root is None:
            self._root = sushy.Sushy(
                self.base_url,
                username=self._username,
                password=self._password,
                verify=self._verify,
                server_side_retries=1,
                server_side_retries_delay=1,
                read_timeout=self._timeout,
                connect_timeout=min(self._timeout, 10.0),
            )
        if self._system_path is None:
            if self.system_id:
                self._system_path = f"/redfish/v1/Systems/{self.system_id}"
            else:
                members = list(self._root.get_system_collection().members_identities)
                if len(members) != 1:
                    raise BmcError(
                        f"{self.base_url} manages {len(members)} systems: set bmc.system_id to one of "
                        f"{', '.join(m.rsplit('/', 1)[-1] for m in members) or '(none)'}",
                        retryable=False,
                    )
                self._system_path = members[0]
        return self._root, self._system_path

    def _run(self, what: str, func: Callable[[Any], T]) -> T:
        with self._lock:
            try:
                root, path = self._connect()
                return func(root.get_system(path))
            except BmcError:
                raise
            except sushy_exc.AccessError as exc:
                raise BmcError(f"{what} via {self.endpoint}: access denied: {exc}", retryable=False) from exc
            except sushy_exc.ResourceNotFoundError as exc:
                raise BmcError(f"{what}: no such System: {exc}", retryable=False) from exc
            except sushy_exc.HTTPError as exc:
                code = int(getattr(exc, "status_code", 0) or 0)
                retryable = code >= 500 or code in PASSING_HTTP_STATUSES or code in (409, 0)
                raise BmcError(f"{what} via {self.endpoint}: {exc}", retryable=retryable) from exc
            except (sushy_exc.ConnectionError, OSError) as exc:
                self._root = None  # connect again (and re-authenticate) next time
                raise BmcError(f"{what} via {self.endpoint}: unreachable: {exc}", retryable=True) from exc
            except sushy_exc.SushyError as exc:
                # malformed or missing attributes: this BMC answered something we cannot use
                raise BmcError(f"{what} via {self.endpoint}: {exc}", retryable=True) from exc

    def power(self) -> PowerState:
        raw = self._run("read power", lambda system: system.power_state)
        state = _POWER.get(raw) if raw is not None else None
        if state is None:
            raise BmcError(f"read power via {self.endpoint}: PowerState is {raw!r}", retryable=True)
        return state

    def power_on(self) -> None:
        self._run("power on", lambda system: system.reset_system(sushy.ResetType.ON))

    def power_off(self) -> None:
        self._run("power off", lambda system: system.reset_system(sushy.ResetType.FORCE_OFF))

    def set_network_boot_once(self) -> None:
        self._run(
            "set one-time network boot",
            lambda system: system.set_system_boot_options(
                target=sushy.BootSource.PXE, enabled=sushy.BootSourceOverrideEnabled.ONCE
            ),
        )

    def clear_boot_override(self) -> None:
        # "Disabled" alone is what the standard asks for, but some services (sushy-emulator among
        # them) insist on a target in the same PATCH: the disk is the harmless one.
        self._run(
            "clear boot override",
            lambda system: system.set_system_boot_options(
                target=sushy.BootSource.HDD, enabled=sushy.BootSourceOverrideEnabled.DISABLED
            ),
        )

    def close(self) -> None:
        with self._lock:
            root, self._root = self._root, None
        connector = getattr(root, "_conn", None)
        if connector is not None:
            try:
                connector.close()
            except Exception:  # noqa: BLE001, S110 - closing is best effort
                pass


__all__ = ["RedfishBmc"]
