"""Config files and values a careless user or an attacker would write: refused with a clear error."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.config import load_config
from tests.test_config import backend, doc, measurement, problems_of, write


def test_a_fifo_as_config_or_secret_file_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(problems_of(fifo)), daemon=True)
    worker.start()
    worker.join(10)  # open() of a FIFO nobody writes to blocked forever
    assert result == [[("", "cannot read file: not a regular file (expected a regular file)")]]

    config = write(tmp_path, doc(backend(client_secret=None, client_secret_file=str(fifo))))
    result.clear()
    worker = threading.Thread(target=lambda: result.append(problems_of(config)), daemon=True)
    worker.start()
    worker.join(10)
    assert result and result[0] == [("backend.client_secret_file",
                                     f"cannot read secret file {str(fifo)!r}: not a regular file (expected a regular file)")]


def test_a_secret_file_is_read_bounded(tmp_path: Path) -> None:
    # /dev/zero as a secret file read until memory ran out
    problems = problems_of(write(tmp_path, doc(backend(client_secret=None, client_secret_file="/dev/zero"))))
    assert problems == [("backend.client_secret_file",
                         "cannot read secret file '/dev/zero': not a regular file (expected a regular file)")]
    big = tmp_path / "big-secret"
    big.write_bytes(b"x" * (64 * 2**10 + 1))
    problems = problems_of(write(tmp_path, doc(backend(client_secret=None, client_secret_file=str(big)))))
    assert problems == [("backend.client_secret_file", f"secret file {str(big)!r} is larger than 64 KiB")]
    big.write_bytes(b"\xef\xbb\xbfs3cret\r\n")  # a BOM and CRLF from a Windows editor
    cfg = load_config(write(tmp_path, doc(backend(client_secret=None, client_secret_file=str(big)))), {})
    assert cfg.backend.secret() == "s3cret"  # type: ignore[union-attr]
