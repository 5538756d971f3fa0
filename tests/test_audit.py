"""The audit copy: every record the backend accepted, as it was sent, in a local JSONL archive."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import load_config, parse_audit, parse_backend
from agent.errors import ConfigError
from agent.forwarder import Forwarder
from agent.sinks.file import AuditLog, read_jsonl
from agent.sinks.openmeter import OpenMeterSink
from tests.openmeter_server import OpenMeterContractServer
from agent.testing.server import Fault
from tests.conftest import Aws, backend_config, measurement, write_yaml
from tests.support import cli, make_records
from tests.test_delivery import TICK, Pipeline

TOKEN = "om-audit"


@pytest.fixture
def openmeter() -> Iterator[OpenMeterContractServer]:
    with OpenMeterContractServer(token=TOKEN) as server:
        yield server


def audited(server: OpenMeterContractServer, tmp_path: Path, audit_path: Path) -> Pipeline:
    sink = OpenMeterSink(parse_backend({"type": "openmeter", "url": server.url, "token": TOKEN}))
    return Pipeline.over(sink, tmp_path / "spool.db", audit=AuditLog(parse_audit({"path": str(audit_path)}), sink.name, sink.element))


def test_only_accepted_records_are_archived_exactly_as_sent(openmeter: OpenMeterContractServer, tmp_path: Path) -> None:
    openmeter.reject = lambda event: "archived customer" if event["subject"] == "poison" else None
    openmeter.script("/api/v1/events", Fault(status=503))
    audit_path = tmp_path / "audit" / "sent.jsonl"
    p = audited(openmeter, tmp_path, audit_path)
    good, poison = make_records(9), make_records(1, customer="poison")
    p.spool.commit_tick("ebs-storage", TICK, good[:4] + poison + good[4:])

    p.forwarder.drain()  # 503: nothing accepted, nothing archived
    assert not audit_path.exists() or read_jsonl(audit_path).objects == []
    p.clock.advance(2)  # past the backoff (at most 1 s after a first failure)
    p.forwarder.drain()
    assert p.spool.counts()["dead"] == 1
    p.close()

    lines = read_jsonl(audit_path)
    assert lines.torn == []
    assert [line["id"] for line in lines.objects] == [r.record_id for r in good]
    sent = {event_id: event for (_, event_id), event in openmeter.events.items()}
    for line in lines.objects:
        assert line == {"id": line["id"], "backend": "openmeter", "delivered_at": "2027-01-15T08:00:02Z",
                        "body": sent[line["id"]]}


def test_an_unwritable_audit_copy_pauses_delivery_and_resends_nothing(
    openmeter: OpenMeterContractServer, tmp_path: Path
) -> None:
    blocker = tmp_path / "audit"
    blocker.write_text("a file where the audit directory should be")
    p = audited(openmeter, tmp_path, blocker / "sent.jsonl")
    records = make_records(5)
    p.spool.commit_tick("ebs-storage", TICK, records)
    errors_before = p.metrics.value("usage_agent_audit_write_errors_total")

    with capture_logs() as logs:
        p.forwarder.drain()
    assert openmeter.accepted_ids() == {r.record_id for r in records}  # the backend has them ...
    assert p.spool.counts()["leased"] == 5  # ... but they are not settled until the audit has them
    assert p.metrics.value("usage_agent_audit_write_errors_total") == errors_before + 1
    assert any(e["event"] == "audit copy unavailable; delivery paused until it can be written again" for e in logs)
    more = make_records(7)[5:]
    p.spool.commit_tick("ebs-storage", TICK, more)
    p.forwarder.drain()
    assert openmeter.requests == 1  # nothing new is sent while outcomes are held

    blocker.unlink()
    blocker.mkdir()
    p.clock.advance_to(p.forwarder.paused_until)  # a paused forwarder tries again once its pause ends
    p.forwarder.drain()
    assert p.spool.counts()["delivered"] == 7
    assert openmeter.duplicates() == 0
    assert [line["id"] for line in read_jsonl(blocker / "sent.jsonl").objects] == [r.record_id for r in records + more]
    p.close()


def test_a_spool_failure_after_the_audit_does_not_archive_twice(openmeter: OpenMeterContractServer, tmp_path: Path) -> None:
    audit_path = tmp_path / "sent.jsonl"
    p = audited(openmeter, tmp_path, audit_path)

    class SpoolFailsAfterSending(OpenMeterSink):
        def classify(self, answer, records):  # type: ignore[no-untyped-def]
            p.spool._db.execute("PRAGMA query_only=1")  # the spool cannot take the outcomes
            return super().classify(answer, records)

    p.sink = SpoolFailsAfterSending(parse_backend({"type": "openmeter", "url": openmeter.url, "token": TOKEN}))
    p.forwarder = Forwarder(p.spool, p.sink, p.client, metrics=p.metrics, clock=p.clock, audit=p.audit)
    records = make_records(4)
    p.spool.commit_tick("ebs-storage", TICK, records)
    p.forwarder.drain()
    assert len(read_jsonl(audit_path).objects) == 4
    assert p.spool.counts()["leased"] == 4

    p.spool._db.execute("PRAGMA query_only=0")
    p.clock.advance_to(p.forwarder.paused_until)  # a paused forwarder tries again once its pause ends
    p.forwarder.drain()
    assert p.spool.counts()["delivered"] == 4
    assert [line["id"] for line in read_jsonl(audit_path).objects] == [r.record_id for r in records]
    assert openmeter.requests == 1
    p.close()


def test_audit_config_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    doc = backend_config({"type": "file", "path": "out/usage.jsonl"}, tmp_path,
                         audit={"path": "audit/sent.jsonl", "max_bytes": "1GiB", "keep": 30})
    cfg = load_config(write_yaml(tmp_path / "agent.yaml", doc), {})
    assert cfg.backend.path == str(tmp_path / "out" / "usage.jsonl")  # type: ignore[union-attr]
    assert cfg.audit is not None and cfg.audit.path == str(tmp_path / "audit" / "sent.jsonl")
    assert (cfg.audit.max_bytes, cfg.audit.keep) == (2**30, 30)

    same = backend_config({"type": "file", "path": "usage.jsonl"}, tmp_path, audit={"path": "usage.jsonl"})
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path / "same.yaml", same), {})
    assert info.value.problems == [
        ("audit.path", f"is the same file as backend.path ({tmp_path / 'usage.jsonl'}); give each its own file")]


def test_once_with_the_file_backend_and_an_audit_copy(aws: Aws, tmp_path: Path) -> None:
    aws.volume("us-east-1", 100, "gp3", {"customer-id": "acme"})
    aws.volume("us-east-1", 20, "gp3", {"customer-id": "globex"})
    config = write_yaml(tmp_path / "agent.yaml", backend_config(
        {"type": "file", "path": "usage.jsonl"}, tmp_path, measurement(), audit={"path": "audit.jsonl"}))

    def once(*extra: str) -> subprocess.CompletedProcess[str]:
        return cli("once", "-c", str(config), "--at", "2026-11-21T10:07:30Z", *extra)

    dry = once("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "usage.jsonl").exists() and not (tmp_path / "audit.jsonl").exists()
    done = once()
    assert done.returncode == 0, done.stderr

    written = (tmp_path / "usage.jsonl").read_text()
    assert written == dry.stdout  # the dry run printed exactly the lines the file backend writes
    records = read_jsonl(tmp_path / "usage.jsonl").objects
    assert [(r["customer_id"], r["value"]) for r in records] == [("acme", "100"), ("globex", "20")]
    audit = read_jsonl(tmp_path / "audit.jsonl").objects
    assert [(a["backend"], a["body"]) for a in audit] == [("file", r) for r in records]
