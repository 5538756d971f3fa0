"""A Togai-contract HTTP server on 127.0.0.1 for the tests.

``POST /ingestBatch`` as Togai's OpenAPI document describes it: ``Authorization: Bearer``,
the body validated against ``IngestBatchEventRequest`` (1 to 500 events, no unknown fields,
``schemaName`` 1-50 characters, attribute values as decimal strings, dimension values 1-200
characters) with format checks on; an invalid body is refused whole with 400 and a body
over ``max_bytes`` with 422 (payload above the limit). Ids are deduplicated: a re-sent id is
accepted (202) and not counted again, as Togai marks the copy INGESTION_FAILED_DUPLICATE_EVENT.
``reject`` (a scripted poison: a reason, or None) and ``answer_duplicates_207`` make a 207
partial failure naming the events not accepted, ``{"errors": [{message, eventPayload}]}``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.testing.server import Answer, IdLedger, LoopbackServer, contract_validator, schema_errors

INGEST_PATH = "/ingestBatch"


def batch_validator() -> Any:
    return contract_validator("togai-ingest-batch.schema.json")


class TogaiContractServer(IdLedger, LoopbackServer):
    def __init__(self, token: str = "togai-test-token", reject: Callable[[dict[str, Any]], str | None] | None = None,
                 max_bytes: int = 1_000_000, port: int = 0):
        super().__init__(port)
        self.token = token
        self.reject = reject
        self.max_bytes = max_bytes
        self.answer_duplicates_207 = False  # name a re-sent id in a 207 ("... already ingested") instead of 202
        self._validator = batch_validator()
        self.events: dict[str, dict[str, Any]] = {}  # id -> the event as first accepted
        self.received: Counter[str] = Counter()
        self.batch_sizes: list[int] = []  # events per request that got past validation
        self.statuses: list[int] = []

    def _answer(self, answer: Answer) -> Answer:
        with self._lock:
            self.statuses.append(answer.status)
        return answer

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path != INGEST_PATH:
            return self._answer(self.error(404, f"no route {path}"))
        if headers.get("authorization") != f"Bearer {self.token}":
            return self._answer(self.error(401, 'Credential "x-api-key" is not valid'))
        if len(raw) > self.max_bytes:
            return self._answer(self.error(422, "Unable to process the events as the size of the event payload "
                                                "is above the supported limit"))
        try:
            body = json.loads(raw)
        except ValueError:
            return self._answer(self.error(400, "request body is not JSON"))
        problems = schema_errors(self._validator, body)
        if problems:
            return self._answer(self.error(400, "; ".join(problems)[:500]))
        errors = []
        with self._lock:
            self.batch_sizes.append(len(body["events"]))
            for event in body["events"]:
                event_id = event.get("id")
                reason = self.reject(event) if self.reject is not None else None
                if reason is not None:
                    errors.append({"message": reason, "eventPayload": event})
                    continue
                if event_id is None:  # Togai makes up an id; such an event cannot be deduplicated
                    continue
                self.received[event_id] += 1
                if event_id in self.events:
                    if self.answer_duplicates_207:
                        errors.append({"message": f"Event with id {event_id} is already ingested",
                                       "eventPayload": event})
                    continue
                self.events[event_id] = event
        if errors:
            return self._answer(Answer(207, {"errors": errors}))
        return self._answer(Answer(202, {"errors": []}))
