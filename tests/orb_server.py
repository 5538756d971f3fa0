"""An Orb-contract HTTP server on 127.0.0.1 for the tests.

``POST /v1/ingest`` as Orb's API reference describes it: ``Authorization: Bearer <api_key>``;
``{"events": [...]}`` (at most ``max_events``); each event needs ``event_name``,
``idempotency_key``, ``timestamp`` (ISO 8601 in UTC, at most five minutes ahead and not
older than the account's grace period) and ``properties`` (values numbers, booleans or
strings, nothing nested), and exactly one of ``customer_id`` (a customer Orb has) and
``external_customer_id``. Events that fail are listed in ``validation_failed`` with a 400;
the others are ingested. A key is ingested at most once: a re-sent key is a duplicate. With
``?debug=true`` the answer lists ``debug.ingested`` and ``debug.duplicate``. The same key
twice in one request with different bodies refuses the whole request.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs

from agent.testing.server import Answer, IdLedger, LoopbackServer

INGEST_PATH = "/v1/ingest"
REQUIRED = ("event_name", "idempotency_key", "timestamp", "properties")
FIELDS = {*REQUIRED, "customer_id", "external_customer_id"}


class OrbContractServer(IdLedger, LoopbackServer):
    def __init__(self, api_key: str = "orb-test-key", now: Callable[[], datetime] | None = None,
                 grace_period: timedelta | None = None, customers: set[str] | None = None,
                 reject: Callable[[dict[str, Any]], str | None] | None = None, max_events: int = 500, port: int = 0):
        super().__init__(port)
        self.api_key = api_key
        self.now = now or (lambda: datetime.now(timezone.utc))
        self.grace_period = grace_period  # None: the test's events are never too old
        self.customers = customers or set()  # the Orb customer ids that exist (for customer_id)
        self.reject = reject  # a scripted poison: a validation error, or None
        self.max_events = max_events
        self.debug_answers = True  # False: answer as if debug mode were gone (no ``debug`` object)
        self.events: dict[str, dict[str, Any]] = {}  # idempotency_key -> the event as ingested
        self.received: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.answers: list[tuple[int, dict[str, Any]]] = []

    def error(self, status: int, detail: str) -> Answer:
        return Answer(status, {"type": f"https://docs.withorb.com/reference/error-responses#{status}", "status": status,
                               "title": detail})

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        return self.respond(path, "", headers, raw)

    def respond(self, path: str, query: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path != INGEST_PATH:
            return self.error(404, "Not found")
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "Authentication error")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(400, "Request validation error: the body is not JSON")
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            return self.error(400, "Request validation error: events must be a list of objects")
        if len(events) > self.max_events:
            return self.error(400, f"Request validation error: at most {self.max_events} events per request")
        keys = [e.get("idempotency_key") for e in events]
        for key in set(k for k in keys if isinstance(k, str)):
            if len({json.dumps(e, sort_keys=True) for e in events if e.get("idempotency_key") == key}) > 1:
                return self.error(400, f"Request validation error: idempotency key {key} twice with different bodies")
        failed, ingested, duplicate = [], [], []
        with self._lock:
            for event in events:
                errors = self._problems(event)
                if errors:
                    failed.append({"idempotency_key": str(event.get("idempotency_key")), "validation_errors": errors})
                    continue
                key = event["idempotency_key"]
                self.received[key] += 1
                if key in self.events:
                    duplicate.append(key)
                else:
                    self.events[key] = event
                    ingested.append(key)
            if ingested or duplicate:
                self.batch_sizes.append(len(ingested) + len(duplicate))
        answer: dict[str, Any] = {"validation_failed": failed}
        if self.debug_answers and parse_qs(query).get("debug") == ["true"]:
            answer["debug"] = {"duplicate": duplicate, "ingested": ingested}
        status = 400 if failed else 200
        with self._lock:
            self.answers.append((status, answer))
        return Answer(status, answer)

    def _problems(self, event: dict[str, Any]) -> list[str]:
        errors = [f"Missing required field {name}" for name in REQUIRED if name not in event]
        if errors:
            return errors
        if not all(isinstance(event[name], str) and event[name] for name in ("event_name", "idempotency_key")):
            errors.append("event_name and idempotency_key must be non-empty strings")
        if ("customer_id" in event) == ("external_customer_id" in event):
            errors.append("Exactly one of customer_id and external_customer_id should be specified")
        elif "customer_id" in event and event["customer_id"] not in self.customers:
            errors.append(f"Customer with id {event['customer_id']} does not exist")
        properties = event["properties"]
        if not isinstance(properties, dict) or any(
                not isinstance(v, (str, int, float, bool)) for v in properties.values()):
            errors.append("properties values must be numeric, boolean, or strings; nested values are disallowed")
        errors += self._timestamp_problems(event["timestamp"])
        if not errors and self.reject is not None and (reason := self.reject(event)):
            errors.append(reason)
        return errors

    def _timestamp_problems(self, text: Any) -> list[str]:
        try:
            at = datetime.fromisoformat(text) if isinstance(text, str) else None
        except ValueError:
            at = None
        if at is None or (at.tzinfo is not None and at.utcoffset() != timedelta(0)):
            return [f"Timestamp {text!r} must be ISO 8601 in UTC"]
        at = at.replace(tzinfo=timezone.utc)
        now = self.now()
        if at > now + timedelta(minutes=5):
            return ["Timestamp is more than 5 minutes in the future"]
        if self.grace_period is not None and at < now - self.grace_period:
            return ["Timestamp is older than the grace period"]
        return []
