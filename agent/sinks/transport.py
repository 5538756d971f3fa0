"""The one HTTP client every sink sends through, and the one bounded way to send a request.

``http_client`` builds it (the composition root calls it once): a pool, redirects not
followed, answers not compressed, the environment's proxies, and sockets that hold every
request to a total deadline (connect, write, headers and body together) whatever the peer
does. ``send`` reads at most ``ANSWER_CAP`` bytes of an answer before closing the connection.
Unit tests pass ``transport=httpx.MockTransport(handler)``.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx
from httpx._utils import get_environment_proxies  # the rules httpx itself applies to HTTPS_PROXY, NO_PROXY

from agent import __version__
from agent.metrics import Metrics
from agent.sinks.base import ANSWER_CAP, Answer

# on every request: an answer compressed could inflate far past the cap of a capped read
DEFAULT_HEADERS = {"User-Agent": f"usage-agent/{__version__}", "Accept-Encoding": "identity"}

_DEADLINE: ContextVar[float | None] = ContextVar("request_deadline", default=None)  # monotonic


def _within(timeout: float | None, expired: type[Exception]) -> float | None:
    """A socket operation's timeout, cut to what is left of the request's total deadline."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """Every read and write waits at most until the deadline of the request it serves, so a
    peer that trickles bytes cannot stretch a request past it.

    Writes are held until the first read (or 64 KiB): a request's head and body leave in one
    send, which wakes the peer once instead of twice.
    """

    _WRITE_SLICE = 64 * 1024  # each slice gets what is left of the deadline, not the whole timeout

    def __init__(self, inner: httpcore.NetworkStream):
        self._inner = inner
        self._held = bytearray()

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            self._flush(timeout)
        return self._inner.read(max_bytes, _within(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._held += buffer
        if len(self._held) >= self._WRITE_SLICE:
            self._flush(timeout)

    def _flush(self, timeout: float | None) -> None:
        data, self._held = bytes(self._held), bytearray()
        for start in range(0, len(data), self._WRITE_SLICE):
            self._inner.write(data[start:start + self._WRITE_SLICE], _within(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._held.clear()
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        if self._held:  # a proxy's CONNECT goes out before the handshake
            self._flush(timeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _within(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _within(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _within(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (its proxies, exception mapping and streams) over sockets that
    honour each request's total deadline."""

    def __init__(self, limits: httpx.Limits, proxy: str | None = None):
        super().__init__(limits=limits, proxy=proxy)
        # httpx takes no network backend yet (encode/httpx#3749): the pool it built gets ours
        self._pool._network_backend = _DeadlineBackend()  # type: ignore[union-attr]


def http_client(timeout: float, connections: int = 8, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The client every request of the agent goes through: ``connections`` kept alive,
    redirects not followed. ``transport`` replaces the network (unit tests: MockTransport)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    mounts: dict[str, httpx.BaseTransport | None] = {}
    if transport is None:
        transport = _DeadlineTransport(limits)
        # the environment's proxies (HTTPS_PROXY, NO_PROXY …), mounted as httpx mounts them for its own transport
        mounts = {pattern: _DeadlineTransport(limits, proxy) if proxy else None
                  for pattern, proxy in get_environment_proxies().items()}
    return httpx.Client(timeout=httpx.Timeout(timeout), transport=transport, mounts=mounts,
                        headers=DEFAULT_HEADERS, follow_redirects=False)


def send(client: httpx.Client, request: httpx.Request, timeout: float, metrics: Metrics) -> Answer:
    """Send ``request`` and read its answer, all within ``timeout`` seconds in total; every
    answer is counted by status, every failure by kind.

    Raises httpx.HTTPError when no answer came in time or the connection failed.
    """
    token = _DEADLINE.set(time.monotonic() + timeout)
    try:
        response = client.send(request, stream=True)
        metrics.backend_responses.labels(str(response.status_code)).inc()
        try:
            body = bytearray()
            complete = True
            # raw bytes, never decoded: a capped read of a compressed answer could inflate far past the cap
            chunks = [response.content] if response.is_stream_consumed else response.iter_raw()  # read already: a fake
            for chunk in chunks:
                body += chunk
                if len(body) > ANSWER_CAP:
                    complete = False  # closing before the end drops the connection: it is not reused
                    break
        finally:
            response.close()
    except httpx.HTTPError as exc:
        metrics.backend_responses.labels("timeout" if isinstance(exc, httpx.TimeoutException)
                                         else "connection_error").inc()
        raise
    finally:
        _DEADLINE.reset(token)
    return Answer(response.status_code, response.headers, bytes(body[:ANSWER_CAP]), complete, str(request.url),
                  request)


def request(method: str, url: httpx.URL | str, headers: dict[str, str], content: bytes) -> httpx.Request:
    """A request with the agent's default headers; built directly (no client merging), as
    cheaply as httpx allows, since Paigo takes one per record."""
    return httpx.Request(method, url, headers={**DEFAULT_HEADERS, **headers}, content=content)
