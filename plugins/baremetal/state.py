"""The bare-metal provider's durable record: which pool machine belongs to which host.

A bare-metal machine cannot carry governord's ownership marker the way a VM carries a tag, so
the marker is this record: ``allocations`` maps a machine name to the host id that owns it.
``unusable`` keeps machines found in a state nobody may act on (power unreadable, powered on
while free, BMC refusing the credentials), with the reason, for operators and the next scan.

One small JSON file per provider instance. Every change is read-modify-write under an
exclusive ``flock`` on a sibling lock file (two processes on one state directory cannot lose
each other's allocations) and lands with ``os.replace`` after ``fsync``: a crash leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

FORMAT_VERSION = 1


class StateFileError(Exception):
    """The allocation file exists but cannot be read as one (governord will not guess)."""


@dataclass
class Allocation:
    """One machine held for one host."""

    host_id: str
    hostname: str
    allocated_at: float
    #: wall-clock time of the power-on governord asked for (None: not yet)
    powered_on_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "host_id": self.host_id,
            "hostname": self.hostname,
            "allocated_at": self.allocated_at,
            "powered_on_at": self.powered_on_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Allocation:
        return cls(
            host_id=str(data["host_id"]),
            hostname=str(data.get("hostname", "")),
            allocated_at=float(data.get("allocated_at", 0.0)),
            powered_on_at=None if data.get("powered_on_at") is None else float(data["powered_on_at"]),
        )


@dataclass
class Mark:
    """Why a machine is not to be used, and since when."""

    reason: str
    since: float

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since}


@dataclass
class PoolState:
    """The whole file's content."""

    allocations: dict[str, Allocation] = field(default_factory=dict)
    unusable: dict[str, Mark] = field(default_factory=dict)

    def machine_of(self, host_id: str) -> str | None:
        return next((name for name, a in self.allocations.items() if a.host_id == host_id), None)

    def mark(self, machine: str, reason: str) -> None:
        current = self.unusable.get(machine)
        # keep the first time it was seen, so an operator sees how long it has been like this
        since = current.since if current is not None and current.reason == reason else time.time()
        self.unusable[machine] = Mark(reason, since)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "allocations": {name: a.to_json() for name, a in sorted(self.allocations.items())},
            "unusable": {name: m.to_json() for name, m in sorted(self.unusable.items())},
        }

    @classmethod
    def from_json(cls, data: Any) -> PoolState:
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a version {FORMAT_VERSION} allocation file")
        return cls(
            allocations={str(k): Allocation.from_json(v) for k, v in (data.get("allocations") or {}).items()},
            unusable={
                str(k): Mark(str(v["reason"]), float(v["since"])) for k, v in (data.get("unusable") or {}).items()
            },
        )


class AllocationStore:
    """The JSON file behind one provider instance (blocking calls: run them in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _read(self) -> PoolState:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return PoolState()
        try:
            return PoolState.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise StateFileError(f"allocation file {self.path} is unreadable ({exc}); fix or restore it") from exc

    def _write(self, state: PoolState) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        data = json.dumps(state.to_json(), indent=2, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        # the rename itself must survive a power cut too
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self) -> PoolState:
        with self._locked():
            return self._read()

    def update(self, change: Callable[[PoolState], T]) -> T:
        """Apply ``change`` to the current state and write the result, atomically, under the lock.

        The file is written only if ``change`` returns without raising.
        """
        with self._locked():
            state = self._read()
            before = state.to_json()
            result = change(state)
            if state.to_json() != before:
                self._write(state)
            return result


__all__ = ["Allocation", "AllocationStore", "Mark", "PoolState", "StateFileError"]
