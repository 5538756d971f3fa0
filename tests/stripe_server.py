"""A Stripe-contract HTTP server on 127.0.0.1 for the tests: ``POST /v1/billing/meter_events``.

As Stripe's API reference describes it: ``Authorization: Bearer <secret key>``, a form-encoded
body (``application/x-www-form-urlencoded``) of ``event_name`` (required, at most 100
characters), ``payload[<key>]`` (string values; the meter's customer and value keys
required), ``identifier`` (at most 100 characters), ``timestamp`` (Unix seconds, within the
past 35 days or up to 5 minutes ahead of the server's clock) and ``expand[]``; any other
parameter is refused, as Stripe refuses it. Errors are ``{"error": {"type", "code", "message",
"param"}}`` with ``Stripe-Should-Retry``. A second event with an identifier already taken is
answered ``400`` "An event already exists with identifier …", ``Stripe-Should-Retry: false``.
Faults can be scripted per request.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from agent.testing.server import Answer, IdLedger, LoopbackServer

EVENTS_PATH = "/v1/billing/meter_events"
API_KEY = "sk_test_51usageagentKey"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z]+)?$")
_PAYLOAD = re.compile(r"^payload\[([^\[\]]+)\]$")
_DECIMAL = re.compile(r"^\d+(\.\d+)?$")
MAX_AGE, MAX_AHEAD = 35 * 86400, 5 * 60


class StripeContractServer(IdLedger, LoopbackServer):
    def __init__(self, api_key: str = API_KEY, customer_key: str = "stripe_customer_id", value_key: str = "value",
                 clock: Callable[[], float] = time.time,
                 reject: Callable[[dict[str, Any]], str | None] | None = None, port: int = 0, latency: float = 0.0):
        super().__init__(port, latency)
        self.api_key = api_key
        self.customer_key, self.value_key = customer_key, value_key
        self.clock = clock
        self.reject = reject  # a reason to refuse an event (400, Stripe-Should-Retry: false), or None
        self.events: dict[str, dict[str, Any]] = {}  # identifier -> the meter event first created
        self.received: Counter[str] = Counter()  # identifier -> valid requests carrying it
        self.versions: Counter[str] = Counter()
        self.bodies: list[bytes] = []  # every body sent, as received
        self.refused: list[tuple[int, dict[str, Any]]] = []

    def error(self, status: int, detail: str, *, code: str | None = None, param: str | None = None,
              should_retry: str | None = None, kind: str = "invalid_request_error") -> Answer:
        error: dict[str, Any] = {"type": kind, "message": detail}
        if code:
            error["code"] = code
        if param:
            error["param"] = param
        headers = {"Request-Id": f"req_{self.requests}"}
        if should_retry is not None:
            headers["Stripe-Should-Retry"] = should_retry
        if status != 429 and status < 500:
            with self._lock:
                self.refused.append((status, error))
        return Answer(status, {"error": error}, headers=headers)

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path != EVENTS_PATH:
            return self.error(404, f"Unrecognized request URL (POST: {path}).")
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "Invalid API Key provided.", should_retry="false")
        version = headers.get("stripe-version")
        if version is not None and not _VERSION.match(version):
            return self.error(400, f"Invalid Stripe API version: {version}", code="api_version_invalid",
                              should_retry="false")
        if (headers.get("content-type") or "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return self.error(400, "Invalid request: the body must be application/x-www-form-urlencoded",
                              should_retry="false")
        with self._lock:
            self.bodies.append(raw)
            self.versions[version or ""] += 1
        try:
            fields = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return self.error(400, "Invalid request: the body is not form-encoded", should_retry="false")
        event, problem = self._event(fields)
        if problem is not None:
            return self.error(400, problem[1], code=problem[0], param=problem[2], should_retry="false")
        if self.reject is not None and (reason := self.reject(event)):
            return self.error(400, reason, code="resource_missing", should_retry="false")
        identifier = event["identifier"]
        with self._lock:
            self.received[identifier] += 1
            duplicate = identifier in self.events
            self.events.setdefault(identifier, event)
        if duplicate:
            return self.error(400, f"An event already exists with identifier {identifier}.", should_retry="false")
        return Answer(200, {"object": "billing.meter_event", "created": int(self.clock()), "livemode": False, **event})

    def _event(self, fields: list[tuple[str, str]]) -> tuple[dict[str, Any], tuple[str, str, str | None] | None]:
        """The meter event the fields describe, or (code, message, param) of what is wrong."""
        names = [name for name, _ in fields]
        for name in names:
            if names.count(name) > 1 and name != "expand[]":
                return {}, ("parameter_invalid", f"Received {name} more than once", name)
        values = dict(fields)
        payload: dict[str, str] = {}
        for name, value in fields:
            key = _PAYLOAD.match(name)
            if key:
                payload[key.group(1)] = value
            elif name not in ("event_name", "identifier", "timestamp", "expand[]"):
                return {}, ("parameter_unknown", f"Received unknown parameter: {name}", name)
        name = values.get("event_name", "")
        if not 1 <= len(name) <= 100:
            return {}, ("parameter_missing" if not name else "parameter_invalid",
                        "event_name is required, at most 100 characters", "event_name")
        identifier = values.get("identifier", f"gen_{self.requests}")
        if not 1 <= len(identifier) <= 100:
            return {}, ("parameter_invalid", "identifier must be 1 to 100 characters", "identifier")
        now = self.clock()
        timestamp = values.get("timestamp", str(int(now)))
        if not timestamp.isdigit():
            return {}, ("parameter_invalid", f"Invalid integer: {timestamp}", "timestamp")
        if not now - MAX_AGE <= int(timestamp) <= now + MAX_AHEAD:
            return {}, ("timestamp_out_of_range" if int(timestamp) < now else "timestamp_in_future",
                        "The timestamp must be within the past 35 calendar days or up to 5 minutes in the future.",
                        "timestamp")
        for key in (self.customer_key, self.value_key):
            if not payload.get(key):
                return {}, ("parameter_missing", f"Missing required param: payload[{key}].", f"payload[{key}]")
        if not _DECIMAL.match(payload[self.value_key]):
            return {}, ("parameter_invalid", f"payload[{self.value_key}] must be a non-negative number",
                        f"payload[{self.value_key}]")
        return {"event_name": name, "identifier": identifier, "timestamp": int(timestamp), "payload": payload}, None
