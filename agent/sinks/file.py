"""JSON Lines on local disk: the ``file`` backend and the audit copy.

Each write appends whole lines and is fsync'd before it counts; the directory is fsync'd
when a file is created or rotated. A write cut short (disk full) is truncated away at once;
one cut short by a crash leaves a torn last line, which is truncated away when the file is
next opened (its records were never acknowledged, so they are written again) and which
``read_jsonl`` never returns as a record. Rotation is by size: ``<path>`` is renamed to
``<path>.<n>`` (n counting up, zero-padded) before a write would take it past ``max_bytes``,
and only the newest ``keep`` rotated files are kept.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from agent.settings import FileBackend, JsonlFile
from agent.records import UsageRecord, format_timestamp
from agent.sinks.base import Delivered, Outcome, RetryLater, SendAgain, SinkDefaults, json_bytes

log = structlog.get_logger("agent.sinks.file")

_TAIL_BLOCK = 64 * 1024


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JsonlWriter:
    """Appends lines to one JSON Lines file, durably, rotating by size. One writer per file,
    used from one thread (the forwarder's)."""

    def __init__(self, path: str | Path, max_bytes: int, keep: int):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._rotated = re.compile(re.escape(self.path.name) + r"\.(\d+)$")
        self._fd: int | None = None
        self._size = 0
        self._next: int | None = None  # the number the next rotated file gets

    @classmethod
    def from_config(cls, cfg: JsonlFile) -> JsonlWriter:
        return cls(cfg.path, int(cfg.max_bytes), cfg.keep)

    def rotated_files(self) -> list[Path]:
        """Rotated files, oldest first."""
        if not self.path.parent.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.parent.iterdir() if (m := self._rotated.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def append(self, lines: Sequence[bytes]) -> Iterator[int]:
        """Write ``lines`` (each without its newline); after each fsync, yield how many more
        are durable. Raises OSError when the file cannot be written; nothing partial stays."""
        chunk: list[bytes] = []
        chunk_bytes = 0
        for line in lines:
            size = len(line) + 1
            if self._fd is None:
                self._open()
            if chunk and self._size + chunk_bytes + size > self.max_bytes:
                self._write(chunk)
                yield len(chunk)
                chunk, chunk_bytes = [], 0
            if not chunk and self._size > 0 and self._size + size > self.max_bytes:
                self._rotate()
            chunk.append(line)
            chunk_bytes += size
        if chunk:
            self._write(chunk)
            yield len(chunk)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            torn = _torn_tail(self.path, size)
            if torn:
                os.ftruncate(fd, size - torn)
                os.fsync(fd)
                log.warning("removed a torn last line left by a crash; its records are written again",
                            path=str(self.path), bytes=torn)
                size -= torn
            if created:
                _fsync_dir(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        if self._next is None:
            numbers = [int(p.name.rsplit(".", 1)[1]) for p in self.rotated_files()]
            self._next = max(numbers, default=0) + 1

    def _write(self, chunk: list[bytes]) -> None:
        assert self._fd is not None
        data = b"".join(line + b"\n" for line in chunk)
        start = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            try:  # leave no partial line behind, so the next write starts on a line boundary
                os.ftruncate(self._fd, start)
            except OSError:
                self._close_quietly()  # the next open truncates the torn tail instead
            raise
        self._size = start + len(data)

    def _close_quietly(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def _rotate(self) -> None:
        assert self._fd is not None and self._next is not None
        os.close(self._fd)
        self._fd = None
        target = self.path.with_name(f"{self.path.name}.{self._next:06d}")
        os.rename(self.path, target)
        self._next += 1
        rotated = self.rotated_files()
        for old in rotated[: max(0, len(rotated) - self.keep)]:
            old.unlink()
            log.info("deleted a rotated file past keep", path=str(old), keep=self.keep)
        _fsync_dir(self.path.parent)
        log.info("rotated", path=str(self.path), to=str(target))
        self._open()


def _torn_tail(path: Path, size: int) -> int:
    """How many bytes follow the last newline (0 when the file ends with one, or is empty)."""
    if size == 0:
        return 0
    with open(path, "rb") as f:
        end = size
        while end > 0:
            start = max(0, end - _TAIL_BLOCK)
            f.seek(start)
            block = f.read(end - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                return size - (start + newline + 1)
            end = start
    return size


@dataclass
class JsonlContents:
    objects: list[dict[str, Any]] = field(default_factory=list)
    torn: list[tuple[int, str]] = field(default_factory=list)  # (line number, why it is not an object)


def read_jsonl(path: str | Path) -> JsonlContents:
    """Every whole line that is a JSON object. A last line without its newline (a write in
    progress, or cut short by a crash) and lines that do not parse are reported, never returned."""
    out = JsonlContents()
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        try:
            value = json.loads(line)
        except ValueError as exc:
            out.torn.append((number, f"not JSON: {exc}"))
            continue
        if isinstance(value, dict):
            out.objects.append(value)
        else:
            out.torn.append((number, "not a JSON object"))
    if lines[-1]:
        out.torn.append((len(lines), f"unterminated last line ({len(lines[-1])} bytes)"))
    return out


@dataclass(frozen=True)
class Written:
    """What a write came to: how many of its lines are durable, and why the rest are not."""

    durable: int
    error: OSError | None = None


@dataclass(frozen=True)
class JsonlAppend:
    """The file sink's request: these lines, appended (and fsync'd) by ``perform``."""

    writer: JsonlWriter
    lines: Sequence[bytes]

    def perform(self) -> Written:
        durable = 0
        try:
            for count in self.writer.append(self.lines):
                durable += count
        except OSError as exc:
            return Written(durable, exc)
        return Written(durable)


class FileSink(SinkDefaults):
    """Each record as one line: the agent's own record JSON (``UsageRecord.to_json``)."""

    name = "file"
    max_batch = 100
    array_body = False  # one line per record
    max_in_flight = 1  # one writer, one file
    timeout = 0.0  # local writes: no request deadline

    def __init__(self, cfg: FileBackend):
        self._writer = JsonlWriter.from_config(cfg)  # opens the file on the first write, not before

    def element(self, record: UsageRecord) -> dict[str, Any]:
        return record.to_json()

    def render(self, elements: Sequence[bytes]) -> JsonlAppend:
        return JsonlAppend(self._writer, elements)

    def classify(self, answer: Written, records: Sequence[UsageRecord]) -> list[Outcome | SendAgain]:
        outcomes: list[Outcome | SendAgain] = [Delivered()] * answer.durable
        if answer.error is not None:
            failure = RetryLater(f"cannot write {self._writer.path}: {answer.error.strerror or answer.error}",
                                 alert=True)
            outcomes += [failure] * (len(records) - answer.durable)
        return outcomes

    def close(self) -> None:
        self._writer.close()


class AuditLog:
    """The audit copy: one line per record the backend accepted, written when its Delivered
    outcome is settled: ``{"id", "backend", "delivered_at", "body"}``, where body is the
    record exactly as the backend received it (``Sink.element``)."""

    def __init__(self, cfg: JsonlFile, sink_name: str, render: Callable[[UsageRecord], Any]):
        self._writer = JsonlWriter.from_config(cfg)
        self._backend = sink_name
        self._render = render

    @property
    def path(self) -> Path:
        return self._writer.path

    def append(self, records: Sequence[UsageRecord], delivered_at: datetime) -> None:
        """Raises OSError when the archive cannot be written."""
        at = format_timestamp(delivered_at)
        lines = [json_bytes({"id": r.record_id, "backend": self._backend, "delivered_at": at, "body": self._render(r)})
                 for r in records]
        for _ in self._writer.append(lines):
            pass

    def close(self) -> None:
        self._writer.close()
