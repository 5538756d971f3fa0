"""Orb: events in batches to ``POST {url}/v1/ingest?debug=true``.

Body ``{"events": [...]}``, at most 500 events, ``Authorization: Bearer <api_key>``. Each
event: ``idempotency_key`` (the record id), ``event_name`` (the measurement's event type),
``external_customer_id`` or ``customer_id`` (the customer), ``timestamp`` (ISO 8601, UTC)
and ``properties`` (the record's metadata, and ``value`` as a JSON number, which Orb needs to
aggregate it: exact for up to 15 significant digits; a value a double cannot hold is
dead-lettered rather than rounded).

Orb ingests an idempotency key at most once: a re-sent key is answered 200 and listed in
``debug.duplicate``; delivered. A 4xx lists the events that failed validation in
``validation_failed`` (a timestamp older than the account's grace period or more than five
minutes ahead, an unknown ``customer_id``): those are dead-lettered with their messages. The
others of that request are delivered when ``debug`` lists them as ingested or duplicate,
and otherwise sent again at once (a key already taken comes back as a duplicate). A refusal
that names no event is halved until the event at fault stands alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx

from agent.records import UsageRecord, format_timestamp
from agent.settings import OrbBackend
from agent.sinks.base import (REJECTED_BODY, Answer, Delivered, Halve, Outcome, Rejected, RetryLater, SendAgain,
                              classify, json_object)
from agent.sinks.post import EventsSink

EXACT_INT = 2**53  # integers a double holds exactly
RESEND = ("Orb refused other events of the request and did not confirm this one: "
          "sent again at once (a key it has comes back as a duplicate)")


def json_number(value: Decimal) -> int | float:
    """``value`` as the JSON number Orb reads into a double, only if that number is exactly ``value``."""
    if value == value.to_integral_value() and abs(value) <= EXACT_INT:
        return int(value)
    number = float(value)
    if Decimal(repr(number)) != value:
        raise ValueError(f"{value} has more significant digits than a JSON number Orb reads can hold exactly")
    return number


def _ingested(answer: Answer) -> str | None:
    return None if answer.status == 200 else f"with {answer.describe()}, where Orb answers 200"


class OrbSink(EventsSink):
    name = "orb"
    dedup_window: timedelta | None = None  # a key is ingested at most once; past the grace period Orb refuses the event

    def __init__(self, cfg: OrbBackend):
        super().__init__(httpx.URL(f"{cfg.url}/v1/ingest", params={"debug": "true"}), cfg.api_key, cfg.batch_size,
                         cfg.timeout)
        self._customer_field = cfg.customer_field

    def element(self, record: UsageRecord) -> dict[str, Any]:
        return {
            "idempotency_key": record.record_id,
            "event_name": record.event_type,
            self._customer_field: record.customer_id,
            "timestamp": format_timestamp(record.timestamp),
            "properties": {**record.metadata, "value": json_number(record.value)},
        }

    def classify(self, answer: Answer, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain | Halve]:
        outcome = classify(answer, _ingested)
        if isinstance(outcome, RetryLater):
            return [outcome] * len(records)
        body = json_object(answer)
        failed = _failed(body, records, answer.status)
        if isinstance(outcome, Delivered):  # a 200 takes every event it does not list as failed
            return [failed.get(r.record_id, outcome) for r in records] if failed else [outcome] * len(records)
        if not failed:  # refused as a whole, no event named: halve until the one at fault stands alone
            return [Halve(outcome)] * len(records)
        debug = body.get("debug") if body else None
        confirmed = set()
        if isinstance(debug, dict):
            confirmed = {key for name in ("ingested", "duplicate") for key in debug.get(name) or () if isinstance(key, str)}
        resend = RetryLater(RESEND, status=answer.status, retry_after=0.0)
        return [failed.get(r.record_id) or (Delivered(answer.status) if r.record_id in confirmed else resend)
                for r in records]


def _failed(body: Any, records: Sequence[UsageRecord], status: int) -> dict[str, Outcome]:
    """The events ``validation_failed`` names, dead-lettered with their messages; {} if it names
    none of this request's (or an event the request did not carry)."""
    entries = body.get("validation_failed") if body else None
    if not isinstance(entries, list):
        return {}
    ids = {r.record_id for r in records}
    failed: dict[str, Outcome] = {}
    for entry in entries:
        key = entry.get("idempotency_key") if isinstance(entry, dict) else None
        if key not in ids:
            return {}
        errors = entry.get("validation_errors")
        reason = "; ".join(map(str, errors)) if isinstance(errors, list) else str(errors)
        failed[key] = Rejected(status=status, body=f"Orb: {reason}"[:REJECTED_BODY])
    return failed
