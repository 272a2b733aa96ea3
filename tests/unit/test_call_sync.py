"""ConfiguredInstance.call_sync: blocking SDK calls run in the instance's own threads, at most
``max_concurrency`` at once, each under ``call_timeout``."""

from __future__ import annotations

import asyncio
import contextvars
import threading

import pytest

from governord.errors import RetryableError
from governord.providers import ConfiguredInstance, ProviderConfig

REQUEST = contextvars.ContextVar("request", default="none")


def instance(name: str, limit: int, timeout: float = 30.0) -> ConfiguredInstance:
    return ConfiguredInstance(name, ProviderConfig(type="test", max_concurrency=limit, call_timeout=timeout))


async def test_calls_run_in_the_instance_s_own_threads_up_to_its_limit() -> None:
    vcenter = instance("vcenter", 3)
    release = threading.Event()
    lock = threading.Lock()
    running = 0
    most = 0
    threads: set[str] = set()

    def blocking() -> str:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.current_thread().name)
        release.wait(30)
        with lock:
            running -= 1
        return REQUEST.get()

    REQUEST.set("req-1")
    calls = [asyncio.create_task(vcenter.call_sync(blocking)) for _ in range(8)]
    # the limit holds while calls are blocked: exactly 3 start, the other 5 wait
    while True:
        with lock:
            if running == 3:
                break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    with lock:
        assert running == 3
    release.set()
    results = await asyncio.gather(*calls)
    assert most == 3
    assert results == ["req-1"] * 8  # the caller's context travels into the thread
    assert threads and all(t.startswith("governord-vcenter") for t in threads)


async def test_one_instance_s_blocked_calls_do_not_starve_another() -> None:
    """Before, every instance shared asyncio's default executor (cores + 4 threads): a peer that
    hung with enough calls in flight held all of them and stalled every other peer."""
    stuck, healthy = instance("stuck", 64), instance("healthy", 2)
    release = threading.Event()
    hung = [asyncio.create_task(stuck.call_sync(release.wait, 30)) for _ in range(64)]
    try:
        assert await asyncio.wait_for(healthy.call_sync(lambda: "answered"), timeout=20) == "answered"
    finally:
        release.set()
        await asyncio.gather(*hung)


async def test_a_call_over_its_timeout_is_a_retryable_error() -> None:
    slow = instance("slow", 1, timeout=0.1)
    release = threading.Event()
    with pytest.raises(RetryableError, match="took longer than 0.1s"):
        await slow.call_sync(release.wait, 30)
    release.set()


async def test_a_cancellation_that_meets_the_call_s_end_is_not_lost() -> None:
    """The engine cancels a step whose host another instance took over; the step is then
    often in a call that has just finished (the process was paused, its threads' answers came
    in with the cancellation). The cancellation must still stop the step: a call that swallowed
    it returned its result, and the step went on making calls outside (Python 3.11's
    asyncio.wait_for did that when the call was done by the time the cancellation arrived)."""
    vcenter = instance("vcenter", 2)
    done = threading.Event()

    def quick() -> str:
        done.set()
        return "made"

    call = asyncio.create_task(vcenter.call_sync(quick))
    await asyncio.sleep(0)  # the call starts: its thread returns at once
    assert done.wait(5)
    # the loop does not run meanwhile: the answer is queued, then the cancellation comes
    threading.Event().wait(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
