"""`llamacpu serve` in a subprocess for the server tests, and raw-socket HTTP helpers."""
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import default_sigint

ROOT = Path(__file__).resolve().parents[1]
N_CTX = 1024
START_TIMEOUT_S = 60   # loading SmolLM2 and starting uvicorn on a busy 2-core CI machine


class Server:
    """`python -m llamacpu serve MODEL --port 0 -c N_CTX -t 1 ...` with its output in a log file.
    key: the --api-key given in args, sent by health()."""

    def __init__(self, model, log: Path, *args, key: str | None = None):
        self.log, self.key = log, key
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "llamacpu", "serve", str(model), "--port", "0",
                                          "-c", str(N_CTX), "-t", "1", *args],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                         preexec_fn=default_sigint)   # stop() and tests send SIGINT
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            m = re.search(r"at (http://127\.0\.0\.1:(\d+))", self.output())
            if m:
                self.url, self.port = m.group(1), int(m.group(2))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{self.output()}")
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def health(self) -> dict:
        return httpx.get(self.url + "/health", headers=self.auth, timeout=10).json()

    def wait_idle(self, timeout=10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if h["queue"]["running"] == 0 and h["queue"]["waiting"] == 0:
                return h
            assert time.monotonic() < deadline, f"the server is still busy: {h}"
            time.sleep(0.02)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def raw_request(url: str, path: str, body, key: str | None = None, method: str = "POST") -> socket.socket:
    """Send a request on a fresh socket and return it unread (the client side of a waiting request).
    body: a dict (sent as JSON) or bytes."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    send_request(s, host, path, body, key, method)
    return s


def send_request(s: socket.socket, host: str, path: str, body, key: str | None = None, method: str = "POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    s.sendall(head.encode() + b"\r\n" + (data if method == "POST" else b""))


def read_response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length (head and body), read from the socket."""
    out = b""
    while b"\r\n\r\n" not in out or len(out.split(b"\r\n\r\n", 1)[1]) < int(
            re.search(rb"content-length: (\d+)", out.lower()).group(1)):
        piece = s.recv(65536)
        assert piece, out
        out += piece
    return out
