"""Stripe Billing: one meter event per ``POST {url}/v1/billing/meter_events``, form-encoded.

Body (``application/x-www-form-urlencoded``): ``event_name`` = the measurement's event_type,
``identifier`` = the record id, ``timestamp`` = T in Unix seconds, ``payload[<customer_key>]`` =
the customer id, ``payload[<value_key>]`` = the value as a decimal string; ``Authorization:
Bearer <api_key>`` and a pinned ``Stripe-Version``. Stripe answers 200 with the
``billing.meter_event`` object. It enforces the identifier's uniqueness for at least 24 hours
and answers a repeat ``400 invalid_request_error`` "An event already exists with identifier …"
(with ``Stripe-Should-Retry: false``): that record is delivered. It takes events from the past
35 days up to 5 minutes ahead: a record outside is dead-lettered before it is sent.
``Stripe-Should-Retry: true`` retries whatever the status, ``false`` dead-letters, except for
answers that are not the record's fault (credentials, a wrong URL: pending, alert).
No ``Idempotency-Key`` is sent: a re-sampled tick may carry another value under the same id,
which Stripe would refuse as a reused key, where the identifier answers it as a duplicate.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from urllib.parse import urlencode

import httpx

from agent.records import UsageRecord, format_decimal
from agent.settings import StripeBackend
from agent.errors import excerpt
from agent.sinks.base import (NOT_THE_RECORDS_FAULT, REJECTED_BODY, Answer, Delivered, Outcome, Rejected, RetryLater,
                              SendAgain, classify, json_object, outside_window, parse_retry_after)
from agent.sinks.post import PostSink

STRIPE_VERSION = "2025-04-30.basil"  # the API version the bodies and answers here are written to
EVENTS_PATH = "/v1/billing/meter_events"
DUPLICATE = "An event already exists with identifier"
MAX_AGE, MAX_AHEAD = timedelta(days=35), timedelta(minutes=5)
DEDUP_WINDOW = timedelta(hours=24)  # "uniqueness within a rolling period of at least 24 hours"


def meter_event(answer: Answer) -> str | None:
    """Stripe answers a created meter event with the ``billing.meter_event`` object."""
    payload = json_object(answer)
    if payload is not None and payload.get("object") == "billing.meter_event":
        return None
    return f'with {answer.describe()}, where Stripe answers the "billing.meter_event" object'


def error_message(answer: Answer) -> str:
    """The ``error.message`` of a Stripe error answer, or "" when it has none."""
    payload = json_object(answer)
    error = payload.get("error") if payload is not None else None
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else ""


class StripeSink(PostSink):
    """One meter event per request, ``max_in_flight`` at once over the agent's one client."""

    name = "stripe"
    max_batch = 1
    array_body = False
    dedup_window = DEDUP_WINDOW

    def __init__(self, cfg: StripeBackend):
        super().__init__(httpx.URL(f"{cfg.url}{EVENTS_PATH}"),
                         {"Authorization": f"Bearer {cfg.api_key.get_secret_value()}",
                          "Content-Type": "application/x-www-form-urlencoded", "Stripe-Version": STRIPE_VERSION},
                         cfg.timeout)
        self.max_in_flight = cfg.max_in_flight
        self._customer = f"payload[{cfg.customer_key}]"
        self._value = f"payload[{cfg.value_key}]"

    def refuse(self, record: UsageRecord, now: datetime) -> str | None:
        return outside_window(record, now, MAX_AGE, MAX_AHEAD, "Stripe")

    def element(self, record: UsageRecord) -> dict[str, str]:
        """The form fields, in the order they are sent (the audit copy keeps them as JSON)."""
        return {
            "event_name": record.event_type,
            "identifier": record.record_id,
            "timestamp": str(int(record.timestamp.timestamp())),
            self._customer: record.customer_id,
            self._value: format_decimal(record.value),
        }

    def body(self, elements: Sequence[bytes]) -> bytes:
        (element,) = elements
        return urlencode(json.loads(element)).encode()

    def classify(self, answer: Answer, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain]:
        return [self._outcome(answer)] * len(records)

    def _outcome(self, answer: Answer) -> Outcome:
        status = answer.status
        if status == 400 and error_message(answer).startswith(DUPLICATE):
            return Delivered(status)  # Stripe holds this identifier already: the record was delivered before
        if status < 400 or status in NOT_THE_RECORDS_FAULT:
            return classify(answer, meter_event)
        should_retry = answer.headers.get("Stripe-Should-Retry", "").strip().lower()
        if should_retry == "true":
            message = error_message(answer)
            return RetryLater(f"Stripe answered {status} with Stripe-Should-Retry: true"
                              + (f": {excerpt(message)}" if message else ""), status=status,
                              retry_after=parse_retry_after(answer.headers.get("Retry-After")))
        if should_retry == "false":
            return Rejected(status=status, body=answer.text[:REJECTED_BODY])
        return classify(answer)
