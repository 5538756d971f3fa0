"""What crosses the spool's boundary: a row's body read back as a record, leases, delivery
outcomes, tick commits and the facts the spool reports about itself."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from agent.records import UsageRecord, format_decimal

_ENCODE = msgspec.json.Encoder().encode  # reused: built once, as msgspec advises
_DECODE = msgspec.json.Decoder().decode
_STDLIB_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
_PLAIN = re.compile(r"-?[0-9]{1,60}(?:\.[0-9]{1,60})?")  # as format_decimal writes it: finite, and it renders


def dump_json(data: dict[str, Any]) -> str:
    """A record's body as compact JSON. msgspec writes it about seven times faster than the json
    module; what msgspec refuses (a lone surrogate from a peer's ``\\ud800``) json escapes."""
    try:
        return _ENCODE(data).decode("utf-8")
    except (msgspec.EncodeError, TypeError, ValueError):  # also unsupported types, UnicodeEncodeError
        return _STDLIB_ENCODE(data)


def load_json(body: bytes | str) -> Any:
    """JSON as the json module reads it: msgspec first (four times faster), json where msgspec refuses
    what json accepts (an escaped lone surrogate, NaN)."""
    try:
        return _DECODE(body)
    except ValueError:  # msgspec.DecodeError, UnicodeEncodeError
        return json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)


def parse_body(record_id: str, body: bytes | str) -> UsageRecord:
    """A spooled body back into a record that can be sent; ValueError if it is not (or no longer) one.

    The value must render too: a row whose value parses but cannot be written as a plain decimal
    (``1e99999999950``) would otherwise fail every send of every batch it is leased in.
    """
    try:
        data = load_json(body)
        record = UsageRecord.from_json(data)
    except (UnicodeDecodeError, KeyError, TypeError, ValueError, ArithmeticError, RecursionError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    value = data["value"]
    if not (isinstance(value, str) and _PLAIN.fullmatch(value)):  # the usual body skips the checks below
        if not record.value.is_finite():
            raise ValueError(f"value {record.value} is not a finite number")
        try:
            format_decimal(record.value)
        except ArithmeticError as exc:
            raise ValueError(f"value {str(record.value)[:40]} cannot be rendered as a plain decimal "
                             f"({type(exc).__name__})") from None
    if record.record_id != record_id:
        raise ValueError(f"body holds id {record.record_id!r}, row is {record_id!r}")
    return record


@dataclass(frozen=True, slots=True)
class Leased:
    record: UsageRecord
    attempts: int  # sends already tried before this lease


class Lease(list[Leased]):
    """What one ``lease_batch`` took: the records to send, oldest first; and ``damaged``, the rows
    it dead-lettered instead because they are not (or no longer) records."""

    def __init__(self, leased: Iterable[Leased] = (), damaged: Iterable[Dead] = ()):
        super().__init__(leased)
        self.damaged: tuple[Dead, ...] = tuple(damaged)


@dataclass(frozen=True, slots=True)
class TickCommit:
    inserted: int  # new ids; ids already spooled (a re-run tick) are ignored
    previous_tick: str | None  # the measurement's last committed tick before this one


@dataclass(frozen=True, slots=True)
class Retry:
    record_id: str
    not_before: float
    status: int | None
    error: str


@dataclass(frozen=True, slots=True)
class Dead:
    record_id: str
    status: int | None
    error: str


@dataclass(frozen=True, slots=True)
class SpoolFacts:
    """What the spool knows of itself now, for whoever decides readiness and exports gauges."""

    path: Path
    max_records: int
    full: bool  # a tick was refused (cap or disk) and nothing since says there is room again
    write_error: str | None  # the last write that changed something failed with this; None once one succeeds
    unsent: int  # pending + leased
    oldest_unsent_age: float | None  # seconds; None when nothing is unsent
    disk_low: bool  # the last tick was refused for disk space
    held_outcomes: int  # delivery outcomes a failed write left in memory


def readable_body(raw: bytes) -> Any:
    """The stored body for people to read: JSON when it parses, else the text as far as it decodes."""
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text
