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


def each_alone_on_failure(jobs: list[Job], commit: Callable[[list[Job]], list[Any]]) -> list[tuple[bool, Any]]:
    """Commit ``jobs`` together with ``commit`` (one transaction: what each returned, or an
    exception and nothing written); if that fails, commit each of them alone, so a bad job
    sinks only itself. Answers ``(ok, value or exception)`` per job, as :func:`commit_group`
    takes them."""
    if len(jobs) > 1:
        try:
            return [(True, value) for value in commit(jobs)]
        except Exception:  # noqa: BLE001 - each job runs again alone, below
            pass
    outcomes: list[tuple[bool, Any]] = []
    for job in jobs:
        try:
            outcomes.append((True, commit([job])[0]))
        except Exception as exc:  # noqa: BLE001 - handed to the job's caller
            outcomes.append((False, exc))
    return outcomes
