"""A small client for ``rainclf serve``, standard library only (``http.client``).

    encode_multipart([(filename, bytes), ...])   → (body, content type) with parts named "file"
    Client(url).predict(paths_or_pairs)           → the decoded JSON answer (raises ServeHTTPError
                                                    with the server's {"error"} on 4xx / 5xx)
    Client(url).get(path)                         → (status, headers, body bytes)

One ``Client`` keeps one keep-alive connection; use one per thread.
"""

from __future__ import annotations

import http.client
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit


class ServeHTTPError(Exception):
    def __init__(self, status: int, body: bytes, headers: dict):
        self.status, self.body, self.headers = status, body, headers
        try:
            self.error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            self.error = body[:200].decode("utf-8", "replace")
        super().__init__(f"HTTP {status}: {self.error}")


def encode_multipart(files: Iterable[tuple[str | None, bytes]], field: str = "file") -> tuple[bytes, str]:
    """multipart/form-data with one part named ``field`` per (filename, data)."""
    boundary = "rainclf-" + uuid.uuid4().hex
    chunks = []
    for filename, data in files:
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            # raw UTF-8 as browsers send it; only the quote and line breaks are escaped
            name = os.path.basename(filename).replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
            disposition += f'; filename="{name}"'
        chunks += [f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                   "Content-Type: application/octet-stream\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: expected http://HOST:PORT")
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        """One request on the kept connection (reconnecting once if the server closed it)."""
        for attempt in (0, 1):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                r = self._conn.getresponse()
                data = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
                continue
            if r.getheader("connection", "").lower() == "close":
                self.close()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        raise AssertionError("unreachable")

    def get(self, path: str) -> tuple[int, dict, bytes]:
        return self.request("GET", path)

    def predict(self, items: Iterable[str | Path | tuple[str | None, bytes]]) -> dict:
        """POST /v1/predict with one part per item (a path, or a (filename, bytes) pair)."""
        files = [(str(i), Path(i).read_bytes()) if isinstance(i, (str, Path)) else i for i in items]
        body, content_type = encode_multipart(files)
        status, headers, data = self.request("POST", "/v1/predict", body, {"Content-Type": content_type})
        if status != 200:
            raise ServeHTTPError(status, data, headers)
        return json.loads(data)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
