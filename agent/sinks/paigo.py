"""Paigo: OAuth2 client credentials, then one ``POST {url}/usage`` per record.

Token: ``POST token_url`` with JSON ``{audience, grant_type: client_credentials,
client_id, client_secret}``; the answer's ``access_token`` (a non-empty string) is used as
``Authorization: Bearer`` until shortly before ``expires_in`` (1 s to a year; an hour when
absent) runs out. A 401 from the API fetches a new token once per burst of 401s; when the
API refuses the new token too, tokens are held back with a growing wait. Records go out
concurrently over the agent's one client. Paigo documents its success answer as a JSON object
with a ``message``: any other 2xx body is not delivery.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import httpx
import structlog

from agent.clock import Clock, SystemClock
from agent.settings import PaigoBackend
from agent.records import UsageRecord, format_decimal, format_timestamp
from agent.metrics import Metrics
from agent.sinks.base import (
    Answer,
    NotSendable,
    Outcome,
    RetryLater,
    SendAgain,
    SinkDefaults,
    classify,
    json_object,
    parse_retry_after,
    redirected,
    transport_failure,
)
from agent.sinks.transport import request, send

log = structlog.get_logger("agent.sinks.paigo")

DEFAULT_LIFETIME = 3600.0  # expires_in is optional (RFC 6749 §5.1)
MAX_LIFETIME = 366 * 86400.0  # a longer lifetime is not a token answer to trust
HOLD_MAX = 300.0  # the longest wait between token attempts that keep failing
_BEARER = re.compile(r"^[\x21-\x7e]+$")  # what an Authorization header can carry


class TokenUnavailable(NotSendable):
    """No token to send with: the records wait for ``outcome``."""


def _kind(value: Any) -> str:
    """A JSON value as an error names it, without showing what could be a secret."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string with spaces or non-ASCII characters"
    return "an array" if isinstance(value, list) else "an object"


def _lifetime(value: Any) -> float | None:
    """``expires_in`` in seconds, or None when it is not a sane lifetime."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 1 <= value <= MAX_LIFETIME else None  # NaN fails both comparisons


def token_from(answer: Answer, host: str) -> tuple[str, float]:
    """The bearer token and its lifetime from a 2xx token answer; TokenUnavailable naming
    the peer and what is wrong when the answer is not a usable token."""

    def wrong(what: str) -> TokenUnavailable:
        return TokenUnavailable(RetryLater(f"token endpoint {host} answered {answer.status} {what}",
                                           status=answer.status, alert=True))

    payload = json_object(answer)
    if payload is None:
        raise wrong(f"with {answer.describe()}, not a JSON object with an access_token")
    if "access_token" not in payload:
        raise wrong("without access_token")
    token = payload["access_token"]
    if not isinstance(token, str) or not _BEARER.match(token):
        raise wrong(f"with access_token {_kind(token)}, not a bearer token")
    lifetime = _lifetime(payload.get("expires_in", DEFAULT_LIFETIME))
    if lifetime is None:
        shown = json.dumps(payload["expires_in"])[:40]
        raise wrong(f"with expires_in {shown}, not a number of seconds from 1 to {MAX_LIFETIME:.0f}")
    return token, lifetime


def documented_success(answer: Answer) -> str | None:
    """Paigo answers POST /usage with a JSON object carrying a ``message``."""
    payload = json_object(answer)
    if payload is not None and isinstance(payload.get("message"), str):
        return None
    return f'with {answer.describe()}, where Paigo answers a JSON object with a "message"'


class ClientCredentialsToken:
    """Caches the bearer token; one fetch at a time; refreshes before it expires.

    When a fetch fails, or the API refuses a token fetched to replace a refused one, tokens
    are held back: the failure is answered again without a request for ``failure_hold``
    seconds, doubling with each failure in a row up to five minutes. So neither a batch of
    records nor an API that answers 401 to every token turns into a burst of token requests.
    """

    def __init__(self, cfg: PaigoBackend, client: httpx.Client, metrics: Metrics, clock: Clock | None = None,
                 failure_hold: float = 5.0):
        self._cfg = cfg
        self._client = client
        self._metrics = metrics
        self._timeout = cfg.timeout.total_seconds()
        self._monotonic = (clock or SystemClock()).monotonic
        self._failure_hold = failure_hold
        self._host = httpx.URL(cfg.token_url).host
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._replacing_refused = False  # the token (being) fetched replaces one the API answered 401 to
        self._hold: tuple[float, TokenUnavailable] | None = None
        self._failures = 0  # in a row; each hold waits twice as long as the one before
        self.fetches = 0

    def get(self) -> str:
        with self._lock:
            now = self._monotonic()
            if self._hold is not None and now < self._hold[0]:
                raise self._hold[1]
            if self._token is None or now >= self._refresh_at:
                try:
                    self._token, lifetime = self._fetch()
                except TokenUnavailable as exc:
                    raise self._hold_back(exc.outcome) from exc
                # renew a little before expiry: 10% of the lifetime, at most five minutes
                self._refresh_at = self._monotonic() + lifetime - min(300.0, lifetime / 10)
                self._hold = None
            return self._token

    def after_401(self, token: str) -> RetryLater | None:
        """The API answered 401 to ``token``. None: fetch a new token and try once more;
        else the outcome for the record (the API refused the replacement too: held back)."""
        with self._lock:
            if token != self._token:  # another request's 401 already replaced it
                held = self._hold is not None and self._monotonic() < self._hold[0]
                return self._hold[1].outcome if held and self._hold else None
            self._token = None
            if not self._replacing_refused:
                self._replacing_refused = True
                return None
            api = httpx.URL(self._cfg.url).host
            return self._hold_back(RetryLater(
                f"{api} answered 401 to a token {self._host} had just issued: check backend.client_id, "
                f"the client secret and backend.audience", status=401, alert=True)).outcome

    def accepted(self, token: str) -> None:
        """The API answered ``token`` with anything but 401: the credentials work."""
        if self._replacing_refused or self._failures:
            with self._lock:
                if token == self._token:
                    self._replacing_refused = False
                    self._failures = 0

    def _hold_back(self, outcome: RetryLater) -> TokenUnavailable:
        """Answer ``outcome`` for a while, without requests; the caller holds the lock."""
        wait = max(min(HOLD_MAX, self._failure_hold * 2 ** min(self._failures, 16)), outcome.retry_after or 0.0)
        self._failures += 1
        held = TokenUnavailable(replace(outcome, retry_after=wait))
        self._hold = (self._monotonic() + wait, held)
        return held

    def _fetch(self) -> tuple[str, float]:
        body = {
            "audience": self._cfg.audience,
            "grant_type": "client_credentials",
            "client_id": self._cfg.client_id,
            "client_secret": self._cfg.secret(),
        }
        try:
            answer = send(self._client, self._client.build_request("POST", self._cfg.token_url, json=body),
                          self._timeout, self._metrics)
        except httpx.HTTPError as exc:
            failure = transport_failure(exc, self._timeout)
            raise TokenUnavailable(replace(failure, reason=f"token endpoint {self._host}: {failure.reason}")) from exc
        if 300 <= answer.status < 400:
            raise TokenUnavailable(redirected(answer, "backend.token_url"))
        if not 200 <= answer.status < 300:
            retryable = answer.status in (408, 429) or answer.status >= 500
            raise TokenUnavailable(RetryLater(
                f"token endpoint {self._host} answered {answer.status} with {answer.describe()}",
                status=answer.status, retry_after=parse_retry_after(answer.headers.get("Retry-After")),
                alert=not retryable))
        token, lifetime = token_from(answer, self._host)
        self.fetches += 1
        self._metrics.token_refreshes.labels("backend").inc()
        log.info("token fetched", token_url=self._cfg.token_url, expires_in=lifetime)
        return token, lifetime


class PaigoSink(SinkDefaults):
    """One record per request, ``max_in_flight`` at once; the token is fetched through the same client."""

    name = "paigo"
    max_batch = 1
    array_body = False

    def __init__(self, cfg: PaigoBackend, client: httpx.Client, metrics: Metrics, clock: Clock | None = None):
        self.timeout = cfg.timeout.total_seconds()
        self.max_in_flight = cfg.max_in_flight
        self.token = ClientCredentialsToken(cfg, client, metrics, clock)
        self._url = httpx.URL(f"{cfg.url}/usage")
        self._headers = {"Content-Type": "application/json"}

    def element(self, record: UsageRecord) -> dict[str, Any]:
        return {
            "dimensionId": record.dimension_id,
            "customerId": record.customer_id,
            "timestamp": format_timestamp(record.timestamp),
            "recordValue": format_decimal(record.value),
            "metadata": {**record.metadata, "recordId": record.record_id},
        }

    def render(self, elements: Sequence[bytes]) -> httpx.Request:
        (body,) = elements
        return request("POST", self._url, {**self._headers, "Authorization": f"Bearer {self.token.get()}"}, body)

    def classify(self, answer: Answer, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain]:
        assert answer.request is not None
        token = answer.request.headers["Authorization"].removeprefix("Bearer ")
        outcome: Outcome | SendAgain
        if answer.status == 401:
            held = self.token.after_401(token)
            outcome = SendAgain() if held is None else held
        else:
            self.token.accepted(token)
            outcome = classify(answer, documented_success)
        return [outcome] * len(records)

    def close(self) -> None:
        """Nothing to release: the client is the composition root's."""
