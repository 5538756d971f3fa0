"""Backends the forwarder delivers to, behind one small protocol (``sinks.base.Sink``)."""

from __future__ import annotations

from agent.settings import AgentConfig, FileBackend, HttpBackend, OpenMeterBackend, PaigoBackend
from agent.sinks.base import Delivered, Outcome, Rejected, RetryLater, Sink


def build_sink(cfg: AgentConfig) -> Sink:
    """The sink for ``backend.type``; the composition root calls this once. Opens nothing yet."""
    backend = cfg.backend
    if isinstance(backend, PaigoBackend):
        from agent.sinks.paigo import PaigoSink

        return PaigoSink(backend)
    if isinstance(backend, OpenMeterBackend):
        from agent.sinks.openmeter import OpenMeterSink

        return OpenMeterSink(backend)
    if isinstance(backend, HttpBackend):
        from agent.sinks.http import HttpSink

        return HttpSink(backend)
    assert isinstance(backend, FileBackend)
    from agent.sinks.file import FileSink

    return FileSink(backend)


__all__ = ["Delivered", "Outcome", "Rejected", "RetryLater", "Sink", "build_sink"]
