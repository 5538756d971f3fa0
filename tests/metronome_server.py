"""A Metronome-contract HTTP server on 127.0.0.1 for the tests: ``POST /v1/ingest``.

As Metronome's API reference describes it: ``Authorization: Bearer <token>``, a JSON array of
1 to 100 usage events, each ``{transaction_id, customer_id, event_type, timestamp,
properties?}`` (strings; ``timestamp`` RFC 3339 with a 4-digit year, at most 34 days back and
24 hours ahead of the server's clock; ``properties`` an object). An event with any other key
is refused (a misspelt field would otherwise be dropped). Any invalid event refuses the whole
request with 400 ``{"message"}``; nothing of it is ingested. An event whose transaction_id was
taken before is ignored, and the request answered 200 as usual. Faults can be scripted.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any

from agent.testing.server import Answer, IdLedger, LoopbackServer

INGEST_PATH = "/v1/ingest"
API_KEY = "metronome-test-token-7f3a"
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
REQUIRED = ("transaction_id", "customer_id", "event_type", "timestamp")
MAX_AGE, MAX_AHEAD = 34 * 86400, 24 * 3600


class MetronomeContractServer(IdLedger, LoopbackServer):
    def __init__(self, api_key: str = API_KEY, clock: Callable[[], float] = time.time,
                 reject: Callable[[dict[str, Any]], str | None] | None = None, port: int = 0, latency: float = 0.0):
        super().__init__(port, latency)
        self.api_key = api_key
        self.clock = clock
        self.reject = reject  # a reason to refuse an event (and so its whole request), or None
        self.events: dict[str, dict[str, Any]] = {}  # transaction_id -> the event first ingested
        self.received: Counter[str] = Counter()
        self.batch_sizes: list[int] = []  # of accepted requests
        self.refused: list[tuple[int, str]] = []

    def error(self, status: int, detail: str) -> Answer:
        if status != 429 and status < 500:
            with self._lock:
                self.refused.append((status, detail))
        return Answer(status, {"message": detail})

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path != INGEST_PATH:
            return self.error(404, f"Cannot POST {path}")
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "Unauthorized")
        if (headers.get("content-type") or "").split(";")[0].strip() != "application/json":
            return self.error(415, "Content-Type must be application/json")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(400, "body is not JSON")
        if not isinstance(body, list) or not 1 <= len(body) <= 100:
            return self.error(400, "the body must be a JSON array of between 1 and 100 usage events")
        problems = [f"[{i}] {problem}" for i, event in enumerate(body) if (problem := self._problem(event))]
        if problems:
            return self.error(400, "; ".join(problems))
        with self._lock:
            self.batch_sizes.append(len(body))
            for event in body:
                self.received[event["transaction_id"]] += 1
                self.events.setdefault(event["transaction_id"], event)
        return Answer(200)

    def _problem(self, event: Any) -> str | None:
        if not isinstance(event, dict):
            return "an event must be an object"
        unknown = sorted(set(event) - {*REQUIRED, "properties"})
        if unknown:
            return f"unknown field(s) {', '.join(unknown)}"
        for key in REQUIRED:
            if not isinstance(event.get(key), str) or not event[key]:
                return f"{key} is required, a non-empty string"
        if len(event["transaction_id"]) > 128:
            return "transaction_id is longer than 128 characters"
        if not _RFC3339.match(event["timestamp"]):
            return f"timestamp {event['timestamp']!r} is not RFC 3339"
        at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        now = self.clock()
        if at < now - MAX_AGE:
            return "timestamp is more than 34 days in the past"
        if at > now + MAX_AHEAD:
            return "timestamp is more than 24 hours in the future"
        properties = event.get("properties", {})
        if not isinstance(properties, dict):
            return "properties must be an object"
        if self.reject is not None and (reason := self.reject(event)):
            return reason
        return None
