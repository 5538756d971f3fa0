"""The daemon's HTTP endpoints: ``MetricsServer`` serves the registry of the process's
``Metrics`` on ``server.listen`` as ``/metrics``, next to ``/healthz`` (alive) and ``/readyz``
(the checks the daemon passes in), from daemon threads."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, make_wsgi_app

from agent.errors import ServeError
from agent.telemetry import Check


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (``server.listen``); an empty host listens on every interface."""
    host, _, port = listen.rpartition(":")
    return host or "0.0.0.0", int(port)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck scrape must not keep the process alive

    def server_bind(self) -> None:
        # WSGIServer would resolve its own FQDN here, which can hang on a broken resolver
        TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """Scrapes and probes are not worth a log line each."""


class MetricsServer:
    """``/metrics`` (the registry it is given), ``/healthz`` (the process serves) and ``/readyz``
    (every check ok)."""

    def __init__(self, listen: str, registry: CollectorRegistry, readiness: Callable[[], Iterable[Check]],
                 refresh: Callable[[], object] | None = None):
        self._listen = listen
        self._readiness = readiness
        self._refresh = refresh  # gauges read from the spool at scrape time
        self._metrics = make_wsgi_app(registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            if self._refresh is not None:
                try:
                    self._refresh()
                except Exception as exc:  # serve the counters anyway; the gauges keep their last value
                    structlog.get_logger("agent.endpoints").warning("refreshing spool gauges failed", error=str(exc))
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "ok"})
        if path == "/readyz":
            try:
                checks = list(self._readiness())
            except Exception as exc:  # a check that crashes means: not ready, and say why
                checks = [Check("readiness", False, f"{type(exc).__name__}: {exc}")]
            ready = all(c.ok for c in checks)
            body = {"status": "ready" if ready else "not ready",
                    "failed": [c.name for c in checks if not c.ok],
                    "checks": [asdict(c) for c in checks]}
            return _json(start_response, "200 OK" if ready else "503 Service Unavailable", body)
        return _json(start_response, "404 Not Found", {"error": f"no such path {path!r}; try /metrics, /healthz, /readyz"})

    def start(self) -> tuple[str, int]:
        """Bind (ServeError if the address is taken) and serve from a daemon thread; the bound address."""
        host, port = parse_listen(self._listen)
        try:
            self._server = make_server(host, port, self._app, server_class=_Server, handler_class=_QuietHandler)
        except OSError as exc:
            raise ServeError(f"cannot serve /metrics, /healthz, /readyz on server.listen={self._listen}: {exc}") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-server", daemon=True)
        self._thread.start()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return str(self._server.server_address[0]), int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
