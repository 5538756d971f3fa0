"""The one HTTP client every sink sends through, and the one bounded way to send a request.

``http_client`` builds it (the composition root calls it once): ``agent.sinks.wire``
transports (a pool on ``http.client`` whose sockets hold every request to a total deadline,
connect, write, headers and body together, whatever the peer does), one per proxy of the
environment, redirects not followed, answers not compressed. ``send`` hands a request to the
transport for its URL and reads at most ``ANSWER_CAP`` bytes of the answer before closing
the connection. Unit tests pass ``transport=httpx.MockTransport(handler)``.
"""

from __future__ import annotations

import time

import httpx
from httpx._utils import get_environment_proxies  # the rules httpx itself applies to HTTPS_PROXY, NO_PROXY

from agent import __version__
from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.sinks.base import ANSWER_CAP, Answer
from agent.sinks.wire import DEADLINE, WireTransport

# on every request: an answer compressed could inflate far past the cap of a capped read
DEFAULT_HEADERS = {"User-Agent": f"usage-agent/{__version__}", "Accept-Encoding": "identity"}


def http_client(timeout: float, connections: int = 8, transport: httpx.BaseTransport | None = None) -> httpx.Client:
    """The client every request of the agent goes through: ``connections`` kept alive,
    redirects not followed. ``transport`` replaces the network (unit tests: MockTransport)."""
    mounts: dict[str, httpx.BaseTransport | None] = {}
    if transport is None:
        transport = WireTransport(connections, timeout)
        # the environment's proxies (HTTPS_PROXY, NO_PROXY …), mounted as httpx mounts them for its own transport
        mounts = {pattern: WireTransport(connections, timeout, _http_proxy(pattern, proxy)) if proxy else None
                  for pattern, proxy in get_environment_proxies().items()}
    return httpx.Client(timeout=httpx.Timeout(timeout), transport=transport, mounts=mounts,
                        headers=DEFAULT_HEADERS, follow_redirects=False)


def _http_proxy(pattern: str, proxy: str) -> httpx.URL:
    """A proxy of the environment the transport can speak to: plain HTTP (CONNECT for https origins)."""
    url = httpx.URL(proxy)
    if url.scheme != "http":
        raise ConfigError("the environment", [(f"proxy for {pattern} (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY)",
                                                f"{url.scheme}://{url.host}:{url.port or ''}: only http:// proxies "
                                                "are supported")])
    return url


def send(client: httpx.Client, request: httpx.Request, timeout: float, metrics: Metrics,
         cap: int = ANSWER_CAP) -> Answer:
    """Send ``request`` and read at most ``cap`` bytes of its answer, all within ``timeout``
    seconds in total; every answer is counted by status, every failure by kind.

    Raises httpx.HTTPError when no answer came in time or the connection failed.
    """
    request.extensions[DEADLINE] = time.monotonic() + timeout
    # the transport for the URL (its proxy or none) without the client's per-request work: the
    # request already carries every header, and redirects, cookies and auth are not the agent's
    transport = client._transport_for_url(request.url)
    try:
        if isinstance(transport, WireTransport):  # the answer's bytes without an httpx.Response around them
            reply = transport.exchange(request)
            status, headers, chunks, close = reply.status, httpx.Headers(reply.headers), iter(reply), reply.close
        else:
            response = transport.handle_request(request)
            status, headers, close = response.status_code, response.headers, response.close
            # raw bytes, never decoded: a capped read of a compressed answer could inflate far past the cap
            chunks = iter([response.content]) if response.is_stream_consumed else response.iter_raw()  # a fake's
        metrics.backend_responses.labels(str(status)).inc()
        try:
            body = bytearray()
            complete = True
            for chunk in chunks:
                body += chunk
                if len(body) > cap:
                    complete = False  # closing before the end drops the connection: it is not reused
                    break
        finally:
            close()
    except httpx.HTTPError as exc:
        metrics.backend_responses.labels("timeout" if isinstance(exc, httpx.TimeoutException)
                                         else "connection_error").inc()
        raise
    return Answer(status, headers, bytes(body[:cap]), complete, str(request.url), request)


def request(method: str, url: httpx.URL | str, headers: dict[str, str], content: bytes) -> httpx.Request:
    """A request with the agent's default headers, as ``httpx.Request(content=...)`` builds it
    (Host first, Content-Length last) but with its headers normalised once, not three times:
    Paigo takes one per record."""
    url = httpx.URL(url)
    host = [("Host", url.netloc.decode("ascii"))]
    if not content and method in ("POST", "PUT", "PATCH"):
        host.append(("Content-Length", "0"))  # where httpx puts it for an empty body
    length = [("Content-Length", str(len(content)))] if content else []
    built = httpx.Request(method, url, headers=[*host, *{**DEFAULT_HEADERS, **headers}.items(), *length],
                          stream=httpx.ByteStream(content))
    built.read()  # holds the body, as content= does
    return built
