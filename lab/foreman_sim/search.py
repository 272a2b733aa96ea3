"""A small scoped_search: the query language of Foreman's ``search=`` parameter.

Supported: ``field = value``, ``field != value``, ``field ~ value`` (case-insensitive substring,
``*`` as wildcard), ``field !~ value``, ``field ^ (a, b)`` (in), ``==`` and ``<>`` (for ``=``
and ``!=``), ``<``/``>``/``<=``/``>=`` on integer fields, bare words (matched like ``~`` against
the resource's default field), values in double quotes (a backslash escapes the next character;
single quotes are plain characters), ``and``/``&``/``&&``, ``or``/``|``/``||``,
``not``/``!``/``-`` and parentheses. As in scoped_search, ``and`` binds tighter than ``or`` and
adjacent terms are joined by ``and``; as its Tokenizer reads them, a bare word runs to a space,
``=``, ``~``, ``<``, ``>``, ``&``, ``|``, a parenthesis or a comma, so a ``!`` or ``^`` inside
one is part of it (``name!=x`` names a field ``name!``).

Anything else raises :class:`QueryNotSupported`, which the server turns into the 400 that
Foreman gives for ``ScopedSearch::QueryNotSupported``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: A record accessor: field name -> value(s) of one record for that field.
Getter = Callable[[Any], Any]


class QueryNotSupported(Exception):
    """The query cannot be parsed or names a field the resource does not know."""


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<quoted>"(?:[^"\\]|\\.)*(?:"|\Z))
      | (?P<op>!=|!~|!\^|==|<>|<=|>=|=|~|\^|<|>)
      | (?P<logic>&&|\|\||&|\|)
      | (?P<paren>[(),])
      | (?P<bang>[!-])
      | (?P<word>[^\s()=!~^<>&|,"-][^\s()=~<>&|,]*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def _tokenise(query: str) -> list[_Tok]:
    tokens: list[_Tok] = []
    pos = 0
    query = query.strip()
    while pos < len(query):
        match = _TOKEN.match(query, pos)
        if not match or match.end() == pos:
            raise QueryNotSupported(f"Unexpected character in query at position {pos}: {query[pos:]!r}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None
        text = match.group(kind)
        if kind == "quoted":
            # ScopedSearch::QueryLanguage::Tokenizer#tokenize_quoted_keyword: only double quotes
            # quote, a backslash takes the next character as it is (a quote, a backslash), and
            # a value left open runs to the end of the query
            body = text[1:-1] if len(text) > 1 and text.endswith('"') and not _escaped_end(text) else text[1:]
            text = re.sub(r"\\(.)", r"\1", body, flags=re.DOTALL)
            kind = "value"
        elif kind == "word" and text.lower() in {"and", "or", "not"}:
            kind = {"and": "logic", "or": "logic", "not": "bang"}[text.lower()]
            text = {"and": "&", "or": "|", "not": "!"}[text.lower()]
        elif kind == "logic":
            text = text[0]
        elif kind == "bang":
            text = "!"
        elif kind == "op":
            # Tokenizer::OPERATORS: == is eq and <> is ne
            text = {"==": "=", "<>": "!="}.get(text, text)
        tokens.append(_Tok(kind, text))
    return tokens


def _escaped_end(text: str) -> bool:
    """Whether the closing quote of a quoted value is itself escaped (an odd run of backslashes)."""
    run = len(text) - 1 - len(text[:-1].rstrip("\\"))
    return run % 2 == 1


Predicate = Callable[[Any], bool]


class _Parser:
    def __init__(self, tokens: list[_Tok], fields: dict[str, tuple[str, Getter]], default: str) -> None:
        self.tokens = tokens
        self.pos = 0
        self.fields = fields
        self.default = default

    def peek(self) -> _Tok | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise QueryNotSupported("Unexpected end of query")
        self.pos += 1
        return tok

    def parse(self) -> Predicate:
        if not self.tokens:
            return lambda record: True
        pred = self.parse_or()
        if self.peek() is not None:
            raise QueryNotSupported(f"Unexpected token '{self.peek().text}'")  # type: ignore[union-attr]
        return pred

    def parse_or(self) -> Predicate:
        terms = [self.parse_and()]
        while (tok := self.peek()) is not None and tok.kind == "logic" and tok.text == "|":
            self.take()
            terms.append(self.parse_and())
        return terms[0] if len(terms) == 1 else (lambda record: any(t(record) for t in terms))

    def parse_and(self) -> Predicate:
        terms = [self.parse_not()]
        while (tok := self.peek()) is not None and not (tok.kind == "paren" and tok.text in "),"):
            if tok.kind == "logic" and tok.text == "|":
                break
            if tok.kind == "logic":
                self.take()
            terms.append(self.parse_not())
        return terms[0] if len(terms) == 1 else (lambda record: all(t(record) for t in terms))

    def parse_not(self) -> Predicate:
        tok = self.peek()
        if tok is not None and tok.kind == "bang":
            self.take()
            inner = self.parse_not()
            return lambda record: not inner(record)
        return self.parse_term()

    def parse_term(self) -> Predicate:
        tok = self.take()
        if tok.kind == "paren" and tok.text == "(":
            inner = self.parse_or()
            closing = self.take()
            if closing.text != ")":
                raise QueryNotSupported("Expecting ')'")
            return inner
        if tok.kind not in {"word", "value"}:
            raise QueryNotSupported(f"Unexpected token '{tok.text}'")
        nxt = self.peek()
        if tok.kind == "word" and nxt is not None and nxt.kind == "op":
            op = self.take().text
            return self.comparison(tok.text, op)
        # a bare word: free-text search in the default field
        return self.comparison(self.default, "~", tok.text)

    def value(self) -> str:
        tok = self.peek()
        if tok is None or tok.kind not in {"word", "value"}:
            raise QueryNotSupported("Value not found")
        return self.take().text

    def comparison(self, field: str, op: str, value: str | None = None) -> Predicate:
        if field not in self.fields:
            raise QueryNotSupported(f"Field '{field}' not recognized for searching!")
        kind, getter = self.fields[field]
        if op in {"^", "!^"}:
            if self.take().text != "(":
                raise QueryNotSupported("Expecting '(' after IN operator")
            values = [self.value()]
            while self.peek() is not None and self.peek().text == ",":  # type: ignore[union-attr]
                self.take()
                values.append(self.value())
            if self.take().text != ")":
                raise QueryNotSupported("Expecting ')'")
            tests = [_compare(kind, field, "=", v) for v in values]
            inside: Predicate = lambda record: any(_matches(getter(record), t) for t in tests)  # noqa: E731
            return inside if op == "^" else (lambda record: not inside(record))
        if value is None:
            value = self.value()
        test = _compare(kind, field, op, value)
        if op in {"!=", "!~"}:
            positive = _compare(kind, field, op[1:] if op == "!~" else "=", value)
            return lambda record: not _matches(getter(record), positive)
        return lambda record: _matches(getter(record), test)


def _matches(values: Any, test: Callable[[Any], bool]) -> bool:
    if isinstance(values, (list, tuple, set)):
        return any(test(v) for v in values)
    return test(values)


def _compare(kind: str, field: str, op: str, value: str) -> Callable[[Any], bool]:
    if kind == "integer":
        try:
            number = int(value)
        except ValueError:
            raise QueryNotSupported(f"Value '{value}' is not valid for field '{field}'") from None
        ops: dict[str, Callable[[int, int], bool]] = {
            "=": lambda a, b: a == b, "<": lambda a, b: a < b, ">": lambda a, b: a > b,
            "<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b,
        }
        if op not in ops:
            raise QueryNotSupported(f"Operator '{op}' is not supported for field '{field}'")
        return lambda actual: actual is not None and ops[op](int(actual), number)
    if kind == "boolean":
        if value.lower() not in {"true", "false", "1", "0"}:
            raise QueryNotSupported(f"Value '{value}' is not valid for field '{field}'")
        wanted = value.lower() in {"true", "1"}
        if op != "=":
            raise QueryNotSupported(f"Operator '{op}' is not supported for field '{field}'")
        return lambda actual: bool(actual) == wanted
    if op in {"<", ">", "<=", ">="}:
        raise QueryNotSupported(f"Operator '{op}' is not supported for field '{field}'")
    if op == "~":
        pattern = re.compile(".*".join(re.escape(part) for part in value.split("*")), re.IGNORECASE)
        return lambda actual: actual is not None and pattern.search(str(actual)) is not None
    return lambda actual: actual is not None and str(actual) == value


def compile_query(query: str | None, fields: dict[str, tuple[str, Getter]], default: str) -> Predicate:
    """Compile ``query`` into a predicate over records.

    :param fields: search field -> (type: ``string``/``text``/``integer``/``boolean``, accessor).
    :param default: the field a bare word searches.
    :raises QueryNotSupported: the query is not understood.
    """
    return _Parser(_tokenise(query or ""), fields, default).parse()


def select(records: Iterable[Any], query: str | None, fields: dict[str, tuple[str, Getter]], default: str) -> list[Any]:
    """The records that match ``query``."""
    predicate = compile_query(query, fields, default)
    return [record for record in records if predicate(record)]
