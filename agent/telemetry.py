"""Logs: structlog to stderr, JSON lines unless stderr is a terminal, secrets redacted; and
``Check``, one readiness condition (``agent.endpoints`` serves them as ``/readyz``)."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

REDACTED = "[redacted]"
# a name that ends in _url (token_url) names an address, which is not a secret
_SECRET_KEYS = re.compile(r"(secret|token|password|authorization|credential|api_key)(?![\w-]*_url$)", re.IGNORECASE)
_SECRET_NAME = r"[\w-]*(?:secret|token|password|authorization|api_key)(?![\w-]*_url\b)[\w-]*"
# secrets inside text, as libraries log them at debug (botocore dumps STS answers and signed headers)
_IN_TEXT = [
    (re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+"), rf"\1{REDACTED}"),
    (re.compile(r"\b(k8s-aws-v1\.)[A-Za-z0-9_-]+"), rf"\1{REDACTED}"),  # an EKS token, wherever it is quoted
    (re.compile(rf"^([ \t]*{_SECRET_NAME}[ \t]*:[ \t]*)[^\n]+", re.IGNORECASE | re.MULTILINE), rf"\1{REDACTED}"),  # headers
    (re.compile(rf"(<({_SECRET_NAME})>)[^<]*(</\2>)", re.IGNORECASE), rf"\1{REDACTED}\3"),  # XML elements
    (re.compile(rf"""(["']{_SECRET_NAME}["']\s*:\s*b?["'])[^"']*""", re.IGNORECASE), rf"\1{REDACTED}"),  # JSON, reprs
    (re.compile(rf"""(\b{_SECRET_NAME}=)[^&\s'",]+""", re.IGNORECASE), rf"\1{REDACTED}"),  # query strings, forms
]


def redact_text(text: str) -> str:
    for pattern, replacement in _IN_TEXT:
        text = pattern.sub(replacement, text)
    return text


def redact_secrets(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Blank values under secret-looking keys, and secrets inside strings (bearer tokens, credentials)."""
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and key != "event":
            event[key] = REDACTED
        elif isinstance(value, str):
            event[key] = redact_text(value)
    return event


def configure_logging(level: str | None = None, json_output: bool | None = None) -> None:
    """structlog for our own logs; the standard library's (APScheduler, botocore) rendered alike."""
    level_name = (level or os.environ.get("LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json_output is None:
        json_output = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,  # after format_exc_info, so tracebacks are scrubbed too
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # libraries speak up from WARNING on, unless we were asked for more
    root.setLevel(max(numeric, logging.WARNING) if numeric > logging.DEBUG else logging.DEBUG)


@dataclass(frozen=True)
class Check:
    """One readiness condition as /readyz reports it."""

    name: str
    ok: bool
    detail: str
