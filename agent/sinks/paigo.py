"""Paigo: OAuth2 client credentials, then one ``POST {url}/usage`` per record.

Token: ``POST token_url`` with JSON ``{audience, grant_type: client_credentials,
client_id, client_secret}``; the answer's ``access_token`` is used as
``Authorization: Bearer`` until shortly before ``expires_in`` runs out, and fetched again
once if the API answers 401. Records go out concurrently over one pooled client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx
import structlog

from agent import __version__
from agent.config import PaigoBackend
from agent.convert import UsageRecord, format_decimal, format_timestamp
from agent.sinks.base import RESPONSE_HOOKS, Outcome, RetryLater, classify, json_bytes, transport_failure
from agent.telemetry import TOKEN_REFRESHES

log = structlog.get_logger("agent.sinks.paigo")


class TokenUnavailable(Exception):
    def __init__(self, outcome: RetryLater):
        super().__init__(outcome.reason)
        self.outcome = outcome


class ClientCredentialsToken:
    """Caches the bearer token; one fetch at a time; refreshes before it expires.

    A failed fetch is remembered for ``failure_hold`` seconds, so a batch of records does
    not turn into a burst of token requests against an identity provider that said no.
    """

    def __init__(
        self,
        cfg: PaigoBackend,
        client: httpx.Client,
        monotonic: Callable[[], float] = time.monotonic,
        failure_hold: float = 5.0,
    ):
        self._cfg = cfg
        self._client = client
        self._monotonic = monotonic
        self._failure_hold = failure_hold
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self._failure: tuple[float, TokenUnavailable] | None = None
        self.fetches = 0

    def get(self) -> str:
        with self._lock:
            if self._token is None or self._monotonic() >= self._refresh_at:
                if self._failure is not None and self._monotonic() < self._failure[0]:
                    raise self._failure[1]
                try:
                    self._fetch()
                except TokenUnavailable as exc:
                    self._failure = (self._monotonic() + self._failure_hold, exc)
                    raise
                self._failure = None
            assert self._token is not None
            return self._token

    def invalidate(self, token: str) -> None:
        """Drop ``token`` unless another thread already replaced it."""
        with self._lock:
            if self._token == token:
                self._token = None

    def _fetch(self) -> None:
        body = {
            "audience": self._cfg.audience,
            "grant_type": "client_credentials",
            "client_id": self._cfg.client_id,
            "client_secret": self._cfg.secret(),
        }
        try:
            response = self._client.post(self._cfg.token_url, json=body)
        except httpx.HTTPError as exc:
            raise TokenUnavailable(transport_failure(exc)) from exc
        outcome = classify(response)
        if response.status_code != 200:
            reason = f"token endpoint answered {response.status_code}"
            auth = 400 <= response.status_code < 500 and response.status_code not in (408, 429)
            retry_after = outcome.retry_after if isinstance(outcome, RetryLater) else None
            raise TokenUnavailable(RetryLater(reason, status=response.status_code, retry_after=retry_after, alert=auth))
        try:
            payload = response.json()
            token = payload["access_token"]
            lifetime = float(payload.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError) as exc:
            raise TokenUnavailable(RetryLater(f"token endpoint answered without access_token ({exc})", alert=True)) from exc
        self._token = token
        # renew a little before expiry: 10% of the lifetime, at most five minutes
        self._refresh_at = self._monotonic() + lifetime - min(300.0, lifetime / 10)
        self.fetches += 1
        TOKEN_REFRESHES.labels("backend").inc()
        log.info("token fetched", token_url=self._cfg.token_url, expires_in=lifetime)


class PaigoSink:
    name = "paigo"

    def __init__(self, cfg: PaigoBackend, monotonic: Callable[[], float] = time.monotonic):
        self._cfg = cfg
        timeout = cfg.timeout.total_seconds()
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=cfg.max_in_flight, max_keepalive_connections=cfg.max_in_flight),
            headers={"User-Agent": f"usage-agent/{__version__}"},
            event_hooks=RESPONSE_HOOKS,
        )
        self.token = ClientCredentialsToken(cfg, self._client, monotonic)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_in_flight, thread_name_prefix="paigo-send")
        self.batch_size = cfg.max_in_flight * 16  # outcomes are settled as they arrive, not per batch

    def render(self, record: UsageRecord) -> dict[str, Any]:
        return {
            "dimensionId": record.dimension_id,
            "customerId": record.customer_id,
            "timestamp": format_timestamp(record.timestamp),
            "recordValue": format_decimal(record.value),
            "metadata": {**record.metadata, "recordId": record.record_id},
        }

    def bodies(self, records: Sequence[UsageRecord]) -> list[bytes]:
        return [json_bytes(self.render(record)) for record in records]  # one request per record

    def deliver(
        self, records: Sequence[UsageRecord], stop: threading.Event | None = None
    ) -> Iterator[tuple[UsageRecord, Outcome]]:
        try:
            self.token.get()
        except TokenUnavailable as exc:  # no token, no point in sending any of them
            for record in records:
                yield record, exc.outcome
            return
        futures = {self._pool.submit(self._send, record): record for record in records}
        try:
            for future in as_completed(futures):
                if stop is not None and stop.is_set():
                    for waiting in futures:
                        waiting.cancel()  # only those not started; running sends finish
                if not future.cancelled():
                    yield futures[future], future.result()
        finally:
            for waiting in futures:
                waiting.cancel()

    def _post(self, token: str, body: bytes) -> httpx.Response:
        return self._client.post(f"{self._cfg.url}/usage", content=body, headers={
            "Authorization": f"Bearer {token}", "Content-Type": "application/json"})

    def _send(self, record: UsageRecord) -> Outcome:
        body = json_bytes(self.render(record))
        try:
            token = self.token.get()
            response = self._post(token, body)
            if response.status_code == 401:
                self.token.invalidate(token)
                response = self._post(self.token.get(), body)
        except TokenUnavailable as exc:
            return exc.outcome
        except httpx.HTTPError as exc:
            return transport_failure(exc)
        return classify(response)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
