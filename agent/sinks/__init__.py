"""Backends the forwarder delivers to, each a ``sinks.base.Sink`` (render + classify)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from agent.clock import Clock
from agent.settings import Backend, FileBackend, HttpBackend, MetronomeBackend, OpenMeterBackend, PaigoBackend
from agent.settings import LagoBackend, OrbBackend, StripeBackend, TogaiBackend
from agent.metrics import Metrics
from agent.sinks.base import Delivered, Outcome, Rejected, RetryLater, Sink
from agent.sinks.transport import http_client


BackendSettings = Backend  # every backend's settings, as the config makes them


def build_client(backend: BackendSettings, transport: httpx.BaseTransport | None = None) -> httpx.Client | None:
    """The one client every request to the backend goes through (None for the file backend):
    as many connections as requests may be in flight (``max_in_flight`` for the sinks that send
    one record per request at once: Paigo, Stripe), each request within ``backend.timeout``."""
    if isinstance(backend, FileBackend):
        return None
    connections = getattr(backend, "max_in_flight", 1)
    return http_client(backend.timeout.total_seconds(), connections, transport)


def build_sink(backend: BackendSettings, client: httpx.Client | None, metrics: Metrics, clock: Clock) -> Sink:
    """The sink for ``backend.type``; the composition root calls this once. Opens nothing yet."""
    if isinstance(backend, PaigoBackend):
        from agent.sinks.paigo import PaigoSink

        assert client is not None
        return PaigoSink(backend, client, metrics, clock)
    if isinstance(backend, OpenMeterBackend):
        from agent.sinks.openmeter import OpenMeterSink

        return OpenMeterSink(backend)
    if isinstance(backend, HttpBackend):
        from agent.sinks.http import HttpSink

        return HttpSink(backend, clock)
    if isinstance(backend, StripeBackend):
        from agent.sinks.stripe import StripeSink

        return StripeSink(backend)
    if isinstance(backend, MetronomeBackend):
        from agent.sinks.metronome import MetronomeSink

        return MetronomeSink(backend)
    if isinstance(backend, TogaiBackend):
        from agent.sinks.togai import TogaiSink

        return TogaiSink(backend)
    if isinstance(backend, LagoBackend):
        from agent.sinks.lago import LagoSink

        return LagoSink(backend)
    if isinstance(backend, OrbBackend):
        from agent.sinks.orb import OrbSink

        return OrbSink(backend)
    assert isinstance(backend, FileBackend)
    from agent.sinks.file import FileSink

    return FileSink(backend)


@dataclass
class Backend:
    """What the composition root delivers to: the sink, and the one client its requests go over."""

    sink: Sink
    client: httpx.Client | None

    @property
    def name(self) -> str:
        return self.sink.name

    def close(self) -> None:
        self.sink.close()
        if self.client is not None:
            self.client.close()


def build_backend(backend: BackendSettings, metrics: Metrics, clock: Clock,
                  transport: httpx.BaseTransport | None = None) -> Backend:
    client = build_client(backend, transport)
    return Backend(build_sink(backend, client, metrics, clock), client)


__all__ = ["Backend", "Delivered", "Outcome", "Rejected", "RetryLater", "Sink", "build_backend", "build_client",
           "build_sink"]
