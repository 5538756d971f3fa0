"""An OpenMeter-contract HTTP server on 127.0.0.1 for the tests.

It implements ``POST /api/v1/events`` as OpenMeter's OpenAPI document describes it: a
single event as ``application/cloudevents+json``, a batch as
``application/cloudevents-batch+json`` (either as ``application/json``), ``Authorization:
Bearer`` when a token is set, every event validated against the ``Event`` JSON Schema with
format checks on, and errors as ``application/problem+json``. A batch with any invalid (or
scripted-poison) event is refused whole with 400, as OpenMeter does. Events are
deduplicated on (source, id). Faults can be scripted per request.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.testing.server import Answer, LoopbackServer, contract_validator, schema_errors

EVENTS_PATH = "/api/v1/events"
SINGLE, BATCH = "application/cloudevents+json", "application/cloudevents-batch+json"
_TITLES = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 415: "Unsupported Media Type",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def event_validator() -> Any:
    return contract_validator("openmeter-event.schema.json")


class OpenMeterContractServer(LoopbackServer):
    def __init__(self, token: str | None = "om-test-token",
                 reject: Callable[[dict[str, Any]], str | None] | None = None, port: int = 0,
                 latency: float = 0.0):
        super().__init__(port, latency)
        self.token = token
        self.reject = reject  # a reason to refuse an event (and so its whole batch), or None
        self._validator = event_validator()
        self.events: dict[tuple[str, str], dict[str, Any]] = {}  # (source, id) -> first accepted event
        self.received: Counter[tuple[str, str]] = Counter()
        self.batch_sizes: list[int] = []  # of accepted requests
        self.content_types: list[str] = []
        self.refused: list[tuple[int, dict[str, Any]]] = []  # (status, problem) answered

    # -- inspection ---------------------------------------------------------------------

    def accepted_ids(self) -> set[str]:
        with self._lock:
            return {event_id for _, event_id in self.events}

    def duplicates(self) -> int:
        with self._lock:
            return sum(n - 1 for n in self.received.values() if n > 1)

    # -- protocol -----------------------------------------------------------------------

    def error(self, status: int, detail: str, extensions: dict[str, Any] | None = None) -> Answer:
        problem = {"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status,
                   "detail": detail, "instance": f"urn:request:usage-agent-tests/{self.requests}"}
        if extensions:
            problem["extensions"] = extensions
        if status != 429 and status < 500:
            with self._lock:
                self.refused.append((status, problem))
        return Answer(status, problem, "application/problem+json")

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path != EVENTS_PATH:
            return self.error(404, f"no route {path}")
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return self.error(401, "missing or invalid API token")
        content_type = (headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type not in (SINGLE, BATCH, "application/json"):
            return self.error(415, f"unsupported content type {content_type!r}")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(400, "request body is not JSON")
        if content_type == SINGLE and not isinstance(body, dict):
            return self.error(400, f"{SINGLE} takes one event object")
        if content_type == BATCH and not isinstance(body, list):
            return self.error(400, f"{BATCH} takes an array of events")
        events = body if isinstance(body, list) else [body]
        problems = [{"field": f"[{i}].{err}", "code": "validation_error"}
                    for i, event in enumerate(events) for err in schema_errors(self._validator, event)]
        if not problems and self.reject is not None:
            problems = [{"field": f"[{i}]", "code": "rejected", "message": reason}
                        for i, event in enumerate(events) if (reason := self.reject(event))]
        if problems:
            return self.error(400, "invalid event(s); no event of this request was ingested",
                              {"validationErrors": problems})
        with self._lock:
            self.content_types.append(content_type)
            self.batch_sizes.append(len(events))
            for event in events:
                key = (event["source"], event["id"])
                self.received[key] += 1
                self.events.setdefault(key, event)
        return Answer(204)
