"""The http.client transport against real peers on 127.0.0.1 that speak raw bytes: total
deadlines across trickled headers and bodies, capped reads, keep-alive, proxies from the
environment, refused and reset connections."""

from __future__ import annotations

import base64
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from agent.errors import ConfigError
from agent.metrics import Metrics
from agent.sinks.base import ANSWER_CAP, transport_failure
from agent.sinks.transport import DEFAULT_HEADERS, http_client, request, send
from agent.sinks.wire import WireTransport

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"message\":\"ok\"}"


def read_request(conn: socket.socket) -> bytes:
    """One request's head and body (by its Content-Length), or b"" when the client hung up."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head


class Peer:
    """Runs ``script(connection, peer)`` for each connection it accepts; keeps the heads it read."""

    def __init__(self, script: Callable[[socket.socket, Peer], None]):
        self._script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.accepted = 0
        self.heads: list[bytes] = []
        self.written = 0
        self.hung_up = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self._script(conn, self)
            except OSError:
                self.hung_up.set()

    def answer(self, conn: socket.socket) -> bool:
        head = read_request(conn)
        if head:
            self.heads.append(head)
        return bool(head)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def peers() -> Iterator[Callable[[Callable[[socket.socket, Peer], None]], Peer]]:
    started: list[Peer] = []

    def start(script: Callable[[socket.socket, Peer], None]) -> Peer:
        started.append(Peer(script))
        return started[-1]
    yield start
    for peer in started:
        peer.close()


def keep_alive(conn: socket.socket, peer: Peer) -> None:
    while peer.answer(conn):
        conn.sendall(OK)


def post(client: httpx.Client, url: str, timeout: float = 2.0) -> object:
    return send(client, request("POST", f"{url}/usage", {"Content-Type": "application/json"}, b"{}"), timeout,
                Metrics())


def trickle(data: bytes, conn: socket.socket, every: float = 0.02) -> None:
    for i in range(len(data)):
        conn.sendall(data[i:i + 1])
        time.sleep(every)


def test_trickled_headers_end_at_the_total_deadline(peers) -> None:
    peer = peers(lambda conn, p: p.answer(conn) and trickle(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 400, conn))
    client = http_client(10.0, 2)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(client, peer.url, timeout=0.3)
    assert time.monotonic() - started < 1.5  # the header alone takes 8 s


def test_a_trickled_body_ends_at_the_total_deadline(peers) -> None:
    def slow_body(conn: socket.socket, p: Peer) -> None:
        p.answer(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n")
        trickle(b"x" * 400, conn)
    peer = peers(slow_body)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        post(http_client(10.0, 2), peer.url, timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_keep_alive_reuses_one_connection_and_replaces_one_the_peer_closed(peers) -> None:
    peer = peers(keep_alive)
    client = http_client(10.0, 2)
    for _ in range(5):
        assert post(client, peer.url).status == 200
    assert peer.accepted == 1

    closed = threading.Event()

    def once(conn: socket.socket, p: Peer) -> None:  # answers as if it kept the connection, then closes it
        p.answer(conn)
        conn.sendall(OK)
        conn.close()
        closed.set()
    closing = peers(once)
    for _ in range(3):
        closed.clear()
        assert post(client, closing.url).body == b'{"message":"ok"}'
        assert closed.wait(5)  # closed before the next request: reusing it would be a race the peer wins
    assert closing.accepted == 3  # each idle connection the peer closed was noticed, not written to


def test_a_capped_read_drops_the_connection(peers) -> None:
    def huge(conn: socket.socket, p: Peer) -> None:
        while p.answer(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 2**30)
            for _ in range(2**30 // 65536):
                conn.sendall(b" " * 65536)
                p.written += 65536
    peer = peers(huge)
    client = http_client(10.0, 2)
    answer = post(client, peer.url)
    assert not answer.complete and len(answer.body) == ANSWER_CAP
    assert peer.hung_up.wait(5) and peer.written < 64 * 2**20  # of 1 GiB
    post(client, peer.url)
    assert peer.accepted == 2  # the half-read connection was not reused


def test_in_use_connections_are_bounded(peers) -> None:
    release = threading.Event()

    def held(conn: socket.socket, p: Peer) -> None:
        p.answer(conn)
        release.wait(5)
        conn.sendall(OK)
    peer = peers(held)
    client = http_client(10.0, 1)
    first = threading.Thread(target=post, args=(client, peer.url))
    first.start()
    while not peer.heads:
        time.sleep(0.005)
    with pytest.raises(httpx.PoolTimeout):  # the one connection is busy until the deadline
        post(client, peer.url, timeout=0.2)
    release.set()
    first.join()
    assert peer.accepted == 1


def test_https_goes_through_the_environments_proxy_with_connect(peers, monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing(conn: socket.socket, p: Peer) -> None:
        p.answer(conn)
        conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
    proxy = peers(refusing)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://agent:s3cret@"))
    monkeypatch.setenv("NO_PROXY", "")
    with pytest.raises(httpx.ProxyError, match="407"):
        post(http_client(10.0, 2), "https://api.paigo.test")
    (head,) = proxy.heads
    assert head.startswith(b"CONNECT api.paigo.test:443 HTTP/1.")
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"agent:s3cret") in head


def test_no_proxy_hosts_go_direct(peers, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy, direct = peers(keep_alive), peers(keep_alive)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert post(http_client(10.0, 2), direct.url).status == 200
    assert proxy.accepted == 0 and direct.accepted == 1
    monkeypatch.setenv("NO_PROXY", "")
    assert post(http_client(10.0, 2), direct.url).status == 200
    assert proxy.heads[0].startswith(f"POST {direct.url}/usage HTTP/1.1".encode())  # the absolute URI


def test_a_refused_connection_is_a_connection_error() -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    with pytest.raises(httpx.ConnectError) as refused:
        post(http_client(10.0, 2), url)
    assert transport_failure(refused.value).reason.startswith("connection error: ConnectError")


@pytest.mark.parametrize("how", ["reset", "closed"])
def test_a_peer_hanging_up_instead_of_answering_is_a_connection_error(peers, how: str) -> None:
    def hang_up(conn: socket.socket, p: Peer) -> None:
        p.answer(conn)
        if how == "reset":  # RST instead of FIN
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer = peers(hang_up)
    with pytest.raises(httpx.TransportError) as failed:
        post(http_client(10.0, 2), peer.url)
    assert not isinstance(failed.value, httpx.TimeoutException)
    assert transport_failure(failed.value).reason.startswith("connection error")


def test_the_transport_speaks_plain_http_1_1_with_the_agents_headers(peers) -> None:
    peer = peers(keep_alive)
    transport = WireTransport(2, 5.0)
    answer = httpx.Client(transport=transport).post(f"{peer.url}/usage?x=1", content=b"{}",
                                                    headers={"Accept-Encoding": "identity"})
    assert answer.status_code == 200 and answer.json() == {"message": "ok"}
    lines = peer.heads[0].split(b"\r\n")
    assert lines[0] == b"POST /usage?x=1 HTTP/1.1"
    assert {b"Accept-Encoding: identity", b"Content-Length: 2"} <= set(lines)
    transport.close()


def test_a_header_http_cannot_carry_is_an_httpx_error_not_a_crash(peers) -> None:
    peer = peers(keep_alive)
    bad = request("POST", f"{peer.url}/usage", {"Authorization": "Bearer a\r\nX-Evil: 1"}, b"{}")
    with pytest.raises(httpx.LocalProtocolError):
        send(http_client(10.0, 2), bad, 2.0, Metrics())
    assert not peer.heads


@pytest.mark.parametrize("proxy", ["socks5://127.0.0.1:1080", "https://127.0.0.1:3128"])
def test_a_proxy_the_transport_cannot_speak_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, proxy: str) -> None:
    monkeypatch.setenv("ALL_PROXY", proxy.replace("127.0.0.1", "user:pw@127.0.0.1"))
    with pytest.raises(ConfigError, match=r"only http:// proxies are supported") as raised:
        http_client(1.0)
    assert proxy.split(":")[0] + "://127.0.0.1:" in str(raised.value) and "pw" not in str(raised.value)


def answering(raw: bytes) -> Callable[[socket.socket, Peer], None]:
    def script(conn: socket.socket, p: Peer) -> None:
        while p.answer(conn):
            conn.sendall(raw)
    return script


def test_an_answer_header_that_is_not_ascii_is_read_not_a_crash(peers) -> None:
    peer = peers(answering(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nX-Region: z\xfcrich\r\n"
                           b"Content-Length: 0\r\n\r\n"))
    answer = post(http_client(10.0, 2), peer.url)
    assert answer.status == 503 and answer.headers["Retry-After"] == "7"
    assert answer.headers["X-Region"] == "z\xfcrich"


def test_a_head_longer_than_the_cap_is_a_protocol_error_read_no_further(peers) -> None:
    def endless_head(conn: socket.socket, p: Peer) -> None:
        p.answer(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(2**30 // 4096):
            conn.sendall(b"X-Pad: " + b"x" * 4089 + b"\r\n")
            p.written += 4096
    peer = peers(endless_head)
    with pytest.raises(httpx.RemoteProtocolError, match="head longer than"):
        post(http_client(10.0, 2), peer.url)
    assert peer.hung_up.wait(5) and peer.written < 64 * 2**20  # of 1 GiB of headers


def test_bytes_past_the_end_of_an_answer_leave_the_connection_unused(peers) -> None:
    peer = peers(answering(OK + b"HTTP/1.1 200 OK\r\n"))  # an answer and the start of one nobody asked for
    client = http_client(10.0, 2)
    assert post(client, peer.url).body == b'{"message":"ok"}'
    assert post(client, peer.url).body == b'{"message":"ok"}'
    assert peer.accepted == 2  # the second request did not read the first's stray bytes as its answer


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\n{\"mes\r\nb\r\nsage\":\"ok\"}\r\n0\r\nX-Trailer: 1\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"message\":\"ok\"}",
], ids=["continue-then-chunked", "http-1.0-to-the-close"])
def test_chunked_and_close_delimited_answers_are_read_whole(peers, raw: bytes) -> None:
    def once(conn: socket.socket, p: Peer) -> None:
        p.answer(conn)
        conn.sendall(raw)
    peer = peers(once)
    client = http_client(10.0, 2)
    for _ in range(2):
        answer = post(client, peer.url)
        assert answer.complete and answer.body == b'{"message":"ok"}'
    assert peer.accepted == 2  # neither connection was kept: the peer said it closes each


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 " + b"2" * 5000 + b" OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 5000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
    b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1x 200 OK\r\nContent-Length: 0\r\n\r\n",
], ids=["status-of-5000-digits", "length-of-5000-digits", "two-lengths", "negative-length", "http-1.2", "http-1.1x"])
def test_a_malformed_head_is_a_protocol_error(peers, raw: bytes) -> None:
    peer = peers(answering(raw))
    with pytest.raises(httpx.RemoteProtocolError, match="no HTTP"):
        post(http_client(10.0, 2), peer.url, timeout=0.5)


@pytest.mark.parametrize("chunks", [
    b"-3\r\nhello world\r\n0\r\n\r\n", b"0x5\r\nhello\r\n0\r\n\r\n", b"1_0\r\n0123456789abcdef\r\n0\r\n\r\n",
    b"3\r\nhello\r\n0\r\n\r\n",
], ids=["negative", "0x-prefix", "underscore", "data-past-the-size"])
def test_a_malformed_chunk_is_a_protocol_error(peers, chunks: bytes) -> None:
    peer = peers(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks))
    with pytest.raises(httpx.RemoteProtocolError, match="chunk"):
        post(http_client(10.0, 2), peer.url, timeout=0.5)


@pytest.mark.parametrize("interim", [b"HTTP/1.1 102 Processing\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"],
                         ids=["102", "103"])
def test_interim_answers_precede_the_answer(peers, interim: bytes) -> None:
    peer = peers(answering(interim + OK))
    answer = post(http_client(10.0, 2), peer.url)
    assert answer.status == 200 and answer.body == b'{"message":"ok"}'


def test_answers_without_a_body_or_a_length_keep_the_connection(peers) -> None:
    peer = peers(answering(b"HTTP/1.1 204 No Content\r\nDate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n"))  # as Go sends it
    client = http_client(10.0, 2)
    for _ in range(5):
        assert post(client, peer.url).status == 204
    assert peer.accepted == 1


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
], ids=["length-and-chunked", "switching-protocols"])
def test_an_answer_framed_two_ways_or_switching_protocols_drops_the_connection(peers, raw: bytes) -> None:
    peer = peers(answering(raw))
    client = http_client(10.0, 2)
    for _ in range(2):
        post(client, peer.url)
    assert peer.accepted == 2


@pytest.mark.parametrize("content", [b"{}", b""])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_request_carries_the_headers_httpx_would_give_it(method: str, content: bytes) -> None:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer t"}
    built = request(method, "http://127.0.0.1:9/usage?x=1", headers, content)
    reference = httpx.Request(method, "http://127.0.0.1:9/usage?x=1", headers={**DEFAULT_HEADERS, **headers},
                              content=content)
    assert built.headers.raw == reference.headers.raw and built.read() == content
    assert (built.method, built.url) == (reference.method, reference.url)
