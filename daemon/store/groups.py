"""What both backends' writers share: a group of queued writes, committed together, and each
caller told its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Connection

Job = Callable[[Connection], Any]
#: a queued write and the future its caller waits on
Queued = tuple[Job, "asyncio.Future[Any]"]


async def commit_group(batch: list[Queued], commit: Callable[[list[Job]], Awaitable[list[tuple[bool, Any]]]]) -> None:
    """Commit the jobs of ``batch`` with ``commit`` (which answers ``(ok, value or exception)``
    per job) and settle each caller's future. A caller that was cancelled meanwhile is skipped:
    its write stands all the same. If ``commit`` itself fails, every caller hears it."""
    try:
        outcomes = await commit([job for job, _ in batch])
    except BaseException as exc:
        outcomes = [(False, exc)] * len(batch)
        if not isinstance(exc, Exception):
            raise
    for (_job, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
