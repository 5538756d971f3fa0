"""An ``httpx.BaseTransport`` on plain sockets: the same requests and answers as httpx's own
transport for a fraction of its CPU, which is what limits delivery when every record is a
request of its own (Paigo). ``http.client`` connects (and tunnels through a proxy); the request
leaves as one write and the answer is parsed here, its head from one buffer.

Every socket operation (connect, TLS handshake, proxy tunnel, each write and each read) waits
at most until the request's total deadline, so a peer that trickles bytes cannot stretch a
request past it. Connections are kept alive per origin, at most ``connections`` in use at once;
TLS verifies as httpx does; an ``https`` origin behind a proxy is tunnelled with CONNECT, an
``http`` one is asked for by absolute URI. No redirects are followed and nothing is decoded:
the answer's bytes are streamed as they come, and an answer closed before its end drops its
connection. An answer's head is at most ``HEAD_MAX`` bytes in at most ``HEADERS_MAX`` lines.
"""

from __future__ import annotations

import base64
import http.client
import io
import re
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
HEAD_MAX = 64 * 1024  # bytes of an answer's status line and headers
HEADERS_MAX = 100  # header lines of an answer (http.client's limit)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024
# what http.client refuses to send: a header name or value that would split the head, a target with spaces
_LEGAL_NAME = re.compile(rb"\A[^:\s][^:\r\n]*\Z")
_ILLEGAL_VALUE = re.compile(rb"\n(?![ \t])|\r(?![ \t\n])")
_ILLEGAL_TARGET = re.compile("[\x00-\x20\x7f]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[01])[ \t]+([1-9][0-9]{2})(?:[ \t](.*))?")
_LENGTH = re.compile(rb"[0-9]{1,19}")  # bounded, as _CHUNK_SIZE: int() of 5,000 digits raises ValueError
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


def _left(deadline: float, expired: type[httpx.TimeoutException]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the request's total deadline passed")
    return left


class _Socket:
    """A socket whose every operation ends by its connection's deadline; http.client holds it
    as its ``sock`` (and reads a proxy's answer to CONNECT through ``makefile``)."""

    def __init__(self, sock: socket.socket, connection: _Connection):
        self.sock = sock
        self._connection = connection
        self._readers = 0
        self._closed = False

    def arm(self, expired: type[httpx.TimeoutException]) -> None:
        self.sock.settimeout(_left(self._connection.deadline, expired))

    def sendall(self, data: bytes) -> None:
        self.arm(httpx.WriteTimeout)  # sendall's timeout bounds the whole send, not each part of it
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise httpx.WriteTimeout(f"writing the request: {exc}") from exc
        except OSError as exc:
            raise httpx.WriteError(f"writing the request: {exc}") from exc

    def recv(self, size: int) -> bytes:
        self.arm(httpx.ReadTimeout)  # each read gets what is left of the deadline, not a fresh timeout
        try:
            return self.sock.recv(size)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(f"reading the answer: {exc}") from exc
        except OSError as exc:
            raise httpx.ReadError(f"reading the answer: {exc}") from exc

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
        data = self._owner.recv(len(buffer))
        buffer[:len(data)] = data
        return len(data)

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


def _head(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers as http.client writes them; LocalProtocolError for what it refuses."""
    try:
        if _ILLEGAL_TARGET.search(method) or _ILLEGAL_TARGET.search(target):
            raise ValueError(f"{method!r} {target!r} is not a request line")
        lines = [f"{method} {target} HTTP/1.1".encode("ascii")]
        for name, value in headers:
            if not _LEGAL_NAME.match(name) or _ILLEGAL_VALUE.search(value):
                raise ValueError(f"header {name!r} cannot carry {value!r}")
            lines.append(name + b": " + value)
    except ValueError as exc:  # UnicodeError too
        raise httpx.LocalProtocolError(f"cannot send the request: {exc}") from exc
    lines += (b"", b"")
    return b"\r\n".join(lines)


def _protocol_error(what: str) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(f"the peer answered no HTTP: {what}")


class _Reply(httpx.SyncByteStream):
    """One answer: its status and headers read at once, its body as it comes (by Content-Length,
    chunked, or up to the close); closed, its connection goes back to the pool if the body ended."""

    def __init__(self, transport: WireTransport, origin: tuple[str, str, int], connection: _Connection,
                 method: str):
        self._transport = transport
        self._origin = origin
        self._connection: _Connection | None = connection
        self._sock: _Socket = connection.sock  # type: ignore[assignment]
        self._buffer = bytearray()
        while True:
            self._parse(self._read_head(), method)
            if not 100 <= self.status < 200 or self.status == 101:  # 100, 102, 103 … precede the answer
                break
        self.ended = self._left == 0 and not self._chunked

    def _read_head(self) -> list[bytes]:
        scanned = 0  # where the search for the empty line goes on: a trickled head is not searched again
        while (end := _HEAD_END.search(self._buffer, scanned)) is None:
            if len(self._buffer) > HEAD_MAX:
                raise _protocol_error(f"a head longer than {HEAD_MAX} bytes")
            scanned = max(0, len(self._buffer) - 3)
            if not self._fill():
                raise _protocol_error("the connection closed before a whole head" if self._buffer
                                      else "the connection closed without an answer")
        if end.start() > HEAD_MAX:
            raise _protocol_error(f"a head longer than {HEAD_MAX} bytes")
        head = bytes(self._buffer[:end.start()])
        del self._buffer[:end.end()]
        return _LINE_END.split(head)

    def _parse(self, lines: list[bytes], method: str) -> None:
        if (status_line := _STATUS_LINE.fullmatch(lines[0])) is None:
            raise _protocol_error(f"status line {lines[0][:80]!r}")
        self.status = int(status_line[2])
        self.reason = (status_line[3] or b"").strip()
        if len(lines) > HEADERS_MAX + 1:
            raise _protocol_error(f"more than {HEADERS_MAX} headers")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t") and headers:  # an obsolete folded continuation line
                name, value = headers.pop()
                headers.append((name, value + b" " + line.strip()))
                continue
            name, colon, value = line.partition(b":")
            if colon:
                headers.append((name.strip(), value.strip()))
        self.headers = headers
        found = {name.lower(): value for name, value in reversed(headers)}  # the first of each, as http.client
        connection = found.get(b"connection", b"").lower()
        kept = b"keep-alive" in connection or b"keep-alive" in found
        self.will_close = not kept if status_line[1] == b"HTTP/1.0" else b"close" in connection
        lengths = {part.strip() for name, value in headers if name.lower() == b"content-length"
                   for part in value.split(b",")}  # "5, 5" is one length; two different ones are none
        if len(lengths) > 1 or not all(_LENGTH.fullmatch(length) for length in lengths):
            raise _protocol_error(f"Content-Length {b', '.join(sorted(lengths))[:80]!r}")
        encoding = found.get(b"transfer-encoding")
        no_body = method == "HEAD" or self.status in (204, 304) or self.status < 200  # whatever the headers say
        self._chunked = not no_body and encoding is not None and encoding.lower() == b"chunked"
        self._left: int | None = 0 if no_body else None if self._chunked or not lengths else int(min(lengths))
        # not reused: framed two ways, a body up to the close, or another protocol from here on (101)
        self.will_close |= (bool(lengths) and encoding is not None) or (self._left is None and not self._chunked) \
            or self.status == 101

    def _fill(self) -> bool:
        data = self._sock.recv(_CHUNK)
        self._buffer += data
        return bool(data)

    def _take(self, most: int | None) -> bytes:
        data = bytes(self._buffer[:most])
        del self._buffer[:len(data)]
        return data

    def read1(self) -> bytes:
        """The next bytes of the body as they come; b"" at its end."""
        if self.ended:
            return b""
        if self._chunked:
            return self._read_chunk()
        if not self._buffer and not self._fill():
            if self._left is not None:
                raise httpx.RemoteProtocolError(f"the answer's body ended {self._left} bytes early")
            self.ended = True
            return b""
        data = self._take(self._left)
        if self._left is not None:
            self._left -= len(data)
            self.ended = self._left == 0
        return data

    def _line(self) -> bytes:
        scanned = 0
        while (end := self._buffer.find(b"\n", scanned)) < 0:
            if len(self._buffer) > HEAD_MAX:
                raise httpx.RemoteProtocolError("the answer's body: a chunk line too long")
            scanned = len(self._buffer)
            if not self._fill():
                raise httpx.RemoteProtocolError("the answer's body ended inside a chunk")
        return self._take(end + 1).rstrip(b"\r\n")

    def _read_chunk(self) -> bytes:
        if not self._left:  # at a chunk's size line
            if self._left == 0 and self._line():  # the CRLF after the previous chunk's data, and nothing more
                raise httpx.RemoteProtocolError("the answer's body: a chunk longer than its size")
            size = self._line().split(b";", 1)[0].strip()
            if not _CHUNK_SIZE.fullmatch(size):
                raise httpx.RemoteProtocolError(f"the answer's body: a bad chunk size {size[:20]!r}")
            self._left = int(size, 16)
            if self._left == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                self.ended = True
                return b""
        if not self._buffer and not self._fill():
            raise httpx.RemoteProtocolError("the answer's body ended inside a chunk")
        data = self._take(self._left)
        self._left -= len(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read1():
            yield chunk

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            # bytes past the answer's end: the peer is out of step, the connection is not reused
            self._transport.checkin(self._origin, connection, self.ended and not self.will_close and not self._buffer)


class WireTransport(httpx.BaseTransport):
    """Requests over plain socket connections: direct, or through ``proxy`` when given."""

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
        reply = self.exchange(request)
        return httpx.Response(reply.status, headers=reply.headers, stream=reply,
                              extensions={"http_version": b"HTTP/1.1", "reason_phrase": reply.reason})

    def exchange(self, request: httpx.Request) -> _Reply:
        """Send ``request``; the answer with its head read, to be closed once its body is read."""
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
            head = self._head(request, origin)
            if connection.sock is None:
                connection.connect()
            connection.sock.sendall(head + request.read())  # type: ignore[union-attr]  # one write: the peer wakes once
            return _Reply(self, origin, connection, request.method)
        except BaseException as exc:
            connection.close()
            self._slots.release()
            if isinstance(exc, ValueError):  # a parse gone wrong on what the peer sent: its fault, an httpx error
                raise _protocol_error(str(exc)[:200]) from exc
            raise

    def _head(self, request: httpx.Request, origin: tuple[str, str, int]) -> bytes:
        absolute = self._proxy is not None and origin[0] == "http"  # a proxy is asked for the whole URL
        target = str(request.url) if absolute else request.url.raw_path.decode("ascii")
        headers = request.headers.raw
        if absolute:
            headers = headers + [(name.encode(), text.encode())
                                 for name, text in _proxy_authorization(self._proxy).items()]  # type: ignore[arg-type]
        return _head(request.method, target, headers)

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
