"""A Lago-contract HTTP server on 127.0.0.1 for the tests.

``POST /api/v1/events/batch`` as Lago's API (lago-api ``Events::CreateBatchService``, the
OpenAPI ``EventBatchInput``) has it: ``Authorization: Bearer <api_key>``; 1 to 100 events
(else 422 ``{"events": ["no_events"|"too_many_events"]}``); each event needs
``transaction_id``, ``external_subscription_id`` and ``code`` (strings), a ``timestamp`` in
Unix seconds (integer or decimal string) and ``properties`` whose values are strings or
numbers. Fields Lago does not permit (``external_customer_id`` since v1.7.0) are dropped,
as Rails' strong parameters do. The batch is atomic: any bad event, or a ``transaction_id``
already stored (``value_already_exist``), refuses all of it with 422 ``validation_errors``
naming the events by index; else 200 with the created events.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.testing.server import Answer, IdLedger, LoopbackServer

BATCH_PATH = "/api/v1/events/batch"
MAX_EVENTS = 100
PERMITTED = ("transaction_id", "code", "timestamp", "external_subscription_id", "precise_total_amount_cents",
             "properties")
_ERRORS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 422: "Unprocessable Entity",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def event_problems(event: Any) -> dict[str, list[str]]:
    """Lago's validation errors of one (permitted) event, by field."""
    if not isinstance(event, dict):
        return {"event": ["invalid_value"]}
    problems: dict[str, list[str]] = {}
    for field in ("transaction_id", "external_subscription_id", "code"):
        value = event.get(field)
        if value in (None, ""):
            problems[field] = ["value_is_mandatory"]
        elif not isinstance(value, str):
            problems[field] = ["invalid_value"]
    timestamp = event.get("timestamp")
    try:
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, str, type(None))):
            raise InvalidOperation
        if isinstance(timestamp, str):
            Decimal(timestamp)
    except InvalidOperation:
        problems["timestamp"] = ["invalid_format"]
    properties = event.get("properties")
    if properties is not None and (not isinstance(properties, dict) or any(
            isinstance(v, bool) or not isinstance(v, (str, int, float)) for v in properties.values())):
        problems["properties"] = ["invalid_value"]
    return problems


class LagoContractServer(IdLedger, LoopbackServer):
    def __init__(self, api_key: str = "lago-test-key",
                 reject: Callable[[dict[str, Any]], dict[str, list[str]] | None] | None = None, port: int = 0):
        super().__init__(port)
        self.api_key = api_key
        self.reject = reject  # a scripted poison: Lago's errors for an event, or None
        self.events: dict[str, dict[str, Any]] = {}  # transaction_id -> the event as stored
        self.received: Counter[str] = Counter()  # transaction_id -> times sent
        self.batch_sizes: list[int] = []  # of accepted batches
        self.refusals: list[dict[str, Any]] = []  # 422 bodies answered

    def error(self, status: int, detail: str) -> Answer:
        return Answer(status, {"status": status, "error": _ERRORS.get(status, detail)})

    def _refuse(self, details: dict[Any, Any]) -> Answer:
        body = {"status": 422, "error": "Unprocessable Entity", "code": "validation_errors",
                "error_details": {str(k): v for k, v in details.items()}}
        with self._lock:
            self.refusals.append(body)
        return Answer(422, body)

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path != BATCH_PATH:
            return Answer(404, {"status": 404, "error": "Not Found", "code": "route_not_found"})
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "Unauthorized")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(400, "Bad Request")
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            return self._refuse({"events": ["no_events"]})
        if len(events) > MAX_EVENTS:
            return self._refuse({"events": ["too_many_events"]})
        events = [{k: v for k, v in e.items() if k in PERMITTED} if isinstance(e, dict) else e for e in events]
        with self._lock:
            details: dict[int, Any] = {}
            seen: set[str] = set()
            for i, event in enumerate(events):
                problems = event_problems(event) or (self.reject(event) if self.reject else None) or {}
                tid = event.get("transaction_id") if isinstance(event, dict) else None
                if isinstance(tid, str):
                    self.received[tid] += 1
                    if tid in self.events or tid in seen:
                        problems = {**problems, "transaction_id": ["value_already_exist"]}
                    seen.add(tid)
                if problems:
                    details[i] = problems
            if not details:
                self.batch_sizes.append(len(events))
                for event in events:
                    self.events[event["transaction_id"]] = event
        if details:
            return self._refuse(details)
        return Answer(200, {"events": [_created(e) for e in events]})


def _created(event: dict[str, Any]) -> dict[str, Any]:
    at = datetime.fromtimestamp(float(event.get("timestamp") or 0), timezone.utc)
    return {"lago_id": None, "transaction_id": event["transaction_id"], "lago_customer_id": None,
            "code": event["code"], "timestamp": at.isoformat().replace("+00:00", "Z"), "precise_total_amount_cents": None,
            "properties": event.get("properties") or {}, "lago_subscription_id": None,
            "external_subscription_id": event["external_subscription_id"], "created_at": None}
