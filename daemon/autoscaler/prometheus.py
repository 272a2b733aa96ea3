"""Asking a Prometheus server for one number: an instant query through its HTTP API
(``GET /api/v1/query``), answered as ``{"status": "success", "data": {"resultType": ..., "result":
...}}`` or, for a query it refuses, HTTP 400/422/503 with ``{"status": "error", "errorType": ...,
"error": ...}``.

A rule's query must come down to one number: a scalar, or a vector of exactly one sample (an
``avg``/``sum``/``max`` over the role's series). No sample at all, or NaN or infinity, is *no data*; several
samples, or any failure (refused, unreachable, timed out, not Prometheus' answer), is an error.
Neither is a value a rule may act on (:mod:`governord.autoscaler.thresholds`).
"""

from __future__ import annotations

import math
import ssl
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from ..config import PrometheusSection


class QueryError(Exception):
    """The query gave no number to act on; the message says why (in Prometheus' words if it answered)."""


class NoData(QueryError):
    """The query answered, with no sample (or NaN): nothing is known about the load."""


class PrometheusClient:
    """One server's query API, over one aiohttp session (made on first use)."""

    def __init__(self, section: PrometheusSection) -> None:
        self.section = section
        self.url = section.url.rstrip("/") + "/api/v1/query"
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            context: ssl.SSLContext | bool = True
            if self.section.ca_file is not None:
                context = ssl.create_default_context(cafile=str(self.section.ca_file))
            headers = {"Accept": "application/json"}
            if self.section.bearer_token is not None:
                headers["Authorization"] = f"Bearer {self.section.bearer_token.reveal()}"
            self._session = aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.section.timeout),
                connector=aiohttp.TCPConnector(ssl=context, limit=8),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def value(self, query: str) -> float:
        """The query's one number now; :class:`NoData` or :class:`QueryError` if there is none."""
        try:
            async with self._open().get(self.url, params={"query": query}, allow_redirects=False) as response:
                try:
                    body: Any = await response.json(content_type=None)
                except ValueError:
                    raise QueryError(f"HTTP {response.status} from {self.section.url}, not Prometheus' JSON") from None
                status = response.status
        except aiohttp.ClientError as exc:
            raise QueryError(f"cannot reach {self.section.url}: {type(exc).__name__}: {exc}") from None
        except TimeoutError:
            raise QueryError(f"no answer from {self.section.url} within {self.section.timeout:g}s") from None
        if not isinstance(body, dict) or body.get("status") != "success":
            what = body if not isinstance(body, dict) else f"{body.get('errorType')}: {body.get('error')}"
            raise QueryError(f"Prometheus refused the query (HTTP {status}): {what}")
        return _one_number(body.get("data"))


def _one_number(data: Any) -> float:
    if not isinstance(data, dict):
        raise QueryError("Prometheus answered without data")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        sample = result
    elif kind == "vector" and isinstance(result, list):
        if not result:
            raise NoData("the query returned no series")
        if len(result) > 1:
            labels = ", ".join(str(s.get("metric", {})) for s in result[:3])
            raise QueryError(f"the query returned {len(result)} series ({labels}{', ...' if len(result) > 3 else ''}): "
                             "aggregate it to one (avg, sum, max)")
        sample = result[0].get("value")
    else:
        raise QueryError(f"the query returned a {kind}, not a number (an instant vector of one series, or a scalar)")
    try:
        number = float(sample[1])  # type: ignore[index]
    except (TypeError, ValueError, IndexError):
        raise QueryError(f"not a sample: {sample!r}") from None
    if not math.isfinite(number):
        raise NoData(f"the query's value is {number} (a ratio over nothing?)")
    return number
