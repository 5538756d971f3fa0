"""An in-house billing endpoint on 127.0.0.1 for the tests: the ``http`` backend's contract.

``POST /usage`` with ``Content-Type: application/json`` and a JSON array of agent records
(``agent/testing/contracts/usage-agent-record.schema.json``). Required headers are checked (401 when
missing or wrong); with an HMAC secret the signature is verified as the README documents
(401 when it does not verify or the timestamp is stale). A batch with an invalid or
scripted-poison record is refused whole with 400. Records are deduplicated on id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent.testing.server import Answer, LoopbackServer, contract_validator, schema_errors

USAGE_PATH = "/usage"


def record_validator() -> Any:
    return contract_validator("usage-agent-record.schema.json")


def verify_signature(secret: bytes, timestamp: str | None, signature: str | None, body: bytes,
                     now: float, tolerance: float = 300.0) -> str | None:
    """The README's algorithm, written from the README: None when the request verifies, else why not."""
    if not timestamp or not timestamp.isdigit():
        return "missing or malformed X-Usage-Timestamp"
    if abs(now - int(timestamp)) > tolerance:
        return "stale X-Usage-Timestamp"
    expected = "sha256=" + hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not signature or not hmac.compare_digest(expected, signature):
        return "X-Usage-Signature does not verify"
    return None


class HttpContractServer(LoopbackServer):
    def __init__(self, headers: dict[str, str] | None = None, hmac_secret: str | None = None,
                 reject: Callable[[dict[str, Any]], str | None] | None = None,
                 clock: Callable[[], float] = time.time, port: int = 0):
        super().__init__(port)
        self.required_headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.hmac_secret = hmac_secret
        self.reject = reject
        self.clock = clock
        self._validator = record_validator()
        self.records: dict[str, dict[str, Any]] = {}  # id -> first accepted record
        self.received: Counter[str] = Counter()
        self.refused: list[tuple[int, str]] = []
        self.batch_sizes: list[int] = []
        self.last_request: tuple[dict[str, str], bytes] | None = None  # (headers, body) as received

    @property
    def usage_url(self) -> str:
        return f"{self.url}{USAGE_PATH}"

    def duplicates(self) -> int:
        with self._lock:
            return sum(n - 1 for n in self.received.values() if n > 1)

    def error(self, status: int, detail: str) -> Answer:
        if status != 429 and status < 500:
            with self._lock:
                self.refused.append((status, detail))
        return Answer(status, {"error": detail})

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        with self._lock:
            self.last_request = (headers, raw)
        if path != USAGE_PATH:
            return self.error(404, f"no route {path}")
        for name, value in self.required_headers.items():
            if headers.get(name) != value:
                return self.error(401, f"header {name} missing or wrong")
        if self.hmac_secret is not None:
            why = verify_signature(self.hmac_secret.encode(), headers.get("x-usage-timestamp"),
                                   headers.get("x-usage-signature"), raw, self.clock())
            if why:
                return self.error(401, why)
        if (headers.get("content-type") or "").split(";")[0].strip().lower() != "application/json":
            return self.error(415, "Content-Type must be application/json")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error(400, "body is not JSON")
        if not isinstance(body, list):
            return self.error(400, "body must be a JSON array of records")
        problems = [f"[{i}].{err}" for i, record in enumerate(body) for err in schema_errors(self._validator, record)]
        if not problems and self.reject is not None:
            problems = [f"[{i}]: {reason}" for i, record in enumerate(body) if (reason := self.reject(record))]
        if problems:
            return self.error(400, "; ".join(problems))
        with self._lock:
            self.batch_sizes.append(len(body))
            for record in body:
                self.received[record["id"]] += 1
                self.records.setdefault(record["id"], record)
        return Answer(200, {"accepted": len(body)})
