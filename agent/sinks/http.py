"""A plain JSON endpoint for in-house billing: ``POST {url}`` with a JSON array of records.

Each element is the agent's own record (``UsageRecord.to_json``). Configured headers are
sent with every request. With an HMAC secret, every request also carries

    X-Usage-Timestamp: <Unix time in seconds, when the request was signed>
    X-Usage-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

where body is the exact request body bytes. A receiver recomputes the HMAC, compares it in
constant time and refuses timestamps far from its own clock (replays). 2xx accepts the
whole batch (its body is not read past a few KiB); a 4xx that rejects it is halved until
the bad records stand alone.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any

import httpx

from agent.clock import Clock, SystemClock
from agent.settings import HttpBackend
from agent.records import UsageRecord
from agent.sinks.base import BatchSink, json_array
from agent.sinks.transport import request

TIMESTAMP_HEADER = "X-Usage-Timestamp"
SIGNATURE_HEADER = "X-Usage-Signature"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Usage-Signature`` value for a body sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class HttpSink(BatchSink):
    name = "http"

    def __init__(self, cfg: HttpBackend, clock: Clock | None = None):
        self._url = httpx.URL(cfg.url)
        self._clock = clock or SystemClock()
        self._secret = cfg.hmac_secret.get_secret_value().encode() if cfg.hmac_secret is not None else None
        self._headers = {**cfg.header_values(), "Content-Type": "application/json"}
        self.timeout = cfg.timeout.total_seconds()
        self.max_batch = cfg.batch_size

    def element(self, record: UsageRecord) -> dict[str, Any]:
        return record.to_json()

    def render(self, elements: Sequence[bytes]) -> httpx.Request:
        body = json_array(elements)
        headers = self._headers
        if self._secret is not None:
            timestamp = str(int(self._clock.time()))
            headers = {**headers, TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(self._secret, timestamp, body)}
        return request("POST", self._url, headers, body)
