"""A read-only HTTP server over one folder, on 127.0.0.1 and an ephemeral port.

The synthetic source and `make ingest` serve their files through it so that the real download
path (img2dataset over HTTP) runs offline. It lives in a thread of the job that needs it and stops
when that job leaves the `serve_folder` block: no process outlives the job.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_MAGIC = (  # content type by the file's first bytes, as a real server would label it
    (b"\xff\xd8", "image/jpeg"),
    (b"\x89PNG", "image/png"),
    (b"RIFF", "image/webp"),
    (b"GIF8", "image/gif"),
    (b"<", "text/html; charset=utf-8"),
)


def content_type(head: bytes) -> str:
    """MIME type guessed from a file's first bytes."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return "application/octet-stream"


class _FolderHandler(BaseHTTPRequestHandler):
    """GET a file under `root`; 404 for anything missing or outside it."""

    def __init__(self, *args, root: Path, **kwargs):
        self.root = root
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        relative = unquote(urlsplit(self.path).path).lstrip("/")
        path = (self.root / relative).resolve()
        if not path.is_file() or not path.is_relative_to(self.root):
            self.send_error(404, "Not Found")
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type(body[:8]))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002
        """Silence the per-request log: thousands of lines per job say nothing."""


@contextlib.contextmanager
def serve_folder(root: str | Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `root` over HTTP for the duration of the block; yields the base URL ending in '/'."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"cannot serve {root}: no such folder")
    server = ThreadingHTTPServer((host, 0), partial(_FolderHandler, root=root))
    server.daemon_threads = True
    server.request_queue_size = 256  # many download threads connect at once
    thread = threading.Thread(target=server.serve_forever, name="unclip-http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
