"""The engine's search language, the small part of it the simulator understands.

The REST API passes the ``search`` query parameter to the engine's search backend (the same
language as the search bar of the Administration Portal, without the ``Vms:`` prefix). What is
understood here: ``field=value`` and ``field!=value`` conditions joined by ``and`` / ``or``
(``and`` binds tighter; a space between two conditions means ``and``), values quoted with ``"``
or bare, ``*`` as wildcard anywhere in the value; then ``sortby FIELD [asc|desc]`` and
``page N`` (SyntaxChecker's SORTBY, SORT_DIRECTION and PAGE states, in that order, keywords in
any case). String comparisons ignore case unless the request says ``case_sensitive=true``:
AbstractBackendCollectionResource.getSearchParameters reads the parameter with a default of
``false`` (the engine's ``ILIKE``).

Results are always sorted: by the ``sortby`` field, then by name (SyntaxChecker.generateQueryFromSyntaxContainer
adds the object's default sort, ``vm_name ASC`` for VMs, as a secondary order); ``desc`` puts
missing values last. A page is ``max`` results long (getPagePhrase: rows (N-1)*max+1 to N*max),
so without ``max`` there is only page 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: One condition: ``field``, operator, value (quoted or bare).
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<connector>(?i:and|or))(?=\s|$)
      | (?P<field>[A-Za-z_][A-Za-z0-9_.]*)\s*(?P<op>!=|=)\s*(?:"(?P<quoted>[^"]*)"|(?P<bare>[^\s"]*))
    )""",
    re.VERBOSE,
)


class SearchSyntaxError(ValueError):
    """The query is not understood (unknown field, dangling connector, garbage)."""


@dataclass(frozen=True)
class Condition:
    """``field op value``, with ``*`` wildcards in ``value``."""

    field: str
    negate: bool
    value: str

    def matches(self, actual: str | None, case_sensitive: bool) -> bool:
        pattern = "".join(".*" if ch == "*" else re.escape(ch) for ch in self.value)
        flags = 0 if case_sensitive else re.IGNORECASE
        hit = actual is not None and re.fullmatch(pattern, actual, flags) is not None
        return hit != self.negate


#: A parsed query: a disjunction of conjunctions.
Query = list[list[Condition]]

#: The trailing ``sortby FIELD [asc|desc]`` and ``page N`` parts.
_TAIL = re.compile(
    r"""(?ix)(?:^|\s+)
        (?:sortby\s+(?P<sort>[A-Za-z_][A-Za-z0-9_.]*)(?:\s+(?P<direction>asc|desc))?)?
        \s*(?:page\s+(?P<page>\S+))?\s*$""",
)


@dataclass(frozen=True)
class Search:
    """A whole search: the conditions, the order and the page."""

    query: Query
    sort: str | None = None
    descending: bool = False
    page: int = 1


def parse_search(text: str, fields: set[str]) -> Search:
    """Parse ``text`` with its ``sortby`` and ``page`` parts."""
    text = text.strip()
    tail = _TAIL.search(text)
    sort, descending, page = None, False, 1
    if tail is not None and tail.group(0).strip():
        if tail.group("sort") is not None:
            sort = tail.group("sort").lower()
            if sort not in fields:
                raise SearchSyntaxError(f"invalid sort field {tail.group('sort')!r}")
            descending = (tail.group("direction") or "").lower() == "desc"
        if tail.group("page") is not None:
            if not tail.group("page").isdigit() or int(tail.group("page")) < 1:
                raise SearchSyntaxError(f"invalid page number {tail.group('page')!r}")
            page = int(tail.group("page"))
        text = text[: tail.start()]
    return Search(parse(text, fields), sort, descending, page)


def parse(text: str, fields: set[str]) -> Query:
    """Parse the conditions in ``text``; ``fields`` are the (lower-case) field names the object type has."""
    groups: Query = [[]]
    position = 0
    expect_condition = True
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise SearchSyntaxError(f"cannot parse {text[position:]!r}")
        position = match.end()
        if match.group("connector"):
            if expect_condition:
                raise SearchSyntaxError(f"{match.group('connector')!r} without a condition before it")
            if match.group("connector").lower() == "or":
                groups.append([])
            expect_condition = True
            continue
        field = match.group("field").lower()
        if field not in fields:
            raise SearchSyntaxError(f"unknown search field {match.group('field')!r}")
        value = match.group("quoted") if match.group("quoted") is not None else match.group("bare") or ""
        groups[-1].append(Condition(field, match.group("op") == "!=", value))
        expect_condition = False
    if expect_condition and position > 0:
        raise SearchSyntaxError("the query ends with a connector")
    return [group for group in groups if group]


def select(
    items: list[Any],
    query: Query,
    getters: Mapping[str, Callable[[Any], str | None]],
    *,
    case_sensitive: bool,
) -> list[Any]:
    """The items matching the query (all of them for an empty query)."""
    if not query:
        return list(items)
    return [
        item
        for item in items
        if any(all(c.matches(getters[c.field](item), case_sensitive) for c in group) for group in query)
    ]


def order_and_page(
    items: list[Any],
    search: Search,
    getters: Mapping[str, Callable[[Any], str | None]],
    max_count: int | None,
) -> list[Any]:
    """The matching items in the engine's order, and the requested page of ``max_count`` of them."""

    def text_key(value: str | None) -> tuple[str, str]:
        # PostgreSQL's collation orders letters before case: "b" between "A" and "C"
        return (value.casefold(), value) if value is not None else ("", "")

    ordered = sorted(items, key=lambda item: text_key(getters["name"](item)))
    if search.sort is not None:
        present = [item for item in ordered if getters[search.sort](item) is not None]
        missing = [item for item in ordered if getters[search.sort](item) is None]
        present.sort(key=lambda item: text_key(getters[search.sort](item)), reverse=search.descending)
        # ASC NULLS FIRST, DESC NULLS LAST
        ordered = present + missing if search.descending else missing + present
    if max_count is None:
        return ordered if search.page == 1 else []
    start = (search.page - 1) * max_count
    return ordered[start:start + max_count]
