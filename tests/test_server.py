"""The local HTTP server: serves files with honest content types, 404s the misses, and stops."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from pipelines.server import serve_folder


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.headers["Content-Type"], response.read()


def test_serves_answers_404_and_stops(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0jpeg-bytes")
    (tmp_path / "images" / "page.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path.parent / "secret.txt").write_text("outside")
    with serve_folder(tmp_path) as base:
        host, port = urlsplit(base).hostname, urlsplit(base).port
        assert host == "127.0.0.1" and port > 0
        assert _get(base + "images/a.jpg") == (200, "image/jpeg", b"\xff\xd8\xff\xe0jpeg-bytes")
        assert _get(base + "images/page.jpg")[1].startswith("text/html")
        for missing in ("images/missing.jpg", "../secret.txt", "images"):
            with pytest.raises(urllib.error.HTTPError) as err:
                _get(base + missing)
            assert err.value.code == 404
    assert not any(t.name == "unclip-http" for t in threading.enumerate())
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        with serve_folder(tmp_path / "nope"):
            pass
