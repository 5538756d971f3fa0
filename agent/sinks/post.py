"""The sinks whose every request POSTs its body to one URL with the same headers; among them the
usage APIs that take a batch as ``{"events": [...]}`` with a bearer token (Togai, Lago, Orb)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import httpx

from agent.settings import Secret
from agent.sinks.base import SinkDefaults, events_body
from agent.sinks.transport import request


class PostSink(SinkDefaults):
    """Each request: ``POST url`` with ``headers`` and the body of its elements."""

    def __init__(self, url: httpx.URL, headers: dict[str, str], timeout: timedelta):
        self._url = url
        self._headers = headers
        self.timeout = timeout.total_seconds()

    def render(self, elements: Sequence[bytes]) -> httpx.Request:
        return request("POST", self._url, self._headers, self.body(elements))


class EventsSink(PostSink):
    """Batches of at most ``batch_size`` events as ``{"events": [...]}``, ``Authorization: Bearer <token>``."""

    array_body = True
    max_in_flight = 1  # batches go out one after the other, in lease order
    body = staticmethod(events_body)  # also what ``once --dry-run`` prints

    def __init__(self, url: httpx.URL, token: Secret, batch_size: int, timeout: timedelta):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token.get_secret_value()}"}
        super().__init__(url, headers, timeout)
        self.max_batch = batch_size
