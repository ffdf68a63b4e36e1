"""The replica's own HTTP server, through a real replica process and raw sockets: keep-alive, pipelined
requests answered in order, `Connection: close`, malformed requests, unknown paths, and a SIGTERM that
lets the requests it holds finish."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import httptools
import pytest

from tests.integration.replica_tools import ReplicaProcess

pytestmark = pytest.mark.slow

X_BODY = json.dumps({"dataframe_split": {"columns": ["x"], "data": [[2.0]]}}).encode()


def request(path: str = "/invocations", body: bytes = X_BODY, method: str = "POST", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: replica\r\nContent-Type: application/json\r\n{extra}"
    if method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + (body if method == "POST" else b"")


class Responses:
    """Reads HTTP/1.1 responses off a socket with httptools until `n` are complete or the peer closes."""

    def __init__(self) -> None:
        self.done: list[tuple[int, dict[bytes, bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._body = b""
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.done.append((self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""

    def read(self, sock: socket.socket, n: int) -> tuple[list[tuple[int, dict[bytes, bytes], bytes]], bool]:
        """The first `n` responses, and whether the server then closed the connection."""
        sock.settimeout(30)
        while len(self.done) < n:
            data = sock.recv(65536)
            if not data:
                return self.done, True
            self.parser.feed_data(data)
        sock.settimeout(0.3)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False
        return self.done, closed


@pytest.fixture(scope="module")
def replica(model_zoo, tmp_path_factory) -> Iterator[ReplicaProcess]:  # type: ignore[no-untyped-def]
    started = ReplicaProcess(model_zoo("params_model"), tmp_path_factory.mktemp("replica-http"), max_concurrency=8)
    yield started
    started.stop()


def connect(replica: ReplicaProcess) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(replica.socket)
    return sock


def test_keep_alive_and_pipelined_requests_are_answered_in_order(replica: ReplicaProcess) -> None:
    bodies = [json.dumps({"dataframe_split": {"columns": ["x"], "data": [[float(i)]]}}).encode() for i in range(6)]
    with connect(replica) as sock:
        sock.sendall(request(body=bodies[0]))  # one, then five written at once
        first, closed = Responses().read(sock, 1)
        assert not closed
        sock.sendall(b"".join(request(body=b) for b in bodies[1:]))
        rest, closed = Responses().read(sock, 5)
    assert not closed
    answers = first + rest
    assert [status for status, _, _ in answers] == [200] * 6
    assert [json.loads(body)["predictions"] for _, _, body in answers] == [[float(i)] for i in range(6)]
    assert all(headers[b"content-type"] == b"application/json" for _, headers, _ in answers)


def test_connection_close_is_honoured(replica: ReplicaProcess) -> None:
    with connect(replica) as sock:
        sock.sendall(request(extra="Connection: close\r\n"))
        answers, closed = Responses().read(sock, 1)
    assert answers[0][0] == 200
    assert answers[0][1][b"connection"] == b"close"
    assert closed


def test_open_paths_and_unknown_ones(replica: ReplicaProcess) -> None:
    with connect(replica) as sock:
        sock.sendall(request("/ping", method="GET") + request("/stats", method="GET")
                     + request("/nope", method="GET") + request("/invocations", method="GET"))
        answers, closed = Responses().read(sock, 4)
    assert not closed
    assert [status for status, _, _ in answers] == [200, 200, 404, 404]
    stats = json.loads(answers[1][2])
    assert stats["replica_id"] == "test"
    assert stats["fast_path"] == "mlflow"  # a params signature: MLflow's predict passes the defaults
    assert json.loads(answers[3][2])["error_code"] == "NOT_FOUND"
    with replica.client() as client:
        head = client.head("/ping")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == "1"


def test_malformed_http_gets_400_and_the_connection_closes(replica: ReplicaProcess) -> None:
    with connect(replica) as sock:
        sock.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        answers, closed = Responses().read(sock, 1)
    assert answers[0][0] == 400
    assert json.loads(answers[0][2])["error_code"] == "MALFORMED_REQUEST"
    assert closed
    with replica.client() as client:  # and the replica serves on
        assert client.post("/invocations", content=X_BODY, headers={"content-type": "application/json"}).json() \
            == {"predictions": [2.0]}


def test_a_malformed_request_after_a_good_one_is_refused_after_the_good_ones_answer(replica: ReplicaProcess) -> None:
    with connect(replica) as sock:
        sock.sendall(request() + b"THIS IS NOT HTTP\r\n\r\n")
        answers, closed = Responses().read(sock, 2)
    assert [status for status, _, _ in answers] == [200, 400]
    assert json.loads(answers[0][2]) == {"predictions": [2.0]}
    assert closed


def test_sigterm_answers_what_it_holds_then_exits(model_zoo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    replica = ReplicaProcess(model_zoo("sleep_model", seconds=1.0), tmp_path, max_concurrency=4)
    try:
        answers: list[tuple[int, bytes]] = []

        def call() -> None:
            with replica.client() as client:
                r = client.post("/invocations", content=X_BODY, headers={"content-type": "application/json"})
                answers.append((r.status_code, r.content))

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 20
        while replica.stats()["in_flight"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        replica.proc.send_signal(signal.SIGTERM)
        thread.join(30)
        assert replica.proc.wait(30) == 0
        assert answers == [(200, b'{"predictions": [1]}')]
    finally:
        replica.stop()
