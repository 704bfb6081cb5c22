"""A real HTTP receiver on 127.0.0.1 (port 0) whose behaviour a test switches at will."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections import Counter
from typing import Any

import orjson


class Receiver:
    """mode: "ok", an HTTP status like "503" (a 3xx carries a Location), "timeout" (answers
    too late), "hold" (sets `received` once the whole request is in, answers 200 only after
    `release` is set: a late answer by events, not by timing), "trickle" (a 200 whose body
    comes a byte every 50 ms) or "drop"."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.delay_s = 2.0
        self.batches: list[dict[str, Any]] = []
        self.calls = Counter[str]()
        self.received = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                mode = receiver.mode
                with receiver._lock:
                    receiver.calls[mode] += 1
                if mode == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if mode == "trickle":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        for _ in range(100_000):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(0.05)
                    return
                if mode == "timeout":
                    time.sleep(receiver.delay_s)
                    mode = "ok"
                if mode == "hold":
                    receiver.received.set()
                    receiver.release.wait()
                    mode = "ok"
                if mode == "ok":
                    doc = orjson.loads(body)
                    assert self.headers["X-Flowagg-Batch-Id"] == doc["batchId"]
                    with receiver._lock:
                        receiver.batches.append(doc)
                    self.send_response(200)
                else:
                    self.send_response(int(mode))
                    if mode.startswith("3"):
                        self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/batches"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def entry_ids(self) -> Counter[str]:
        with self._lock:
            return Counter(e["entryId"] for b in self.batches for e in b["entries"])

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
