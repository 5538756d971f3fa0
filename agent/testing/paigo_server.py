"""A Paigo-contract HTTP server on 127.0.0.1 for the demo and the tests.

It implements what the Paigo reference documents for usage collection: the OAuth2
client-credentials token endpoint (JSON body with audience, grant_type, client_id,
client_secret) and ``POST /usage`` behind ``Authorization: Bearer``, validating every body
against the usage-record JSON Schema; and "Get all dimensions" (``GET /dimensions``) and
"Manage measurements" (``GET /measurements``), answered ``{"message", "data": [...]}`` as the
reference's examples show them (the reference documents no pagination), behind the same
token. Tests add and remove dimensions while it runs. Faults can be scripted per request.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from collections.abc import Callable
from importlib import resources
from typing import Any

import jsonschema

from agent.testing.server import Answer, Fault, LoopbackServer

AUDIENCE = "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com"
TOKEN, USAGE, DIMENSIONS, MEASUREMENTS = "/oauth/token", "/usage", "/dimensions", "/measurements"
LISTED = "This is a sample API message. The exact message may vary based on the API behavior"


def example_dimension(dimension_id: str, resource_type: str = "ebs", region: str = "us-east-1", *,
                      role: str | None = "arn:aws:iam::214826386939:role/paigo-scraper",
                      external_id: str | None = "123456789", mode: str = "infrastructureBased",
                      cloud: str = "aws", interval: str = "hour", name: str = "EBS Usage") -> dict[str, Any]:
    """A dimension shaped as the reference's "Get all dimensions" example, with its measurement."""
    configuration: dict[str, Any] = {"cloudPlatform": cloud, "region": region, "resourceType": resource_type}
    if role is not None:
        configuration["iamRoleArn"] = role
    if external_id is not None:
        configuration["externalId"] = external_id
    return {
        "dimensionName": name, "consumptionUnit": {"unit": "data-based", "type": "gigabyte"},
        "usageIncrement": "1", "usageEntitlement": "inf", "aggregationInterval": interval,
        "aggregationMethod": "max", "dimensionId": dimension_id,
        "measurement": {"measurementMode": mode, "measurementConfiguration": configuration,
                        "measurementName": f"{name} measurement", "measurementId": f"m-{dimension_id}"},
        "rounding": "round", "overageAllowed": "true", "consumptionPrice": "0.10", "sampleType": "gauge",
        "paymentSchedule": "arrear", "metadata": {}, "tiers": [], "tiersGroupByMetadata": [],
    }


def usage_record_schema() -> dict[str, Any]:
    text = resources.files("agent.testing").joinpath("contracts/paigo-usage-record.schema.json").read_text()
    return json.loads(text)


class PaigoContractServer(LoopbackServer):
    def __init__(
        self,
        client_id: str = "demo-client",
        client_secret: str = "demo-secret",
        audience: str = AUDIENCE,
        expires_in: int = 86400,
        reject: Callable[[dict[str, Any]], bool] | None = None,
        port: int = 0,
        latency: float = 0.0,
    ):
        super().__init__(port, latency)
        self.client_id = client_id
        self.client_secret = client_secret
        self.audience = audience
        self.expires_in = expires_in
        self.reject = reject
        self._validator = jsonschema.Draft7Validator(usage_record_schema(), format_checker=jsonschema.FormatChecker())
        self._tokens: dict[str, float] = {}
        self.accepted: list[dict[str, Any]] = []
        self.received_ids: Counter[str] = Counter()
        self.token_requests = 0
        self.rejected: list[tuple[int, Any]] = []
        self._dimensions: dict[str, dict[str, Any]] = {}

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    # -- scripting and inspection --------------------------------------------------------

    @property
    def usage_requests(self) -> int:
        return self.requests_by_path[USAGE]

    @property
    def in_flight(self) -> int:
        return self.in_flight_by_path[USAGE]

    @property
    def max_in_flight(self) -> int:
        return self.max_in_flight_by_path[USAGE]

    def add_dimension(self, dimension: dict[str, Any]) -> None:
        with self._lock:
            self._dimensions[dimension["dimensionId"]] = dimension

    def remove_dimension(self, dimension_id: str) -> None:
        with self._lock:
            del self._dimensions[dimension_id]

    @property
    def dimension_reads(self) -> int:
        return self.requests_by_path[DIMENSIONS]

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def accepted_ids(self) -> set[str]:
        with self._lock:
            return {body["metadata"]["recordId"] for body in self.accepted}

    def duplicates(self) -> int:
        with self._lock:
            return sum(n - 1 for n in self.received_ids.values() if n > 1)

    # -- protocol ------------------------------------------------------------------------

    def answer_get(self, path: str, headers: dict[str, str]) -> Answer:
        if path not in (DIMENSIONS, MEASUREMENTS):
            return Answer(404 if path != USAGE else 405, {"message": "Not Found"})
        if not self._authorised(headers.get("authorization")):
            return Answer(401, {"message": "Unauthorized"})
        with self._lock:
            dimensions = list(self._dimensions.values())
        if path == DIMENSIONS:
            return Answer(200, {"message": LISTED, "data": dimensions})
        measurements = {d["measurement"]["measurementId"]: d["measurement"] for d in dimensions
                        if isinstance(d.get("measurement"), dict) and "measurementId" in d["measurement"]}
        return Answer(200, {"message": LISTED, "data": list(measurements.values())})

    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        if path not in (TOKEN, USAGE):
            return Answer(404, {"message": "Not Found"})
        if "application/json" not in (headers.get("content-type") or ""):
            return Answer(415, {"message": "Content-Type must be application/json"})
        try:
            body = json.loads(raw)
        except ValueError:
            return Answer(400, {"message": "body is not JSON"})
        if path == TOKEN:
            return Answer(*self._issue_token(body))
        if not self._authorised(headers.get("authorization")):
            return Answer(401, {"message": "Unauthorized"})
        return Answer(*self._usage(body))

    def _issue_token(self, body: Any) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.token_requests += 1
        if not isinstance(body, dict):
            return 400, {"error": "invalid_request", "error_description": "body must be a JSON object"}
        if body.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        if body.get("audience") != self.audience:
            return 403, {"error": "access_denied", "error_description": "Service not enabled within domain"}
        if body.get("client_id") != self.client_id or body.get("client_secret") != self.client_secret:
            return 401, {"error": "access_denied", "error_description": "Unauthorized"}
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = time.monotonic() + self.expires_in
        return 200, {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}

    def _authorised(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            expiry = self._tokens.get(header.removeprefix("Bearer "))
        return expiry is not None and expiry > time.monotonic()

    def _usage(self, body: Any) -> tuple[int, dict[str, Any]]:
        errors = sorted(self._validator.iter_errors(body), key=lambda e: list(e.path)) if isinstance(body, dict) else []
        if not isinstance(body, dict) or errors:
            message = "; ".join(f"{'/'.join(map(str, e.path)) or '<body>'}: {e.message}" for e in errors) or "body must be a JSON object"
            with self._lock:
                self.rejected.append((400, body))
            return 400, {"message": f"Invalid usage record: {message}"}
        if self.reject is not None and self.reject(body):
            with self._lock:
                self.rejected.append((400, body))
            return 400, {"message": "Customer not found"}
        with self._lock:
            record_id = body.get("metadata", {}).get("recordId", "")
            self.received_ids[record_id] += 1
            if self.received_ids[record_id] == 1:
                self.accepted.append(body)
        return 200, {"message": "Usage record created"}


__all__ = ["AUDIENCE", "Fault", "PaigoContractServer", "example_dimension", "usage_record_schema"]
