"""InfluxQL, the one query language of every generation (no Flux: 3.x has none): quoting identifiers and literals,
binding `$name` parameters, and reading the JSON answer of `/query` into rows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import msgspec

from common.stores.influx.errors import InfluxQueryError

_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def _quoted(text: str, quote: str) -> str:
    """`text` between `quote`s, with a backslash before each backslash and each `quote` inside."""
    return quote + text.replace("\\", "\\\\").replace(quote, "\\" + quote) + quote


def quote_ident(name: str) -> str:
    """An InfluxQL identifier in double quotes (database, retention policy, measurement names)."""
    return _quoted(name, '"')


def influxql_literal(value: object) -> str:
    """An InfluxQL literal: a single-quoted string (backslash before \\ and '), a number, true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, Decimal)):
        return str(value)
    if isinstance(value, str):
        return _quoted(value, "'")
    raise TypeError(f"query parameter value {value!r} is not a string, number or boolean")


def inline_params(influxql: str, params: Mapping[str, object]) -> str:
    """`$name` placeholders replaced by literals of `params` (for 3.x, whose /query binds no parameters).
    A placeholder without a value raises InfluxQueryError; keep `$` out of string literals in the query."""
    def literal(found: re.Match[str]) -> str:
        name = found.group(1)
        if name not in params:
            raise InfluxQueryError(f"query {influxql!r} uses ${name} but params has no {name!r}")
        return influxql_literal(params[name])
    return _PARAM.sub(literal, influxql)


def encode_params(params: Mapping[str, Any]) -> str:
    """The `params` parameter of `/query` (1.x, 2.x): the bound values as JSON data, never as query text."""
    return msgspec.json.encode(params).decode()


class Results(msgspec.Struct):
    """The JSON answer of `/query`: one result per statement (its series, or its error), or a request error."""

    results: list[dict[str, Any]] = []
    error: str = ""


RESULTS = msgspec.json.Decoder(Results)
RESULTS_EXACT = msgspec.json.Decoder(Results, float_hook=Decimal)  # numbers with a fraction as Decimal


def first_error(parsed: Results) -> str:
    """The error of the request or of its first failed statement; "" when every statement succeeded."""
    if parsed.error:
        return parsed.error
    for result in parsed.results:
        if result.get("error"):
            return str(result["error"])
    return ""


def rows_of(parsed: Results) -> list[dict[str, Any]]:
    """Every row of every series and statement as a dict: the series' tags, then its columns."""
    rows: list[dict[str, Any]] = []
    for result in parsed.results:
        for series in result.get("series") or ():
            columns = series.get("columns") or []
            tags = series.get("tags") or {}
            for values in series.get("values") or ():
                row = dict(tags)
                row.update(zip(columns, values, strict=False))
                rows.append(row)
    return rows


def values_of(parsed: Results) -> tuple[list[str], list[list[Any]]]:
    """(columns, value rows) of a one-series answer, its parts (1.x splits a series every 10,000 rows) joined."""
    columns: list[str] = []
    values: list[list[Any]] = []
    for result in parsed.results:
        for series in result.get("series") or ():
            columns = columns or list(series.get("columns") or ())
            values.extend(series.get("values") or ())
    return columns, values
