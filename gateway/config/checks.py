"""The checks a config value passes: each turns the YAML value into the config's value, or
raises ValueError saying why not (the reader prefixes `file:line: key:`), and names the type
the README's config reference gives it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

NANOUSD_PER_USD = 10**9
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def show_value(value: Any) -> str:
    """A default as the config reference writes it: `true`, `30` (not 30.0), `[]`, `UTC`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple | list | frozenset):
        return "[" + ", ".join(show_value(item) for item in value) + "]"
    if isinstance(value, ZoneInfo):
        return value.key
    return str(value)


@dataclass(frozen=True, slots=True)
class Check:
    """One kind of value: `parse` checks and converts it, `kind` names it in the reference."""

    kind: str
    parse: Callable[[Any], Any]
    show: Callable[[Any], str] = show_value
    raw: bool = False  # parse gets the YAML node itself: its reader resolves it later

    def __call__(self, value: Any) -> Any:
        return self.parse(value)


# ---------------------------------------------------------------- numbers and sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_size(value: Any) -> int:
    """`500MB` (10^6), `2GiB` (2^30) or plain bytes → bytes."""
    if isinstance(value, bool):
        raise ValueError("must be a size such as 500MB, 2GiB or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a size (use e.g. 500MB, 2GiB or bytes)")
    number, unit = Decimal(match.group(1)), (match.group(2) or "b").lower()
    size = number * _SIZE_UNITS[unit]
    if size != size.to_integral_value():
        raise ValueError(f"'{value}' is not a whole number of bytes")
    return int(size)


def _show_size(size: int) -> str:
    for unit in ("TB", "GB", "MB", "KB"):
        if size and size % _SIZE_UNITS[unit.lower()] == 0:
            return f"{size // _SIZE_UNITS[unit.lower()]}{unit}"
    return str(size)


def usd_to_nanousd(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("must be a number of USD")
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"'{value}' is not a number of USD") from exc
    if amount < 0:
        raise ValueError("must not be negative")
    nano = amount * NANOUSD_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError(f"'{value}' has more than 9 decimals")
    return int(nano)


def integer(minimum: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return Check("int", check)


def number(*, positive: bool) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number")
        if value < 0 or (positive and value == 0):
            raise ValueError("must be > 0" if positive else "must not be negative")
        return float(value)

    return Check("number", check)


size = Check("size", parse_size, show=_show_size)
usd = Check("number", usd_to_nanousd)  # a number of USD, kept as integer nano-USD


# ---------------------------------------------------------------- words and choices


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def choice(*options: str) -> Check:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"must be one of: {', '.join(options)}")
        return str(value)

    return Check(" \\| ".join(f"`{option}`" for option in options), check)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("must be a list of strings")
    return value


string = Check("string", _string)
file_path = Check("path", lambda value: Path(_string(value)))
boolean = Check("bool", _boolean)
string_list = Check("list", _string_list)
string_set = Check("list", lambda value: frozenset(_string_list(value)))
as_written = Check("value", lambda node: node, raw=True)  # its reader resolves the node


# ---------------------------------------------------------------- names, places and times

_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+\*?$")
_NEVER_FORWARDED = ("authorization", "proxy-authorization", "api-key", "x-api-key", "cookie")


def _header_names(value: Any) -> tuple[str, ...]:
    names = []
    for name in _string_list(value):
        lowered = name.lower()
        if not _HEADER_NAME.match(name):
            raise ValueError(f"'{name}' is not a header name (letters, digits, '-'; '*' last)")
        if lowered.rstrip("*") in _NEVER_FORWARDED or lowered == "*":
            raise ValueError(f"'{name}' may hold a credential and is never forwarded")
        names.append(lowered)
    return tuple(names)


def _url(value: Any) -> str:
    text = _string(value)
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError(f"'{text}' is not an http(s) URL")
    return text.rstrip("/")


def _redis_url(value: Any) -> str:
    text = _string(value)
    # Not echoed: the URL may hold a password.
    if not re.match(r"^rediss?://[^/\s]+(/\d+)?/?$", text):
        raise ValueError("must be a redis://[[user]:password@]host[:port][/db] or rediss:// URL")
    return text


def _date(value: Any) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise ValueError(f"'{value}' is not a date (YYYY-MM-DD)") from exc


def _timezone(value: Any) -> ZoneInfo:
    try:
        return ZoneInfo(_string(value))
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"'{value}' is not a known time zone") from exc


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _sha256(value: Any) -> bytes:
    text = _string(value).lower()
    if not _SHA256_RE.match(text):
        raise ValueError("must be the 64-character hex sha256 of the key")
    return bytes.fromhex(text)


header_names = Check("list", _header_names)
url = Check("URL", _url)
redis_url = Check("URL", _redis_url)
calendar_date = Check("date", _date)
timezone = Check("zone", _timezone)
sha256_hex = Check("hex", _sha256)


@dataclass(frozen=True, slots=True)
class EndpointRule:
    """One entry of a team's `endpoints` allow-list: a path prefix, optionally one method."""

    path: str
    method: str | None = None  # None: every method

    def allows(self, method: str, path: str) -> bool:
        if self.method is not None and method != self.method:
            return False
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")


def _endpoints(value: Any) -> tuple[EndpointRule, ...]:
    rules = []
    for entry in _string_list(value):
        method, _, path = entry.strip().rpartition(" ")
        method = method.strip()
        if method and method not in HTTP_METHODS:
            raise ValueError(f"'{entry}': '{method}' is not an HTTP method (GET, POST, ...)")
        if not path.startswith("/v1/"):
            raise ValueError(f"'{entry}': the path must start with /v1/")
        rules.append(EndpointRule(path=path, method=method or None))
    return tuple(rules)


endpoints = Check("list", _endpoints)
