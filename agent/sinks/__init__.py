"""Backends the forwarder delivers to, behind one small protocol (``sinks.base.Sink``)."""

from __future__ import annotations

from agent.config import AgentConfig
from agent.sinks.base import Delivered, Outcome, Rejected, RetryLater, Sink


def build_sink(cfg: AgentConfig) -> Sink:
    """The sink for ``backend.type``; the composition root calls this once."""
    from agent.sinks.paigo import PaigoSink

    return PaigoSink(cfg.backend)


__all__ = ["Delivered", "Outcome", "Rejected", "RetryLater", "Sink", "build_sink"]
