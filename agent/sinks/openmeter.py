"""OpenMeter: CloudEvents 1.0 in batches to ``POST {url}/api/v1/events``.

Body: a JSON array of events as ``application/cloudevents-batch+json``; ``Authorization:
Bearer <token>`` when a token is configured. 2xx accepts the whole batch. OpenMeter answers
``400 application/problem+json`` for the whole batch when any event is invalid, so a
rejected batch is halved until the bad events stand alone (``BatchSink`` answers ``Halve``).
OpenMeter deduplicates on (source, id): a re-sent record is not counted twice.
Its documented success answer is ``204 No Content`` (``202 Accepted`` from deployments that
ingest asynchronously); any other 2xx is not OpenMeter answering, and is not delivery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from agent.settings import OpenMeterBackend
from agent.records import UsageRecord, format_decimal, format_timestamp
from agent.sinks.base import Answer, BatchSink, json_array
from agent.sinks.transport import request

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


def ingested(answer: Answer) -> str | None:
    """OpenMeter's ingest answer is 204 (or 202), never another 2xx."""
    return None if answer.status in (202, 204) else f"with {answer.describe()}, where OpenMeter answers 204 No Content"


class OpenMeterSink(BatchSink):
    name = "openmeter"

    def __init__(self, cfg: OpenMeterBackend):
        self._cfg = cfg
        self._url = httpx.URL(f"{cfg.url}/api/v1/events")
        self._headers = {"Content-Type": BATCH_CONTENT_TYPE}
        if cfg.token is not None:
            self._headers["Authorization"] = f"Bearer {cfg.token.get_secret_value()}"
        self.timeout = cfg.timeout.total_seconds()
        self.max_batch = cfg.batch_size
        self.success = ingested

    def element(self, record: UsageRecord) -> dict[str, Any]:
        return {
            "specversion": "1.0",
            "id": record.record_id,
            "source": self._cfg.source,
            "type": record.event_type,
            "subject": record.customer_id,
            "time": format_timestamp(record.timestamp),
            "datacontenttype": "application/json",
            "data": {
                **record.metadata,
                "value": format_decimal(record.value),
                "unit": record.unit,
                "dimension_id": record.dimension_id,
                "measurement": record.measurement,
                "resource": record.resource,
            },
        }

    def render(self, elements: Sequence[bytes]) -> httpx.Request:
        return request("POST", self._url, self._headers, json_array(elements))
