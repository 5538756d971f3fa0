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
import time
from collections.abc import Callable
from typing import Any

import httpx

from agent.settings import HttpBackend
from agent.convert import UsageRecord
from agent.sinks.base import JsonArraySink, http_client

TIMESTAMP_HEADER = "X-Usage-Timestamp"
SIGNATURE_HEADER = "X-Usage-Signature"


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Usage-Signature`` value for a body sent at ``timestamp``."""
    digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class HttpSink(JsonArraySink):
    name = "http"

    def __init__(self, cfg: HttpBackend, clock: Callable[[], float] = time.time):
        self._cfg = cfg
        self._clock = clock
        self._secret = cfg.hmac_secret.get_secret_value().encode() if cfg.hmac_secret is not None else None
        self._timeout = cfg.timeout.total_seconds()
        self._client = http_client(self._timeout, {**cfg.header_values(), "Content-Type": "application/json"})
        self.batch_size = cfg.batch_size

    def render(self, record: UsageRecord) -> dict[str, Any]:
        return record.to_json()

    def _request(self, body: bytes) -> httpx.Request:
        headers = {}
        if self._secret is not None:
            timestamp = str(int(self._clock()))
            headers = {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(self._secret, timestamp, body)}
        return self._client.build_request("POST", self._cfg.url, content=body, headers=headers)
