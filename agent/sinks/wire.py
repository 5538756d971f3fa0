"""An ``httpx.BaseTransport`` on the standard library's ``http.client``: the same requests and
answers as httpx's own transport for about a third of its CPU, which is what limits delivery
when every record is a request of its own (Paigo).

Every socket operation (connect, TLS handshake, proxy tunnel, each write and each read) waits
at most until the request's total deadline, so a peer that trickles bytes cannot stretch a
request past it. Connections are kept alive per origin, at most ``connections`` in use at once;
TLS verifies as httpx does; an ``https`` origin behind a proxy is tunnelled with CONNECT, an
``http`` one is asked for by absolute URI. No redirects are followed and nothing is decoded:
the answer's bytes are streamed as they come, and an answer closed before its end drops its
connection.
"""

from __future__ import annotations

import base64
import http.client
import io
import select
import socket
import ssl
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

import httpx

DEADLINE = "usage_agent.deadline"  # request extension: the time.monotonic() by which the exchange ends
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024


def _left(deadline: float, expired: type[httpx.TimeoutException]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the request's total deadline passed")
    return left


class _Socket:
    """A socket whose every operation ends by its connection's deadline; http.client holds it
    as its ``sock`` and reads through ``makefile``."""

    def __init__(self, sock: socket.socket, connection: _Connection):
        self.sock = sock
        self._connection = connection
        self._held: list[bytes] = []
        self._readers = 0
        self._closed = False

    def arm(self, expired: type[httpx.TimeoutException]) -> None:
        self.sock.settimeout(_left(self._connection.deadline, expired))

    def sendall(self, data: bytes) -> None:
        self._held.append(data)  # http.client writes head and body apart: they leave together, waking the peer once
        if len(data) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        self.arm(httpx.WriteTimeout)  # sendall's timeout bounds the whole send, not each part of it
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise httpx.WriteTimeout(f"writing the request: {exc}") from exc
        except OSError as exc:
            raise httpx.WriteError(f"writing the request: {exc}") from exc

    def makefile(self, mode: str) -> io.BufferedReader:
        self._readers += 1
        return io.BufferedReader(_Reader(self))

    def reader_closed(self) -> None:
        self._readers -= 1
        if self._closed and not self._readers:
            self.sock.close()

    def close(self) -> None:
        self._closed = True  # as a socket does: the answer being read keeps it open until it is closed
        if not self._readers:
            self.sock.close()


class _Reader(io.RawIOBase):
    def __init__(self, owner: _Socket):
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._owner.flush()
        self._owner.arm(httpx.ReadTimeout)  # each read gets what is left of the deadline, not a fresh timeout
        try:
            return self._owner.sock.recv_into(buffer)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"reading the answer: {exc}") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the answer: {exc}") from exc

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._owner.reader_closed()


class _Connection(http.client.HTTPConnection):
    """One connection to an origin (or to the proxy in front of it), TLS when ``tls`` is set."""

    deadline = 0.0

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, server_hostname: str):
        super().__init__(host, port)
        self._tls = tls
        self._server_hostname = server_hostname

    def connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), _left(self.deadline, httpx.ConnectTimeout))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = _Socket(sock, self)
            if self._tunnel_host:
                self._tunnel()
            if self._tls is not None:
                sock.settimeout(_left(self.deadline, httpx.ConnectTimeout))  # the handshake's total, as sendall's
                self.sock = _Socket(self._tls.wrap_socket(sock, server_hostname=self._server_hostname), self)
        except httpx.TransportError:
            raise
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port}: {exc}") from exc
        except OSError as exc:
            kind = httpx.ProxyError if self._tunnel_host else httpx.ConnectError
            raise kind(f"connecting to {self.host}:{self.port}: {exc}") from exc
        except http.client.HTTPException as exc:  # a proxy's malformed answer to CONNECT
            raise httpx.ProxyError(f"tunnel through {self.host}:{self.port}: {exc!r}") from exc

    def stale(self) -> bool:
        """An idle connection with something to read: the peer closed it (or sent what it should not)."""
        sock = self.sock.sock if isinstance(self.sock, _Socket) else None
        return sock is None or bool(select.select([sock], [], [], 0)[0])


def _proxy_authorization(proxy: httpx.URL) -> dict[str, str]:
    if not proxy.username:
        return {}
    token = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
    return {"Proxy-Authorization": f"Basic {token}"}


class WireTransport(httpx.BaseTransport):
    """Requests over ``http.client`` connections: direct, or through ``proxy`` when given."""

    def __init__(self, connections: int, timeout: float, proxy: str | httpx.URL | None = None,
                 ssl_context: ssl.SSLContext | None = None):
        self._tls = ssl_context or httpx.create_ssl_context()  # certifi's roots, SSL_CERT_FILE: httpx's verification
        self._timeout = timeout  # for a request sent without a DEADLINE
        self._proxy = httpx.URL(proxy) if proxy is not None else None
        self._slots = threading.BoundedSemaphore(connections)
        self._keep = connections
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = defaultdict(deque)
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"{url.scheme!r} is not http or https: {url}")
        deadline = request.extensions.get(DEADLINE) or time.monotonic() + self._timeout
        if not self._slots.acquire(timeout=_left(deadline, httpx.PoolTimeout)):
            raise httpx.PoolTimeout("no connection came free before the request's deadline")
        origin = (url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme])
        connection = self._checkout(origin)
        connection.deadline = deadline
        try:
            if connection.sock is None:
                connection.connect()
            self._write(connection, request, origin)
            answer = connection.getresponse()
        except BaseException as exc:
            connection.close()
            self._slots.release()
            if isinstance(exc, (http.client.HTTPException, ConnectionError)):
                raise httpx.RemoteProtocolError(f"{url.host} answered no HTTP: {exc!r}") from exc
            if isinstance(exc, ValueError):  # http.client refuses a header it cannot send (a line break)
                raise httpx.LocalProtocolError(f"cannot send the request: {exc}") from exc
            raise
        return httpx.Response(answer.status, headers=answer.getheaders(), stream=_Body(self, origin, connection, answer),
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": answer.reason.encode("latin-1")})

    def _write(self, connection: _Connection, request: httpx.Request, origin: tuple[str, str, int]) -> None:
        absolute = self._proxy is not None and origin[0] == "http"  # a proxy is asked for the whole URL
        target = str(request.url) if absolute else request.url.raw_path.decode("ascii")
        connection.putrequest(request.method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in request.headers.raw:
            connection.putheader(name, value)
        if absolute:
            for name, text in _proxy_authorization(self._proxy).items():  # type: ignore[arg-type]
                connection.putheader(name, text)
        connection.endheaders(request.read() or None)  # a small body leaves with the head, in one send

    def _checkout(self, origin: tuple[str, str, int]) -> _Connection:
        with self._lock:
            idle = self._idle[origin]
            while idle:
                connection = idle.pop()
                if not connection.stale():
                    return connection
                connection.close()
        scheme, host, port = origin
        tls = self._tls if scheme == "https" else None
        if self._proxy is None:
            return _Connection(host, port, tls, host)
        proxy = self._proxy
        connection = _Connection(proxy.host, proxy.port or _DEFAULT_PORTS[proxy.scheme], tls, host)
        if tls is not None:
            connection.set_tunnel(host, port, _proxy_authorization(proxy))
        return connection

    def checkin(self, origin: tuple[str, str, int], connection: _Connection, reusable: bool) -> None:
        if reusable:
            with self._lock:
                idle = self._idle[origin]
                if len(idle) < self._keep:
                    idle.append(connection)
                    connection = None  # type: ignore[assignment]
        if connection is not None:
            connection.close()
        self._slots.release()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, defaultdict(deque)
        for connections in idle.values():
            for connection in connections:
                connection.close()


class _Body(httpx.SyncByteStream):
    """An answer's bytes as they arrive; closed after its end, the connection goes back to the pool."""

    def __init__(self, transport: WireTransport, origin: tuple[str, str, int], connection: _Connection,
                 answer: http.client.HTTPResponse):
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._answer = answer

    def __iter__(self) -> Iterator[bytes]:
        try:
            while chunk := self._answer.read1(_CHUNK):
                yield chunk
        except http.client.HTTPException as exc:  # the peer ended the body early, or sent a bad chunk
            raise httpx.RemoteProtocolError(f"the answer's body: {exc!r}") from exc

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        answer = self._answer
        ended = answer.isclosed() or (answer.length == 0 and not answer.chunked)
        reusable = ended and not answer.will_close
        answer.close()
        self._transport.checkin(self._origin, connection, reusable)
