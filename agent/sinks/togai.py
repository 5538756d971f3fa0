"""Togai: events in batches to ``POST {url}/ingestBatch`` (Togai's Event Ingestion API).

Body ``{"events": [...]}``, 1 to 500 events, ``Authorization: Bearer <token>``. Each event:
``schemaName`` (the measurement's event type, 1-50 characters), ``id`` (the record id),
``timestamp`` (ISO 8601, UTC), ``accountId`` (the customer), one attribute ``{name, value,
unit}`` and the record's metadata as ``dimensions`` (empty values left out, each value cut to
Togai's 200 characters).

Answers: 202 accepted every event. 207 is a partial failure naming each event not accepted
(``errors: [{message, eventPayload}]``): those are dead-lettered with their message, or
retried when the message speaks of a passing condition; an event refused as a duplicate of
an id already ingested counts as delivered. Togai takes an event id once within 45 days and
answers a re-sent id 202 (the copy is marked INGESTION_FAILED_DUPLICATE_EVENT and not
metered), so a re-send is harmless. 400/422 (payload too large, invalid) refuse the batch
as a whole: it is halved until the event at fault stands alone. 429 and 503 are retried.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import httpx

from agent.records import UsageRecord, format_decimal, format_timestamp
from agent.settings import TogaiBackend
from agent.sinks.base import (REJECTED_BODY, Answer, Delivered, Halve, Outcome, Rejected, RetryLater, SendAgain,
                              classify, json_object)
from agent.sinks.post import EventsSink

SCHEMA_NAME_MAX = 50
ACCOUNT_ID_MAX = 512
UNIT_MAX = 50
DIMENSION_MAX = 200
# Togai's words for an id it already has, and for a condition that passes (the event itself is fine)
_DUPLICATE = re.compile(r"duplicate|already (been )?(ingested|exists?|processed|used)", re.IGNORECASE)
_PASSING = re.compile(r"throttl|rate.?limit|too many requests|unavailable|timed? ?out|try again|temporar|internal error",
                      re.IGNORECASE)


def _accepted(answer: Answer) -> str | None:
    return None if answer.status == 202 else f"with {answer.describe()}, where Togai answers 202 or 207"


def not_accepted(error: dict[str, Any]) -> Outcome:
    """One entry of a 207's ``errors``: a duplicate is delivered, a passing condition retried, the rest dead."""
    message = str(error.get("message") or "")
    if _DUPLICATE.search(message):
        return Delivered(207)
    if _PASSING.search(message):
        return RetryLater(f"Togai did not accept the event for now: {message[:300]}", status=207)
    entry = json.dumps(error, ensure_ascii=False)
    return Rejected(status=207, body=entry[:REJECTED_BODY])


class TogaiSink(EventsSink):
    name = "togai"
    dedup_window: timedelta | None = timedelta(days=45)  # an id is taken once within 45 days

    def __init__(self, cfg: TogaiBackend):
        super().__init__(httpx.URL(f"{cfg.url}/ingestBatch"), cfg.token, cfg.batch_size, cfg.timeout)
        self._attribute = cfg.attribute

    def element(self, record: UsageRecord) -> dict[str, Any]:
        if not 1 <= len(record.event_type) <= SCHEMA_NAME_MAX:
            raise ValueError(f"Togai takes a schemaName of 1 to {SCHEMA_NAME_MAX} characters; the event type "
                             f"{record.event_type[:80]!r} has {len(record.event_type)} (set the measurement's event_type)")
        if not record.customer_id or len(record.customer_id) > ACCOUNT_ID_MAX:
            raise ValueError(f"Togai takes an accountId of 1 to {ACCOUNT_ID_MAX} characters, got {len(record.customer_id)}")
        attribute = {"name": self._attribute, "value": format_decimal(record.value)}
        if record.unit:
            attribute["unit"] = record.unit[:UNIT_MAX]
        return {
            "schemaName": record.event_type,
            "id": record.record_id,
            "timestamp": format_timestamp(record.timestamp),
            "accountId": record.customer_id,
            "attributes": [attribute],
            # labels: a customer's long list of regions or accounts is cut rather than the record refused
            "dimensions": {key: value[:DIMENSION_MAX] for key, value in record.metadata.items() if value},
        }

    def classify(self, answer: Answer, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain | Halve]:
        if answer.status == 207:
            return self._partial(answer, records)
        outcome = classify(answer, _accepted)
        if isinstance(outcome, Rejected):  # the batch as a whole (too large, invalid): find the event at fault
            return [Halve(outcome)] * len(records)
        return [outcome] * len(records)

    def _partial(self, answer: Answer, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain | Halve]:
        body = json_object(answer)
        errors = body.get("errors") if body else None
        unread = Halve(Rejected(207, f"Togai answered 207 without naming the events it did not accept: "
                                     f"{answer.describe()}"[:REJECTED_BODY]))
        if not isinstance(errors, list):
            return [unread] * len(records)  # smaller batches give smaller answers, down to one event
        where = {record.record_id: i for i, record in enumerate(records)}
        outcomes: list[Outcome | SendAgain | Halve] = [Delivered(207)] * len(records)
        for error in errors:
            event = error.get("eventPayload") if isinstance(error, dict) else None
            event_id = event.get("id") if isinstance(event, dict) else None
            if not isinstance(event_id, str) or event_id not in where:
                return [unread] * len(records)  # an error no event of this batch can be held to
            outcomes[where[event_id]] = not_accepted(error)
        return outcomes
