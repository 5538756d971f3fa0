"""Log redaction: secrets and bearer tokens never reach a log line."""

from __future__ import annotations

import io
import json
import logging
import sys

import structlog

from agent.telemetry import REDACTED, configure_logging, redact_secrets


def test_secret_keys_and_bearer_tokens_are_redacted() -> None:
    event = redact_secrets(None, "info", {
        "event": "request",
        "client_secret": "s3cr3t",
        "token": "abc",
        "header": "Authorization: Bearer eyJhbGciOi.payload.sig",
        "region": "us-east-1",
    })
    assert event["client_secret"] == REDACTED and event["token"] == REDACTED
    assert event["header"] == f"Authorization: Bearer {REDACTED}"
    assert event["region"] == "us-east-1" and event["event"] == "request"


def test_library_logs_are_rendered_as_json_and_redacted(monkeypatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("info", json_output=True)
    try:
        logging.getLogger("apscheduler.scheduler").warning("job missed; Bearer abc.def.ghi")
        structlog.get_logger("agent").info("tick", client_secret="hunter2")
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["logger"] == "apscheduler.scheduler" and lines[0]["level"] == "warning"
    assert "abc.def.ghi" not in lines[0]["event"] and REDACTED in lines[0]["event"]
    assert lines[1]["client_secret"] == REDACTED
    assert "hunter2" not in stream.getvalue()
