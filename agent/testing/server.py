"""What the contract servers share: a threaded HTTP server on 127.0.0.1 with scripted faults."""

from __future__ import annotations

import json
import ssl
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Self

import jsonschema


def contract_validator(name: str) -> jsonschema.Draft7Validator:
    """A validator for ``contracts/<name>`` with format checks on (date-time, uri-reference …)."""
    schema = json.loads(resources.files("agent.testing").joinpath(f"contracts/{name}").read_text())
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


def schema_errors(validator: jsonschema.Draft7Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.path))]


@dataclass
class Answer:
    status: int
    payload: Any = None  # JSON; None for no body
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # the body as is, instead of a JSON payload

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return b"" if self.payload is None else json.dumps(self.payload).encode()


@dataclass
class Fault:
    """What the server does instead of (or besides) its normal answer to one request."""

    status: int | None = None  # answer with this status and no processing
    retry_after: str | None = None
    delay: float = 0.0  # sleep before answering
    drop: bool = False  # close the connection without an answer
    after_commit: bool = False  # apply the delay/hold/drop after the request was accepted
    hold: threading.Event | None = None  # answer only once the test sets this (at most a minute)
    answer: Answer | None = None  # answer this, unprocessed: a redirect, a captive portal's page
    trickle: float = 0.0  # send the status line and headers one byte at a time, this many seconds apart
    padding: int = 0  # bytes of whitespace streamed after the body (a huge answer; JSON stays JSON)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (timeout) is expected
            super().handle_error(request, client_address)


class Loopback:
    """An HTTP server on 127.0.0.1 (https with ``tls``) in a daemon thread: ``url``, ``start``, ``stop``, ``with``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int = 0, tls: ssl.SSLContext | None = None):
        self._httpd = _QuietServer(("127.0.0.1", port), handler)
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self._scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{self._scheme}://{host}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class IdLedger:
    """What a contract server that deduplicates on an id took: ``events`` by id (the first
    accepted), ``received`` how often each id was sent; both guarded by ``_lock``."""

    events: dict[str, Any]
    received: Counter[str]
    _lock: threading.Lock

    def accepted_ids(self) -> set[str]:
        with self._lock:
            return set(self.events)

    def duplicates(self) -> int:
        with self._lock:
            return sum(n - 1 for n in self.received.values() if n > 1)


class LoopbackServer(Loopback, ABC):
    """Subclasses implement ``answer`` (and ``error`` for their error body format)."""

    def __init__(self, port: int = 0, latency: float = 0.0):
        self.latency = latency  # seconds every request waits before it is handled: a backend's round trip
        self._lock = threading.Lock()
        self._faults: dict[str, list[Fault]] = defaultdict(list)
        self.requests = 0
        self.requests_by_path: Counter[str] = Counter()
        self.in_flight_by_path: Counter[str] = Counter()  # requests being handled now
        self.max_in_flight_by_path: Counter[str] = Counter()
        self.answer_bytes: list[int] = []  # bytes of each answer written before it ended or the client hung up
        super().__init__(self._handler(), port)

    def script(self, path: str, *faults: Fault) -> None:
        with self._lock:
            self._faults[path].extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.pop(0) if queue else None

    @abstractmethod
    def answer(self, path: str, headers: dict[str, str], raw: bytes) -> Answer:
        """The contract: the answer to a POST of ``raw`` to ``path`` (header names lowercased)."""

    def answer_get(self, path: str, headers: dict[str, str]) -> Answer:
        """The contract's answer to a GET of ``path``; a server that serves none refuses the method."""
        return self.error(405, "method not allowed")

    def respond(self, path: str, query: str, headers: dict[str, str], raw: bytes) -> Answer:
        """``answer``, for a contract that reads the query string too (``?debug=true``)."""
        return self.answer(path, headers, raw)

    def error(self, status: int, detail: str) -> Answer:
        return Answer(status, {"message": detail})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args: Any) -> None:  # keep test output clean
                return

            def _send(self, answer: Answer, fault: Fault | None = None) -> None:
                written = [0]
                try:
                    self._write_answer(answer, fault, written)
                finally:
                    with server._lock:
                        server.answer_bytes.append(written[0])

            def _write(self, data: bytes, written: list[int]) -> None:
                self.wfile.write(data)
                written[0] += len(data)

            def _write_answer(self, answer: Answer, fault: Fault | None, written: list[int]) -> None:
                data = answer.body()
                padding = fault.padding if fault else 0
                lines = [f"HTTP/1.1 {answer.status} {self.responses.get(answer.status, ('',))[0]}",
                         f"Content-Length: {len(data) + padding}"]
                if data:
                    lines.append(f"Content-Type: {answer.content_type}")
                lines += [f"{name}: {value}" for name, value in answer.headers.items()]
                head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
                if fault and fault.trickle:
                    for i in range(len(head)):
                        self._write(head[i:i + 1], written)
                        time.sleep(fault.trickle)
                else:
                    self._write(head, written)
                self._write(data, written)
                filler = b" " * 65536
                while padding > 0:
                    self._write(filler[:padding], written)
                    padding -= len(filler)

            def _disrupt(self, fault: Fault) -> bool:
                """Sleep, wait for the test and/or hang up as scripted; True when the connection is gone."""
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.hold is not None:
                    fault.hold.wait(timeout=60)
                if fault.drop:
                    self.close_connection = True
                    self.connection.close()
                return fault.drop

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self._handle("POST")

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def _handle(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path, _, query = self.path.partition("?")
                with server._lock:
                    server.requests += 1
                    server.requests_by_path[path] += 1
                    server.in_flight_by_path[path] += 1
                    server.max_in_flight_by_path[path] = max(server.max_in_flight_by_path[path],
                                                             server.in_flight_by_path[path])
                try:
                    self._serve(method, path, query, raw)
                finally:
                    with server._lock:
                        server.in_flight_by_path[path] -= 1

            def _serve(self, method: str, path: str, query: str, raw: bytes) -> None:
                if server.latency:
                    time.sleep(server.latency)
                fault = server._next_fault(path)
                if fault and not fault.after_commit:
                    if self._disrupt(fault):
                        return
                    if fault.answer or fault.status:
                        answer = fault.answer or server.error(fault.status or 500, "injected fault")
                        if fault.retry_after:
                            answer.headers["Retry-After"] = fault.retry_after
                        self._send(answer, fault)
                        return
                headers = {k.lower(): v for k, v in self.headers.items()}
                answer = (server.respond(path, query, headers, raw) if method == "POST"
                          else server.answer_get(path, headers))
                if fault and fault.after_commit and self._disrupt(fault):
                    return
                self._send(answer, fault)

        return Handler
