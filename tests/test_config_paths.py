"""The spool, the file backend and the audit copy never share a file, however a path is spelled."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from tests.test_config import doc, measurement, problems_of, write

FILE_BACKEND = {"type": "file", "path": "out.jsonl"}


def config(tmp_path: Path, spool: str = "spool.db", backend: str = "out.jsonl", audit: str | None = None) -> Path:
    top: dict[str, Any] = {"spool": {"path": spool}}
    if audit is not None:
        top["audit"] = {"path": audit}
    return write(tmp_path, doc({"type": "file", "path": backend}, [measurement()], **top))


OVERLAPS = [
    # (spool, backend, audit, YAML path of the problem, the other YAML path it names)
    ("out.jsonl", "out.jsonl", None, "backend.path", "spool.path"),  # once: 4 KiB cut off the SQLite file
    ("spool.db", "out.jsonl", "./x/../out.jsonl", "audit.path", "backend.path"),
    ("spool.db", "out.jsonl", "out.jsonl.000003", "audit.path", "backend.path"),  # a rotation of the backend's file
    ("spool.db", "spool.db-wal", None, "backend.path", "spool.path"),
    ("spool.db", "out.jsonl", "spool.db.lock", "audit.path", "spool.path"),
    ("out.jsonl.7", "out.jsonl", None, "backend.path", "spool.path"),  # the spool where a rotation goes
    ("spool.db", "out.jsonl", "/{tmp}/./out.jsonl", "audit.path", "backend.path"),  # absolute, another spelling
]


@pytest.mark.parametrize(("spool", "backend", "audit", "where", "other"), OVERLAPS)
def test_overlapping_files_are_refused_naming_both_settings(
    tmp_path: Path, spool: str, backend: str, audit: str | None, where: str, other: str
) -> None:
    (tmp_path / "x").mkdir()
    audit = audit.format(tmp=str(tmp_path).lstrip("/")) if audit else None
    problems = problems_of(config(tmp_path, spool, backend, audit))
    assert [p for p, _ in problems] == [where], problems
    assert other in problems[0][1] and "give each its own file" in problems[0][1]


def test_a_symlinked_directory_and_a_hard_link_are_the_same_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data)
    problems = problems_of(config(tmp_path, spool="data/spool.db", backend="link/spool.db"))
    assert [p for p, _ in problems] == ["backend.path"]
    assert f"same file as spool.path ({data / 'spool.db'})" in problems[0][1]

    (data / "out.jsonl").write_bytes(b"")
    os.link(data / "out.jsonl", data / "audit.jsonl")
    problems = problems_of(config(tmp_path, backend="data/out.jsonl", audit="data/audit.jsonl"))
    assert [p for p, _ in problems] == ["audit.path"]


def test_overlaps_are_reported_with_the_other_problems(tmp_path: Path) -> None:
    path = write(tmp_path, doc(FILE_BACKEND, [measurement(interval="5x")], spool={"path": "out.jsonl"}))
    assert [p for p, _ in problems_of(path)] == ["backend.path", "measurements[0].interval"]


def test_distinct_files_side_by_side_are_accepted(tmp_path: Path) -> None:
    cfg = load_config(config(tmp_path, "spool.db", "out.jsonl", "out-audit.jsonl"), {})
    assert cfg.audit is not None and Path(cfg.audit.path).name == "out-audit.jsonl"
    # the default spool path is compared too
    problems = problems_of(write(tmp_path, doc({"type": "file", "path": "/var/lib/usage-agent/spool.db"})))
    assert [p for p, _ in problems] == ["backend.path"]


@pytest.mark.parametrize(("spool", "backend", "audit", "where"), [
    ("agent.yaml", "out.jsonl", None, "spool.path"),  # the spool would be opened on the config
    ("spool.db", "./agent.yaml", None, "backend.path"),  # JSON lines appended to the config, its last line cut
    ("spool.db", "out.jsonl", "x/../agent.yaml", "audit.path"),
])
def test_the_config_file_itself_is_never_written(
    tmp_path: Path, spool: str, backend: str, audit: str | None, where: str
) -> None:
    (tmp_path / "x").mkdir()
    problems = problems_of(config(tmp_path, spool, backend, audit))
    assert problems == [(where, f"is the same file as the config file ({tmp_path / 'agent.yaml'}); give each its own file")]


def test_paths_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    # one file on a case-insensitive file system (macOS, Windows volumes)
    problems = problems_of(config(tmp_path, spool="Spool.db", backend="spool.DB"))
    assert [p for p, _ in problems] == ["backend.path"] and "same file as spool.path" in problems[0][1]
    problems = problems_of(config(tmp_path, backend="Out.jsonl", audit="out.jsonl.000002"))
    assert [p for p, _ in problems] == ["audit.path"] and "rotations" in problems[0][1]


def test_a_directory_or_a_device_is_not_a_file_path(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    problems = problems_of(config(tmp_path, spool="data", backend="out/", audit="/dev/null"))
    assert problems == [
        ("audit.path", "/dev/null is not a regular file (a device, FIFO or socket); expected the path of a file"),
        ("backend.path", f"{tmp_path / 'out'} is a directory; expected the path of a file in it"),
        ("spool.path", f"{tmp_path / 'data'} is a directory; expected the path of a file in it"),
    ]
    read_end, write_end = os.pipe()  # /dev/stdout of an agent whose output is piped: resolves to pipe:[…]
    try:
        path = f"/proc/self/fd/{write_end}"
        problems = problems_of(config(tmp_path, backend=path))
        assert [p for p, _ in problems] == ["backend.path"] and "is not a regular file" in problems[0][1]
    finally:
        os.close(read_end)
        os.close(write_end)
