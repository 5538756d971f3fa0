"""The file sink: whole fsync'd JSON lines, rotation, and no torn line ever read back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.config import parse_backend
from agent.errors import ConfigError
from agent.records import UsageRecord
from agent.delivery import Delivery, bodies
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.sinks.file import FileSink, read_jsonl
from agent.spool import Spool
from tests.http_server import record_validator
from tests.support import FakeClock, make_records
from tests.test_delivery import TICK


def file_sink(path: Path, **overrides: object) -> FileSink:
    return FileSink(parse_backend({"type": "file", "path": str(path), **overrides}))


def deliver(sink: FileSink, records: list[UsageRecord]) -> list[tuple[UsageRecord, object]]:
    return list(Delivery(sink, None, Metrics()).deliver(records))


def assert_records(objects: list[dict[str, object]]) -> list[UsageRecord]:
    validator = record_validator()
    for obj in objects:
        validator.validate(obj)
    return [UsageRecord.from_json(obj) for obj in objects]


def test_each_record_is_one_whole_line_of_its_own_json(tmp_path: Path) -> None:
    path = tmp_path / "out" / "usage.jsonl"
    clock = FakeClock()
    spool = Spool(tmp_path / "spool.db", clock=clock)
    sink = file_sink(path)
    records = make_records(5)
    spool.commit_tick("ebs-storage", TICK, records)
    assert Forwarder(spool, sink, clock=clock).drain().delivered == 5
    sink.close()
    spool.close()

    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 5
    assert text.splitlines()[0] == (
        '{"id":"%s","measurement":"ebs-storage","event_type":"ebs-storage","dimension_id":"%s",'
        '"customer_id":"acme","timestamp":"2026-11-21T10:00:00Z","value":"1.75","unit":"GiB",'
        '"resource":"aggregate","metadata":{"region":"us-east-1"}}' % (records[0].record_id, records[0].dimension_id))
    contents = read_jsonl(path)
    assert contents.torn == []
    assert assert_records(contents.objects) == records


def test_nothing_is_opened_before_the_first_write(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "never" / "usage.jsonl")
    assert bodies(sink, make_records(1))  # what --dry-run prints
    sink.close()
    assert not (tmp_path / "never").exists()


def test_rotation_by_size_keeps_the_newest_files(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    records = make_records(60)
    line = len(bodies(file_sink(path), records[:1])[0]) + 1
    sink = file_sink(path, max_bytes=line * 10 + line // 2, keep=2)  # room for 10 lines per file
    for i in range(0, 60, 7):
        outcomes = deliver(sink, records[i:i + 7])
        assert [type(o).__name__ for _, o in outcomes] == ["Delivered"] * len(records[i:i + 7])
    sink.close()

    rotated = sorted(p.name for p in tmp_path.glob("usage.jsonl.*"))
    assert rotated == ["usage.jsonl.000004", "usage.jsonl.000005"]  # 000001-000003 were deleted (keep: 2)
    files = [tmp_path / name for name in rotated] + [path]
    assert all(f.stat().st_size <= line * 10 + line // 2 for f in files)
    kept = [r for f in files for r in assert_records(read_jsonl(f).objects)]
    assert kept == records[30:]  # in order, whole, nothing torn

    reopened = file_sink(path, max_bytes=line * 10 + line // 2, keep=2)  # numbering goes on after a restart
    deliver(reopened, make_records(10, customer="later"))
    reopened.close()
    assert sorted(p.name for p in tmp_path.glob("usage.jsonl.*")) == ["usage.jsonl.000005", "usage.jsonl.000006"]


def test_a_torn_last_line_is_reported_never_returned_and_removed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    sink = file_sink(path)
    deliver(sink, make_records(2))
    sink.close()
    whole = path.read_bytes()
    with open(path, "ab") as f:  # what a crash mid-write leaves: the start of a line
        f.write(b'{"id":"0123456789abcdef0123456789abcdef","measurement":"ebs-st')

    contents = read_jsonl(path)
    assert len(contents.objects) == 2
    assert contents.torn == [(3, "unterminated last line (62 bytes)")]

    sink = file_sink(path)
    deliver(sink, make_records(3)[2:])
    sink.close()
    assert path.read_bytes().startswith(whole)
    contents = read_jsonl(path)
    assert contents.torn == [] and len(assert_records(contents.objects)) == 3


_CHILD = textwrap.dedent("""
    import sys
    from dataclasses import replace
    from agent.config import parse_backend
    from agent.delivery import Delivery
    from agent.metrics import Metrics
    from agent.sinks.file import FileSink
    from tests.support import make_records

    sink = FileSink(parse_backend({"type": "file", "path": sys.argv[1], "max_bytes": 1 << 40}))
    delivery = Delivery(sink, None, Metrics())
    pad = "x" * 3000  # large lines: a batch takes many pages, so a kill lands inside one write
    batch = [replace(r, metadata={"pad": pad}) for r in make_records(3000)]
    print("ready", flush=True)
    while True:
        for _ in delivery.deliver(batch):
            pass
""")


def test_kill_9_mid_write_never_yields_a_torn_record(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    torn_seen = 0
    for attempt in range(8):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE,
                                 cwd=Path(__file__).parent.parent)
        try:
            assert child.stdout is not None and child.stdout.readline() == b"ready\n"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # kill while the file does not end on a newline: mid-write
                try:
                    with open(path, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                            break
                except FileNotFoundError:
                    pass
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == -signal.SIGKILL

        contents = read_jsonl(path)
        assert_records(contents.objects)  # every line read back is a whole, valid record
        if contents.torn:
            assert contents.torn == [(len(contents.objects) + 1, contents.torn[0][1])]
            assert contents.torn[0][1].startswith("unterminated last line")
            torn_seen += 1
            # the next start removes the torn tail; what follows is whole
            sink = file_sink(path, max_bytes=1 << 40)
            deliver(sink, make_records(1, customer="after-restart"))
            sink.close()
            after = read_jsonl(path)
            assert after.torn == [] and after.objects[-1]["customer_id"] == "after-restart"
            assert after.objects[:-1] == contents.objects
        if torn_seen >= 2:
            break
    assert torn_seen >= 1, "no kill landed inside a write"


def _run_with_file_size_limit(path: Path, limit: int) -> list[str]:
    """Delivery to a FileSink in a child process whose files may not grow past ``limit`` (EFBIG)."""
    code = textwrap.dedent(f"""
        import resource, signal
        from agent.config import parse_backend
        from agent.delivery import Delivery
        from agent.metrics import Metrics
        from agent.sinks.file import FileSink
        from tests.support import make_records
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        delivery = Delivery(FileSink(parse_backend({{"type": "file", "path": {str(path)!r}}})), None, Metrics())
        for batch in (make_records(3), make_records(20, customer="big")):
            print(",".join(type(o).__name__ + ("!" if getattr(o, "alert", False) else "") for _, o in delivery.deliver(batch)))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_write_cut_short_leaves_no_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    line = len(bodies(file_sink(path), make_records(1))[0]) + 1
    first, second = _run_with_file_size_limit(path, limit=line * 10)
    assert first == ",".join(["Delivered"] * 3)
    assert second == ",".join(["RetryLater!"] * 20)  # not the records' fault: retried, with an alert
    assert path.stat().st_size == 3 * line  # the partial write was truncated away
    contents = read_jsonl(path)
    assert contents.torn == [] and len(contents.objects) == 3


def test_config_defaults_and_limits(tmp_path: Path) -> None:
    cfg = parse_backend({"type": "file", "path": "usage.jsonl"})
    assert (cfg.max_bytes, cfg.keep) == (100 * 2**20, 10)
    assert parse_backend({"type": "file", "path": "u", "max_bytes": "5MiB"}).max_bytes == 5 * 2**20
    with pytest.raises(ConfigError):
        parse_backend({"type": "file", "path": "u", "keep": 0})
    with pytest.raises(ConfigError):
        parse_backend({"type": "file", "path": "u", "max_bytes": 100})

