"""Logging: structlog to stderr, JSON lines unless stderr is a terminal, secrets redacted."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"(secret|token|password|authorization|credential|api_key)", re.IGNORECASE)
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+")
REDACTED = "[redacted]"


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank values under secret-looking keys and bearer tokens inside strings."""
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and key != "event":
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = _BEARER.sub(r"\1" + REDACTED, value)
    return event


def configure_logging(level: str | None = None, json_output: bool | None = None) -> None:
    level_name = (level or os.environ.get("LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # botocore and urllib3 chatter stays out unless asked for
    logging.basicConfig(level=logging.WARNING if numeric < logging.WARNING else numeric, stream=sys.stderr)
