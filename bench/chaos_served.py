"""The served side of bench/chaos.py: a vLLM OpenAI server that can be killed and started again on the same port,
and a proxy in front of it that can answer 429 for a while and answers 503 while the server is down."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.stack import free_port, vllm_server


class Server:
    """vLLM's OpenAI server for `model` on 127.0.0.1 (`tests.stack.vllm_server`: its --max-logprobs 20 covers the
    demo's loss.top_k of 16) at the demo's context, on a port kept across restarts; its output appended to `log`."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log, self.port = str(model), log, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> float:
        """Seconds it took to answer /health."""
        t0 = time.time()
        self.proc = vllm_server(self.model, self.port, ["--max-model-len", "128"], self.log, timeout=600)
        return time.time() - t0

    def stop(self) -> None:
        """SIGKILL its whole session: the API server and its engine process."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Proxy:
    """Forwards every request to `server`; answers 429 (Retry-After: 2) while throttled and 503 while the server
    cannot be reached. `refused` counts those answers by status; `answered` is when it last forwarded a 200."""

    def __init__(self, server: Server) -> None:
        self.server, self.until, self.answered = server, 0.0, 0.0
        self.refused: collections.Counter[int] = collections.Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.forward(self, None)

            def do_POST(self) -> None:
                proxy.forward(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_port}/v1"

    def throttle(self, seconds: float) -> None:
        self.until = time.time() + seconds

    def wait_answered(self, after: float, timeout: float = 900) -> bool:
        """Whether a request was forwarded and answered 200 at or after `after` within `timeout`."""
        t0 = time.time()
        while self.answered < after:
            if time.time() - t0 > timeout:
                return False
            time.sleep(0.2)
        return True

    def forward(self, handler: BaseHTTPRequestHandler, body: bytes | None) -> None:
        if time.time() < self.until:
            return self.reply(handler, 429, b'{"error": "rate limited"}', {"Retry-After": "2"})
        headers = {k: v for k, v in handler.headers.items() if k.lower() in ("content-type", "authorization")}
        request = urllib.request.Request(self.server.url + handler.path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as err:
            status, data = err.code, err.read()
        except OSError:
            return self.reply(handler, 503, b'{"error": "upstream unavailable"}', {})
        if status == 200:
            self.answered = time.time()
        self.reply(handler, status, data, {})

    def reply(self, handler: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str]) -> None:
        if status in (429, 503):
            self.refused[status] += 1
        handler.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    def __enter__(self) -> Proxy:
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
