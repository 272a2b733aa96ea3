"""What the bare-metal provider needs from a BMC, whatever its protocol.

Each protocol module (:mod:`.ipmi`, :mod:`.redfish`) implements :class:`Bmc` with blocking
calls; the provider runs them in threads (``call_sync``). Every failure leaves as a
:class:`BmcError` that says whether trying again can help: an unreachable or timing-out BMC can
come back, a rejected password cannot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from governord.models import PowerState


class BmcError(Exception):
    """A BMC call failed; ``retryable`` is False only for what waiting cannot fix (credentials,
    a System that does not exist)."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Bmc(ABC):
    """One machine's baseboard management controller (blocking calls, thread-safe)."""

    #: e.g. ``ipmi://10.0.0.5:623`` or ``https://10.0.0.6:443/redfish/v1/Systems/1``; for messages
    endpoint: str

    @abstractmethod
    def power(self) -> PowerState:
        """The power state as the BMC reports it: ON, OFF or SUSPENDED, never UNKNOWN.

        A BMC that cannot say raises :class:`BmcError` instead, so that nobody acts on a guess.
        """

    @abstractmethod
    def power_on(self) -> None:
        """Ask for power on (returns without waiting for it to show)."""

    @abstractmethod
    def power_off(self) -> None:
        """Cut power at once (no graceful shutdown; returns without waiting)."""

    @abstractmethod
    def set_network_boot_once(self) -> None:
        """Make the next boot, and only the next one, a network (PXE) boot."""

    @abstractmethod
    def clear_boot_override(self) -> None:
        """Drop any boot-device override, so the machine boots as its firmware is set up."""

    def close(self) -> None:  # noqa: B027 - optional: a BMC without a connection to release keeps it
        """Release the connection (best effort)."""


__all__ = ["Bmc", "BmcError"]
