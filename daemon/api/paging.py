"""Paging for every list of both APIs: keyset ("cursor") paging, with a maximum page size.

A list takes ``limit``, the most rows one page holds (default :data:`DEFAULT_LIMIT`, at most
:data:`MAX_LIMIT`; a value outside 1..MAX_LIMIT is a 422 naming ``limit``), and ``cursor``, the
``next_cursor`` of the page before (absent for the first page; anything else than a cursor this
list gave is a 422 naming ``cursor``). Each reply carries ``next_cursor``: where the next page
starts, or null on the last page.

Why keyset paging, not offsets: the tables listed change while a client pages through them
(hosts are made and go, events are written all the time, the retention deletes old rows). An
offset counts rows, so a row added or deleted before it between two pages shifts every later row
by one: the client sees a row twice, or never. A cursor instead names the sort key of the last
row returned (always ending in a unique column, the row's id, so no two rows tie) and the next
page starts strictly after it, wherever that row now is, even if it was deleted meanwhile. So
every row that exists from the first page to the last is listed exactly once, whatever else is
added or removed meanwhile; a row added meanwhile is listed at most once (in a list ordered
oldest first, where new rows sort last, it is). And each page is one index seek plus ``limit``
rows, where an offset makes the database walk past every row before it: the cost of a page does
not grow with how far into the list it is.

A cursor is opaque to clients: base64url of a JSON array naming the list and the key.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from ..models import HostState
from ..rules import RequestError
from ..store import Page

#: rows per page when the client does not say, and the most it may ask for
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

#: the sort key of each list (the columns its cursor names, their types)
HOSTS = ("hosts", (float, str))  # created_at, id: oldest first
REQUESTS = ("requests", (float, str))  # created_at, id: newest first
AUDIT = ("audit", (int,))  # event id: newest first
TRAIL = ("trail", (int,))  # event id of one host's trail: oldest first
APPS = ("apps", (str,))  # application name, in order
PLUGINS = ("plugins", (str,))  # plugin name, in order

_DIGITS = re.compile(r"-?[0-9]+")
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,1024}")


def query(what: str) -> dict[str, str | tuple[str, dict[str, Any]]]:
    """The paging parameters, as :class:`~governord.api.common.Endpoints` documents them."""
    return {
        "limit": (f"at most this many {what} (default {DEFAULT_LIMIT}, from 1 to {MAX_LIMIT}; outside: 422)",
                  {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}),
        "cursor": ("the next_cursor of the page before, as it came (another is a 422); omit it for the first page",
                   {"type": "string", "pattern": f"^{_CURSOR.pattern}$"}),
    }


def state_query(what: str) -> tuple[str, dict[str, Any]]:
    """A ``state`` filter of a host list: one of the lifecycle states (else a 422 naming it)."""
    return what, {"type": "string", "enum": [state.value for state in HostState]}


@dataclass(frozen=True)
class PageRequest:
    limit: int
    #: the sort key of the row the page starts after (None: from the start)
    after: tuple[Any, ...] | None


def requested(request: web.Request, kind: tuple[str, tuple[type, ...]]) -> PageRequest:
    """The page a list request asks for; 422 naming ``limit`` or ``cursor`` if it is not one."""
    cursor = request.query.get("cursor")
    return PageRequest(limit(request.query.get("limit")),
                       None if cursor is None else decode(cursor, kind))


def limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    # int() alone would also take "1_000", " 5" and non-ASCII digits, and refuse 5000 digits
    if not _DIGITS.fullmatch(text):
        raise RequestError(422, "limit: not an integer", field="limit")
    if len(text) > 9 or not 1 <= int(text) <= MAX_LIMIT:
        raise RequestError(422, f"limit: {text[:12]} is not from 1 to {MAX_LIMIT} (the most one page holds)",
                           field="limit")
    return int(text)


def host_state(request: web.Request) -> str | None:
    """The ``state`` filter of a host list, if given: a lifecycle state, else a 422 naming it."""
    state = request.query.get("state")
    if state is not None and state not in {s.value for s in HostState}:
        raise RequestError(422, f"state: not a host state (one of {', '.join(s.value for s in HostState)})",
                           field="state")
    return state


def encode(kind: tuple[str, tuple[type, ...]], key: Sequence[Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([kind[0], *key])).rstrip(b"=").decode()


def next_cursor(kind: tuple[str, tuple[type, ...]], page: Page) -> str | None:
    """The reply's ``next_cursor``: None on the last page."""
    return None if page.next is None else encode(kind, page.next)


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and abs(value) < 2**63
    return isinstance(value, str) and len(value) <= 255 and "\x00" not in value


def decode(text: str, kind: tuple[str, tuple[type, ...]]) -> tuple[Any, ...]:
    """The sort key a cursor of this list names; a 422 naming ``cursor`` for anything else."""
    refused = RequestError(422, "cursor: not a cursor of this list (pass next_cursor as it came)", field="cursor")
    if not _CURSOR.fullmatch(text):
        raise refused
    try:
        value = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        raise refused from None
    name, shape = kind
    if not isinstance(value, list) or len(value) != len(shape) + 1 or value[0] != name:
        raise refused
    if not all(_fits(item, column) for item, column in zip(value[1:], shape, strict=True)):
        raise refused
    return tuple(value[1:])
