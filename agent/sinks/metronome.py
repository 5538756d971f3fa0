"""Metronome: usage events in batches of 1-100 to ``POST {url}/v1/ingest``.

Body: a JSON array of events ``{transaction_id, customer_id, event_type, timestamp, properties}``
(``timestamp`` RFC 3339, ``properties`` the value as a decimal string and the record's
metadata, all strings); ``Authorization: Bearer <api_key>``. 200 takes the whole batch.
Metronome ignores an event whose transaction_id it accepted in the past 34 days and answers
the batch 200 as usual, so a re-send is delivered. A 400 refuses the batch without naming the
bad events: it is halved until they stand alone. Metronome backdates events at most 34 days
and refuses timestamps more than 24 hours ahead: a record outside is dead-lettered unsent.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx

from agent.records import UsageRecord, format_decimal, format_timestamp
from agent.settings import MetronomeBackend
from agent.sinks.base import BatchSink, json_array, outside_window
from agent.sinks.transport import request

INGEST_PATH = "/v1/ingest"
MAX_BATCH = 100  # "a JSON array of between 1 and 100 usage events"
WINDOW = timedelta(days=34)  # how far back events may be dated, and how long transaction_ids are deduplicated
MAX_AHEAD = timedelta(hours=24)


class MetronomeSink(BatchSink):
    name = "metronome"
    max_batch = MAX_BATCH
    dedup_window = WINDOW

    def __init__(self, cfg: MetronomeBackend):
        self._url = httpx.URL(f"{cfg.url}{INGEST_PATH}")
        self._headers = {"Authorization": f"Bearer {cfg.api_key.get_secret_value()}",
                         "Content-Type": "application/json"}
        self.timeout = cfg.timeout.total_seconds()

    def refuse(self, record: UsageRecord, now: datetime) -> str | None:
        return outside_window(record, now, WINDOW, MAX_AHEAD, "Metronome")

    def element(self, record: UsageRecord) -> dict[str, Any]:
        # the value first, and no metadata key of the same name replaces it
        properties = {"value": format_decimal(record.value),
                      **{k: v for k, v in record.metadata.items() if k != "value"}}
        return {
            "transaction_id": record.record_id,
            "customer_id": record.customer_id,
            "event_type": record.event_type,
            "timestamp": format_timestamp(record.timestamp),
            "properties": properties,
        }

    def render(self, elements: Sequence[bytes]) -> httpx.Request:
        return request("POST", self._url, self._headers, json_array(elements))
