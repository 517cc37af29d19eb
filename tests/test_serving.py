"""The servers' HTTP client (`rsd_generation.serving.request_json`) against a local stub: transient failures are
retried with backoff, final ones are not, and the error that ends a request names the URL."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rsd_generation.serving import request_json


class _Stub(BaseHTTPRequestHandler):
    """Answers the statuses in `self.server.script` in turn, then 200 with a JSON body."""

    def do_POST(self):
        self.server.calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        status = self.server.script.pop(0) if self.server.script else 200
        body = json.dumps({"ok": True}).encode() if status == 200 else b"busy"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.calls, server.script = 0, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/v1/completions"


def test_transient_failures_are_retried(stub):
    stub.script = [503, 429]
    assert request_json(_url(stub), {"x": 1}, timeout=10, backoff=0.01) == {"ok": True}
    assert stub.calls == 3


def test_a_final_failure_is_not_retried_and_names_the_url(stub):
    stub.script = [400]
    with pytest.raises(RuntimeError, match=f"{_url(stub)} answered 400: busy"):
        request_json(_url(stub), {"x": 1}, timeout=10, backoff=0.01)
    assert stub.calls == 1


def test_retries_end_with_an_error_naming_the_url(stub):
    stub.script = [503] * 5
    with pytest.raises(RuntimeError, match="answered 503"):
        request_json(_url(stub), {"x": 1}, timeout=10, retries=2, backoff=0.01)
    assert stub.calls == 3


def test_a_server_that_is_gone_is_named():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=rf"http://127.0.0.1:{port}/health did not answer \(2 attempts\)"):
        request_json(f"http://127.0.0.1:{port}/health", None, timeout=5, retries=1, backoff=0.01)
