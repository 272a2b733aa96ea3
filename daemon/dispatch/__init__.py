"""The one place that calls plugin hooks.

pluggy knows nothing of ``await``: with ``async def`` implementations ``pm.hook.x()`` returns
coroutine objects, and one raising implementation would abort the call for all the others. So
the dispatcher walks the implementations itself, in pluggy's own order, awaits each result under
a timeout, and returns every outcome with the name of the plugin behind it. The dispatch modes
are described in :mod:`governord.hookspecs`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from ..errors import PermanentError, RetryableError, StepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one plugin's implementation returned or raised."""

    plugin: str
    value: Any = None
    error: BaseException | None = None
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def observe(observers: Iterable[Callable[..., None]], *args: Any) -> None:
    """Tell each observer (the metrics' callbacks on calls, steps, transitions and decisions):
    one that fails is logged and skipped, never failing what it observes (a committed
    transition, a finished call) nor keeping the others from hearing of it."""
    for observer in observers:
        try:
            observer(*args)
        except Exception:  # noqa: BLE001 - an observer's failure is its own
            log.exception("observer %s failed", getattr(observer, "__qualname__", observer))


def describe_error(outcome: Outcome) -> str:
    return f"{outcome.plugin}: {outcome.error}"


class Dispatcher:
    """Calls hooks of one pluggy manager; see the dispatch modes in :mod:`governord.hookspecs`."""

    def __init__(self, pm: pluggy.PluginManager, *, timeout: float) -> None:
        self.pm = pm
        self.timeout = timeout
        #: called with (hook, plugin, the call's arguments, its outcome) after every call
        #: (the metrics count calls and failures as they happen)
        self.on_call: list[Callable[[str, str, dict[str, Any], Outcome], None]] = []

    def _impls(self, hook_name: str) -> list[pluggy.HookImpl]:
        # get_hookimpls() lists in registration order with tryfirst last; pluggy calls reversed.
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    def implemented(self, hook_name: str) -> bool:
        """Whether any plugin implements the hook."""
        return bool(self._impls(hook_name))

    async def _call(self, hook_name: str, impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> Outcome:
        outcome = await self._run(hook_name, impl, kwargs)
        observe(self.on_call, hook_name, impl.plugin_name, kwargs, outcome)
        return outcome

    async def _run(self, hook_name: str, impl: pluggy.HookImpl, kwargs: dict[str, Any]) -> Outcome:
        started = time.monotonic()
        args = {name: kwargs[name] for name in impl.argnames}
        try:
            value = impl.function(**args)
            if inspect.isawaitable(value):
                async with asyncio.timeout(self.timeout):  # unlike wait_for, no task per call
                    value = await value
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            error = RetryableError(f"{hook_name} took longer than {self.timeout}s", source=impl.plugin_name)
            return Outcome(impl.plugin_name, error=error, duration=time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - every plugin failure becomes an attributed outcome
            return Outcome(impl.plugin_name, error=exc, duration=time.monotonic() - started)
        return Outcome(impl.plugin_name, value=value, duration=time.monotonic() - started)

    async def collect(self, hook_name: str, **kwargs: Any) -> list[Outcome]:
        """Run every implementation; return all outcomes (failures included, in order)."""
        return [await self._call(hook_name, impl, kwargs) for impl in self._impls(hook_name)]

    async def first(self, hook_name: str, **kwargs: Any) -> Outcome:
        """Run implementations until one returns non-None. A failure stops and raises."""
        for impl in self._impls(hook_name):
            outcome = await self._call(hook_name, impl, kwargs)
            if outcome.error is not None:
                raise as_step_error([outcome])
            if outcome.value is not None:
                return outcome
        raise PermanentError(f"no plugin answered {hook_name}")

    async def broadcast(self, hook_name: str, **kwargs: Any) -> list[Outcome]:
        """Run every implementation; if any failed, raise one error naming each failing plugin."""
        outcomes = await self.collect(hook_name, **kwargs)
        failed = [o for o in outcomes if o.error is not None]
        if failed:
            raise as_step_error(failed)
        return outcomes

    async def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Run every implementation; failures are logged, never raised."""
        for outcome in await self.collect(hook_name, **kwargs):
            if outcome.error is not None:
                log.warning(
                    "hook failed",
                    extra={"hook": hook_name, "plugin": outcome.plugin, "error": str(outcome.error)},
                )


def is_retryable(error: BaseException | None) -> bool:
    """Our own errors say so; an OS-level failure (refused, reset, timed out) is passing."""
    if isinstance(error, StepError):
        return error.retryable
    return isinstance(error, (OSError, TimeoutError))


def as_step_error(failed: list[Outcome]) -> StepError:
    """One StepError for failed outcomes: retryable only if every failure is retryable."""
    message = "; ".join(describe_error(o) for o in failed)
    retryable = all(is_retryable(o.error) for o in failed)
    source = ",".join(o.plugin for o in failed)
    return RetryableError(message, source=source) if retryable else PermanentError(message, source=source)


def call_startup(pm: pluggy.PluginManager, hook_name: str, **kwargs: Any) -> list[Outcome]:
    """Call a start-up hook synchronously, every implementation, and return the outcomes; the
    caller decides which failures stop the daemon (start-up is where a broken plugin should
    stop it, not the first request)."""
    outcomes = []
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        try:
            result = impl.function(**{name: kwargs[name] for name in impl.argnames})
        except Exception as exc:  # noqa: BLE001 - attributed and judged by the caller
            outcomes.append(Outcome(impl.plugin_name, error=exc))
            continue
        if inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()
            outcomes.append(Outcome(impl.plugin_name, error=TypeError(f"{hook_name} must not be async")))
            continue
        outcomes.append(Outcome(impl.plugin_name, value=result))
    return outcomes
