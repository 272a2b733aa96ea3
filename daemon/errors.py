"""Exceptions shared across governord.

The split between :class:`RetryableError` and :class:`PermanentError` is what the engine acts on:
a retryable failure is tried again with backoff, a permanent one fails the host at once with the
step named. Plugins raise these (or subclasses) with the peer's own message kept.
"""

from __future__ import annotations

from collections.abc import Collection


class GovernordError(Exception):
    """Base class of governord's own errors."""


class ConfigError(GovernordError):
    """The configuration is invalid. ``str()`` names the file and the key."""

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {message}")


class ConfigErrors(ConfigError):
    """Several configuration errors, found in one reading (``--check`` reports them all). Its
    ``path``, ``key`` and ``message`` are the first's; ``errors`` holds each, in the file's order
    of checking; ``str()`` is one line each."""

    def __init__(self, errors: list[ConfigError]) -> None:
        first = errors[0]
        super().__init__(first.path, first.key, first.message)
        self.errors = errors
        self.args = ("\n".join(str(e) for e in errors),)

    @staticmethod
    def each(exc: ConfigError) -> list[ConfigError]:
        """The errors an exception holds: its own list, or itself."""
        return list(exc.errors) if isinstance(exc, ConfigErrors) else [exc]


class FieldError(ValueError):
    """A validation rule over several fields, naming the field its refusal is reported on
    (pydantic gives a model-level rule no location, and a refusal must name a field). Raise it
    from a model validator; the API reads it from the error's context."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class StepError(GovernordError):
    """A lifecycle step failed. ``source`` names the plugin or provider instance behind it."""

    retryable: bool = False
    #: the HTTP status behind the failure, when a peer answered with one
    http_status: int | None = None

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(message)


class RetryableError(StepError):
    """A passing failure (timeout, 5xx, rate limit, connection refused): try again later."""

    retryable = True


class PermanentError(StepError):
    """A failure that will not go away by itself (bad template, quota, auth)."""

    retryable = False


class MissingAtPeer(PermanentError):
    """The peer answered that something the config names is not there, or not usable (a Foreman
    hostgroup, a Puppet class, a Satellite system group, a disabled activation key): the config
    or the peer needs fixing; trying again does not help. The checks of tag mappings at load and
    reload (:mod:`governord.dispatch.health`) tell it from a peer that cannot be asked."""


#: Client-error statuses that still mean "try again later", whatever the API.
PASSING_HTTP_STATUSES = frozenset({408, 429})


def http_error(
    status: int, message: str, *, source: str | None, also_passing: Collection[int] = ()
) -> RetryableError | PermanentError:
    """The error for a peer's HTTP answer: server errors, 408 and 429 (and a peer's own
    ``also_passing``, e.g. 409 "busy") are retryable; any other status is permanent."""
    passing = status >= 500 or status in PASSING_HTTP_STATUSES or status in also_passing
    error = RetryableError(message, source=source) if passing else PermanentError(message, source=source)
    error.http_status = status
    return error
