"""Lago: events in batches to ``POST {url}/api/v1/events/batch``.

Body ``{"events": [...]}``, at most 100 events, ``Authorization: Bearer <api_key>``. Each
event: ``transaction_id`` (the record id), ``external_subscription_id`` (the customer id),
``code`` (the measurement's event type: the billable metric's code), ``timestamp`` (Unix
seconds) and ``properties`` (the record's metadata, and the value under ``value_property``
as a decimal string, which Lago aggregates exactly).

A batch is atomic: 200 takes every event; a 422 ``validation_errors`` answer takes none
and names the events at fault by index in ``error_details`` (``{"3": {"code":
["value_is_mandatory"]}}``). Those are dead-lettered with their errors, except an event whose
``transaction_id`` Lago already has (``value_already_exist``): it is delivered. The others
of the batch are sent again at once, without them. A 422 that names no event (too many
events for a self-hosted Lago's ``LAGO_EVENTS_BATCH_MAX_LENGTH``) halves the batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import httpx

from agent.records import UsageRecord, format_decimal
from agent.settings import LagoBackend
from agent.sinks.base import (REJECTED_BODY, Answer, Delivered, Halve, Outcome, Rejected, RetryLater, SendAgain,
                              classify, json_object)
from agent.sinks.post import EventsSink

DUPLICATE = "value_already_exist"
RESEND = ("Lago refused the batch for other events of it (a batch is atomic): "
          "sent again at once without them")


def _received(answer: Answer) -> str | None:
    return None if answer.status == 200 else f"with {answer.describe()}, where Lago answers 200"


class LagoSink(EventsSink):
    name = "lago"
    dedup_window: timedelta | None = None  # a transaction_id is refused as long as Lago keeps the event

    def __init__(self, cfg: LagoBackend):
        super().__init__(httpx.URL(f"{cfg.url}/api/v1/events/batch"), cfg.api_key, cfg.batch_size, cfg.timeout)
        self._customer_field = cfg.customer_field
        self._value_property = cfg.value_property

    def element(self, record: UsageRecord) -> dict[str, Any]:
        return {
            "transaction_id": record.record_id,
            self._customer_field: record.customer_id,
            "code": record.event_type,
            "timestamp": int(record.timestamp.timestamp()),
            "properties": {**record.metadata, self._value_property: format_decimal(record.value)},
        }

    def classify(self, answer: Answer, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain | Halve]:
        outcome = classify(answer, _received)
        if not isinstance(outcome, Rejected):
            return [outcome] * len(records)
        named = self._by_index(answer, len(records)) if answer.status == 422 else None
        if not named:  # refused as a whole, no event named: halve until the one at fault stands alone
            return [Halve(outcome)] * len(records)
        resend = RetryLater(RESEND, status=422, retry_after=0.0)
        return [_judged(i, named[i]) if i in named else resend for i in range(len(records))]

    @staticmethod
    def _by_index(answer: Answer, count: int) -> dict[int, Any] | None:
        """``error_details`` by event index, if it names only events of this batch."""
        body = json_object(answer)
        details = body.get("error_details") if body else None
        if not isinstance(details, dict) or not details:
            return None
        named = {}
        for key, errors in details.items():
            if not (isinstance(key, str) and key.isdigit() and int(key) < count):
                return None  # {"events": ["too_many_events"]}, or an index past this batch
            named[int(key)] = errors
        return named


def _judged(index: int, errors: Any) -> Outcome:
    """A named event: one Lago already has is delivered, the others are dead-lettered with their errors."""
    if isinstance(errors, dict) and DUPLICATE in (errors.get("transaction_id") or ()):
        return Delivered(422)
    return Rejected(status=422, body=json.dumps({"index": index, "errors": errors}, ensure_ascii=False)[:REJECTED_BODY])
