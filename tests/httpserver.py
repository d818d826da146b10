"""A tiny HTTP server on 127.0.0.1 serving test images, counting requests, breaking on cue."""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ImageServer:
    root: Path
    port: int = 0
    gets: Counter[str] = field(default_factory=Counter)
    # path -> how to misbehave: an HTTP status ("404", "500"), "truncate" (send half, then
    # close), "hold" (send
    # half, set `holding`, and send the rest once `release` is set), "trickle" (the
    # headers, then one byte every `trickle_interval` seconds), "silent" (read the request,
    # never answer)
    faults: dict[str, str] = field(default_factory=dict)
    trickle_interval: float = 1.0
    holding: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)  # the server ends

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@contextmanager
def serve(root: Path) -> Iterator[ImageServer]:
    state = ImageServer(root)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            with lock:
                state.gets[name] += 1
            fault = state.faults.get(name)
            path = state.root / name
            if fault == "silent":
                state.stopping.wait(120)
                return
            if fault is not None and fault.isdigit():
                self.send_error(int(fault))
                return
            if not path.is_file():
                self.send_error(404, "no such image")
                return
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            # Streamed, as a real image server does: sendfile(2), never the whole file
            # in memory before the first byte goes out.
            with open(path, "rb") as f:
                if fault == "trickle":
                    while not state.stopping.wait(state.trickle_interval):
                        try:
                            self.wfile.write(f.read(1))
                            self.wfile.flush()
                        except OSError:  # the client gave up
                            return
                    return
                if fault == "truncate":
                    self.wfile.write(f.read(size // 2))
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if fault == "hold":
                    self.wfile.write(f.read(size // 2))
                    self.wfile.flush()
                    state.holding.set()
                    state.release.wait(120)
                self.wfile.flush()
                self.connection.sendfile(f)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()
