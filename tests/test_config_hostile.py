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


def http(**fields: object) -> dict[str, object]:
    return {"type": "http", "url": "https://billing.example.com/usage", **fields}


@pytest.mark.parametrize(("backend_", "where", "message"), [
    # httpx cannot encode it: UnicodeEncodeError out of every send
    (http(headers={"X-Tenant": "café"}), "backend", "header X-Tenant: a value must be printable ASCII, without control characters"),
    (http(headers={"X-Tenant": "a\x01b"}), "backend", "header X-Tenant: a value must be printable ASCII, without control characters"),
    (http(headers={"X-Tenant": "a\x7fb"}), "backend", "header X-Tenant: a value must be printable ASCII, without control characters"),
    # the Authorization header: h11 refuses it at every request, retried forever
    ({"type": "openmeter", "token": "abc\r\nX-Evil: 1"}, "backend",
     "the token must be printable ASCII, without line breaks or control characters"),
    ({"type": "openmeter", "token": "tökén"}, "backend",
     "the token must be printable ASCII, without line breaks or control characters"),
])
def test_header_values_the_http_client_cannot_send_are_refused(
    tmp_path: Path, backend_: dict[str, object], where: str, message: str
) -> None:
    assert problems_of(write(tmp_path, doc(backend_))) == [(where, message)]


URL = "expected an http:// or https:// URL such as https://billing.example.com/usage, got "


@pytest.mark.parametrize(("url", "message"), [
    ("https://billing.example.com/u\r\nX: y", URL + "'https://billing.example.com/u\\r\\nX: y': it holds spaces or control characters"),
    ("https://billing.example.com/u v", URL + "'https://billing.example.com/u v': it holds spaces or control characters"),
    ("https://billing.example.com:99999/u", URL + "'https://billing.example.com:99999/u': Port out of range 0-65535"),
    ("https://:@/", URL + "'https://:@/'"),
    ("https://[::1/", URL + "'https://[::1/': Invalid IPv6 URL"),
    ("ftp://billing.example.com", URL + "'ftp://billing.example.com'"),
    ("https://user:secret@billing.example.com/u",
     "credentials in the URL are refused (a URL is logged); use headers, a token or a secret file"),
])
def test_urls_the_backend_cannot_be_reached_at_are_refused(tmp_path: Path, url: str, message: str) -> None:
    assert problems_of(write(tmp_path, doc(http(url=url)))) == [("backend.url", message)]


@pytest.mark.parametrize("listen", ["0.0.0.0:99999", "[::]:9464", "host:", "a b:80"])
def test_a_listen_address_that_cannot_be_bound_is_refused(tmp_path: Path, listen: str) -> None:
    # port 99999 reached bind() and `run` died with an OverflowError traceback
    problems = problems_of(write(tmp_path, doc(server={"listen": listen})))
    assert problems == [("server.listen", "expected host:port with an IPv4 address or name and a port from 0 to 65535, "
                                          f"such as 0.0.0.0:9464, got {listen!r}")]


def test_valid_urls_headers_and_listen_addresses_still_load(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, doc(http(url="http://127.0.0.1:8080/usage/", headers={"X-Tenant": "acme\tinc"}),
                                          server={"listen": ":0"})), {})
    assert cfg.backend.url == "http://127.0.0.1:8080/usage"  # type: ignore[union-attr]
    assert cfg.server.listen == ":0"


@pytest.mark.parametrize("value", ["${TOKEN", "$TOKEN", "${ TOKEN }", "${TOKEN:-fallback}", "${1TOKEN}", "Bearer $TOKEN"])
def test_a_reference_that_is_not_expanded_is_an_error_not_a_literal(tmp_path: Path, value: str) -> None:
    # each went to the backend as the literal text: a header value or secret nobody meant
    reference = value.removeprefix("Bearer ")
    problems = problems_of(write(tmp_path, doc(http(headers={"Authorization": value}))), {"TOKEN": "t"})
    assert problems == [("backend.headers.Authorization",
                         f"{reference!r} is not expanded: write ${{NAME}} (no defaults), or $$ for a literal $")]


def test_dollar_escapes_and_values_with_yaml_syntax_stay_text(tmp_path: Path) -> None:
    headers = {"X-A": "$${TOKEN}", "X-B": "$$TOKEN", "X-C": "${TOKEN}", "X-D": "5$ or 5 $"}
    cfg = load_config(write(tmp_path, doc(http(headers=headers))), {"TOKEN": "{a: [1, *x]} !!python/object:os.system"})
    assert cfg.backend.header_values() == {  # type: ignore[union-attr]
        "X-A": "${TOKEN}", "X-B": "$TOKEN", "X-C": "{a: [1, *x]} !!python/object:os.system", "X-D": "5$ or 5 $"}


def test_keys_that_are_not_plain_are_quoted_in_messages(tmp_path: Path) -> None:
    text = doc() + '"\\e[2J\\e[31mevil": 1\n"measurements\\u200b": 2\n"\\uff4deasurements": 3\n'
    problems = problems_of(write(tmp_path, text))
    assert sorted(problems) == [('["\\u001b[2J\\u001b[31mevil"]', "unknown key"),
                                ('["\\uff4deasurements"]', "unknown key"),
                                ('["measurements\\u200b"]', "unknown key")]
    problems = problems_of(write(tmp_path, doc(measurements=[measurement(metadata={"a\nb": [1], "a.b": {}})])))
    assert problems == [('measurements[0].metadata["a.b"]', "Input should be a valid string"),
                        ('measurements[0].metadata["a\\nb"]', "Input should be a valid string")]


def test_unreadable_text_gets_a_one_line_error_saying_what_to_do(tmp_path: Path) -> None:
    text = doc()
    path = tmp_path / "agent.yaml"
    path.write_bytes(text.encode("utf-16"))  # Notepad's "Unicode"
    assert problems_of(path) == [("", "file is not valid UTF-8 (byte 0) (it is UTF-16: save it as UTF-8)")]
    path.write_bytes(b"backend:\n  type: file\n  path: \x7fELF\n")  # was two lines naming "<unicode string>"
    assert problems_of(path) == [("", "invalid YAML at line 3, column 9: character '\\x7f': control characters are not allowed")]
    path.write_text(text.replace("\n  ", "\n\t", 1))
    assert problems_of(path) == [("", "invalid YAML at line 2, column 1: found character that cannot start any token "
                                      "(a tab: YAML indents with spaces)")]


def test_a_bom_and_crlf_line_ends_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + doc().replace("\n", "\r\n").encode())
    assert load_config(path, {}).measurements[0].name == "ebs-storage"
