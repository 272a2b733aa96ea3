"""How fast each application may ask for changes: scale and release requests on the
application API and webhook deliveries (counted once their signature verified), together, in
one token bucket per application (``[applications.APP.rate_limit]``). Every such request of
the application counts, valid or not, before its body is read. Beyond the limit it is answered
429 with ``Retry-After`` and counted in ``governord_rate_limited_total``; nothing of it is read
further or written.

A repeat of an idempotency key (or of a webhook delivery id) counts like any request: it is
answered from the store, through the same writer as a new decision, so a flood of repeats
costs what a flood of requests does; and a client retrying after a 429 loses nothing, since
the repeat returns the first outcome.

The buckets live in this process: each governord instance limits on its own (a fleet of
instances behind one address would let an application through N times; a shared limit waits
for the fleet issue).

A token bucket of a few lines rather than a library: the answer needed is "take one now, or
how long until one is there" (for Retry-After) at a fractional rate with a burst; aiolimiter
offers a waiting acquire (a request held open instead of refused), and ``limits`` counts hits in
windows of whole seconds, not a rate with a burst.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

if TYPE_CHECKING:
    from ..config import Config, RateLimitSection


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` kept; a request takes one."""

    rate: float
    burst: int
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """Take a token: 0.0 if one was there, else the seconds until one will be (none taken)."""
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


#: what is rate-limited: an application's scale and release requests and its webhook deliveries
ENDPOINTS = ("scale", "release", "webhook")


class RateLimits:
    """The buckets of every application, and the count of refusals."""

    def __init__(self, config: Config, registry: CollectorRegistry) -> None:
        self.refusals = Counter(
            "governord_rate_limited",
            "Requests refused with 429 because the application was over its rate limit, by application and "
            "endpoint (scale, release, webhook)",
            ["app", "endpoint"], registry=registry,
        )
        self._limits: dict[str, RateLimitSection] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take the limits of a (re)loaded config: an application's bucket keeps what it has
        left (no more than its new burst); a removed application's bucket goes."""
        self._limits = {name: section.rate_limit for name, section in config.applications.items()}
        for name in self._limits:  # every application's series from 0, so that rate() sees the first
            for endpoint in ENDPOINTS:
                self.refusals.labels(name, endpoint)
        for name in list(self._buckets):
            limit = self._limits.get(name)
            if limit is None:
                del self._buckets[name]
                continue
            bucket = self._buckets[name]
            bucket.rate, bucket.burst = limit.requests_per_second, limit.burst
            bucket.tokens = min(bucket.tokens, float(limit.burst))

    def limit(self, app: str) -> RateLimitSection | None:
        return self._limits.get(app)

    def take(self, app: str, endpoint: str, *, now: float | None = None) -> int | None:
        """Count a request of ``app`` on ``endpoint``: None if it may go on, or the whole
        seconds to wait (Retry-After, at least 1) if it is over the limit, counted."""
        limit = self._limits.get(app)
        if limit is None:
            return None  # no such application: refused elsewhere, not counted here
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(app)
        if bucket is None:
            bucket = self._buckets[app] = TokenBucket(limit.requests_per_second, limit.burst, float(limit.burst), now)
        wait = bucket.take(now)
        if wait == 0.0:
            return None
        self.refusals.labels(app, endpoint).inc()
        return max(1, math.ceil(wait))
