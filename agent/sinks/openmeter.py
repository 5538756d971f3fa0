"""OpenMeter: CloudEvents 1.0 in batches to ``POST {url}/api/v1/events``.

Body: a JSON array of events as ``application/cloudevents-batch+json``; ``Authorization:
Bearer <token>`` when a token is configured. 2xx accepts the whole batch. OpenMeter answers
``400 application/problem+json`` for the whole batch when any event is invalid, so a
rejected batch is halved until the bad events stand alone (``deliver_halving``).
OpenMeter deduplicates on (source, id): a re-sent record is not counted twice.
"""

from __future__ import annotations

from typing import Any

import httpx

from agent import __version__
from agent.config import OpenMeterBackend
from agent.convert import UsageRecord, format_decimal, format_timestamp
from agent.sinks.base import RESPONSE_HOOKS, JsonArraySink

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


class OpenMeterSink(JsonArraySink):
    name = "openmeter"

    def __init__(self, cfg: OpenMeterBackend):
        self._cfg = cfg
        headers = {"User-Agent": f"usage-agent/{__version__}", "Content-Type": BATCH_CONTENT_TYPE}
        if cfg.token is not None:
            headers["Authorization"] = f"Bearer {cfg.token.get_secret_value()}"
        self._client = httpx.Client(timeout=httpx.Timeout(cfg.timeout.total_seconds()), headers=headers,
                                    event_hooks=RESPONSE_HOOKS)
        self.batch_size = cfg.batch_size

    def render(self, record: UsageRecord) -> dict[str, Any]:
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

    def _post(self, body: bytes) -> httpx.Response:
        return self._client.post(f"{self._cfg.url}/api/v1/events", content=body)
