"""Connection limits of a real server over raw sockets: a bounded request head (JSON 431, read by the
client without a reset), and slow or idle clients timed out, so that they cannot use up the server's
file descriptors."""

import json
import resource
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server

FD_LIMIT = 128  # the server's open-files limit in the slow-client test; it opens far more sockets


def serve(*args: str, preexec_fn=None):
    proc, base = start_server("--no-warmup", "--log-level", "error", *args, preexec_fn=preexec_fn)
    # Drain the server's output, so that a chatty log can never fill the pipe and stall it.
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, base


def address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


def exchange(base: str, head: bytes) -> tuple[int, dict]:
    """Send a whole request head, then read the whole response until the server closes."""
    with socket.create_connection(address(base), timeout=30) as s:
        s.sendall(head)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    _, _, body = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(body)


def request_head(*headers: bytes) -> bytes:
    return b"GET /health HTTP/1.1\r\nHost: test\r\nConnection: close\r\n" + b"".join(headers) + b"\r\n"


@pytest.fixture(scope="module")
def limited():
    proc, base = serve("--max-header-bytes", "4096", "--max-headers", "20")
    yield base
    stop_server(proc)


@pytest.mark.parametrize("size", [3_000])
def test_a_head_within_the_limit_is_served(limited, size):
    status, body = exchange(limited, request_head(b"X-Pad: " + b"a" * size + b"\r\n"))
    assert status == 200 and body["status"] == "ready"


@pytest.mark.parametrize("size", [5_000, 100_000, 200_000])
def test_a_head_over_the_limit_is_a_json_431_without_a_reset(limited, size):
    status, body = exchange(limited, request_head(b"X-Pad: " + b"a" * size + b"\r\n"))
    assert status == 431 and body["error"]["status"] == 431
    assert "4096 bytes" in body["error"]["message"]
    assert httpx.get(f"{limited}/health").status_code == 200


def test_too_many_headers_are_a_json_431(limited):
    status, body = exchange(limited, request_head(*(b"X-H%d: v\r\n" % i for i in range(30))))
    assert status == 431 and "more than 20 request headers" in body["error"]["message"]
    status, _ = exchange(limited, request_head(*(b"X-H%d: v\r\n" % i for i in range(10))))
    assert status == 200


def test_a_malformed_head_is_a_json_400(limited):
    status, body = exchange(limited, request_head(b"no colon in this header line\r\n"))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def lower_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_slow_and_idle_clients_are_timed_out_and_cannot_exhaust_file_descriptors():
    proc, base = serve("--header-timeout-s", "1", "--body-timeout-s", "1", "--keep-alive-s", "1",
                       preexec_fn=lower_fd_limit)
    try:
        count = 3 * FD_LIMIT
        head = b"POST /generate HTTP/1.1\r\nHost: test\r\ncontent-type: application/json\r\ncontent-length: 100\r\n"
        clients = []  # (socket, bytes still to trickle a byte at a time)
        for i in range(count):
            s = socket.create_connection(address(base), timeout=30)
            s.setblocking(False)
            kind = i % 3  # idle; headers a byte at a time; headers sent, body a byte at a time
            clients.append([s, b"" if kind == 0 else head if kind == 1 else b'{"prompt": "1+1=", ' * 10])
            if kind == 2:
                s.sendall(head + b"\r\n")
        closed: set[int] = set()
        responses: dict[int, bytes] = {}
        deadline = time.monotonic() + 120  # generous: the limits are 1 s, the machine may be slow
        while len(closed) < count and time.monotonic() < deadline:
            for i, client in enumerate(clients):
                if i in closed:
                    continue
                s, pending = client
                try:
                    while data := s.recv(65536):
                        responses[i] = responses.get(i, b"") + data
                    closed.add(i)  # end of stream: the server closed it
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(i)
                    continue
                if pending:
                    try:
                        s.send(pending[:1])
                        client[1] = pending[1:]
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed.add(i)
            time.sleep(0.05)
        for s, _ in clients:
            s.close()
        assert len(closed) == count, f"{count - len(closed)} of {count} slow clients still open"
        timed_out = [r for r in responses.values() if r.startswith(b"HTTP/1.1 408")]
        assert timed_out and all(b'"request_timeout"' in r for r in timed_out)
        r = httpx.post(f"{base}/generate", json={"prompt": "17+25=", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200 and r.json()["text"] == "42"
    finally:
        stop_server(proc)
