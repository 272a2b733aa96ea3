"""The engine's search language, the small part of it the simulator understands.

The REST API passes the ``search`` query parameter to the engine's search backend (the same
language as the search bar of the Administration Portal, without the ``Vms:`` prefix). What is
understood here: ``field=value`` and ``field!=value`` conditions joined by ``and`` / ``or``
(``and`` binds tighter; a space between two conditions means ``and``), values quoted with ``"``
or bare, ``*`` as wildcard anywhere in the value. As in the engine, string comparisons are
``LIKE``; they ignore case only with ``case_sensitive=false`` (the API's documented default is
``true``).
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


def parse(text: str, fields: set[str]) -> Query:
    """Parse ``text``; ``fields`` are the (lower-case) field names the object type has."""
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
