"""A Paigo-contract HTTP server on 127.0.0.1 for the demo and the tests.

It implements what the Paigo reference documents for usage collection: the OAuth2
client-credentials token endpoint (JSON body with audience, grant_type, client_id,
client_secret) and ``POST /usage`` behind ``Authorization: Bearer``, validating every body
against the usage-record JSON Schema. Faults can be scripted per request.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import jsonschema

from agent.testing.server import Fault

AUDIENCE = "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com"


def usage_record_schema() -> dict[str, Any]:
    text = resources.files("agent.testing").joinpath("contracts/paigo-usage-record.schema.json").read_text()
    return json.loads(text)


class PaigoContractServer:
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
        self.client_id = client_id
        self.client_secret = client_secret
        self.audience = audience
        self.expires_in = expires_in
        self.reject = reject
        self.latency = latency  # seconds every /usage request waits before it is handled: a backend's round trip
        self._validator = jsonschema.Draft7Validator(usage_record_schema(), format_checker=jsonschema.FormatChecker())
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._faults: dict[str, list[Fault]] = {"/usage": [], "/oauth/token": []}
        self.accepted: list[dict[str, Any]] = []
        self.received_ids: Counter[str] = Counter()
        self.token_requests = 0
        self.usage_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.rejected: list[tuple[int, Any]] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    def start(self) -> PaigoContractServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> PaigoContractServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting and inspection --------------------------------------------------------

    def script(self, path: str, *faults: Fault) -> None:
        with self._lock:
            self._faults[path].extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            for queue in self._faults.values():
                queue.clear()

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

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.pop(0) if queue else None

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

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out as two writes: no 40 ms delayed-ACK stall

            def log_message(self, *args: Any) -> None:  # keep test and demo output clean
                return

            def _answer(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = self.path.split("?")[0]
                if path not in ("/oauth/token", "/usage"):
                    self._answer(404, {"message": "Not Found"})
                    return
                if path == "/usage":
                    with server._lock:
                        server.usage_requests += 1
                        server.in_flight += 1
                        server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._serve(path, raw)
                finally:
                    if path == "/usage":
                        with server._lock:
                            server.in_flight -= 1

            def _disrupt(self, fault: Fault) -> bool:
                """Sleep and/or hang up as scripted; True when the connection is gone."""
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.drop:
                    self.close_connection = True
                    self.connection.close()
                return fault.drop

            def _serve(self, path: str, raw: bytes) -> None:
                if path == "/usage" and server.latency:
                    time.sleep(server.latency)
                fault = server._next_fault(path)
                if fault and not fault.after_commit:
                    if self._disrupt(fault):
                        return
                    if fault.status:
                        extra = {"Retry-After": fault.retry_after} if fault.retry_after else None
                        self._answer(fault.status, {"message": "injected fault"}, extra)
                        return
                if "application/json" not in (self.headers.get("Content-Type") or ""):
                    self._answer(415, {"message": "Content-Type must be application/json"})
                    return
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._answer(400, {"message": "body is not JSON"})
                    return
                if path == "/oauth/token":
                    self._answer(*server._issue_token(body))
                    return
                if not server._authorised(self.headers.get("Authorization")):
                    self._answer(401, {"message": "Unauthorized"})
                    return
                status, payload = server._usage(body)
                if fault and fault.after_commit and self._disrupt(fault):
                    return
                self._answer(status, payload)

        return Handler
