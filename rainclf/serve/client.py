"""A small client for ``rainclf serve``, standard library only (``http.client``).

    encode_multipart([(filename, bytes), ...])   → (body, content type) with parts named "file"
    Client(url).predict(paths_or_pairs)           → the decoded JSON answer (raises ServeHTTPError
                                                    with the server's {"error"} on 4xx / 5xx)
    Client(url).get(path)                         → (status, headers, body bytes)
    ServerProcess(argv).start()                   → ``rainclf serve`` in a child process, once ready

One ``Client`` keeps one keep-alive connection; use one per thread.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
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


class ServerProcess:
    """``rainclf serve`` in a child process on a free port, for scripts and tests:

        with ServerProcess([sys.executable, "-m", "rainclf.cli", "serve", MODEL_DIR]) as server:
            Client(server.url).predict([...])

    ``--port 0`` is appended (the kernel picks a free port; uvicorn logs it); ``start`` returns
    once /readyz answers 200. ``stop()`` sends SIGTERM and returns the exit status; ``log`` holds
    the child's stderr lines."""

    _RUNNING = re.compile(r"Uvicorn running on http://([^:\s]+):(\d+)")

    def __init__(self, argv: list[str], env: dict | None = None, cwd: str | None = None):
        self.argv, self.env, self.cwd = list(argv) + ["--port", "0"], env, cwd
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self.url = ""

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=self.env, cwd=self.cwd)
        found = threading.Event()

        def drain():     # read stderr to the end: a full pipe would block the server
            for line in self.proc.stderr:
                self.log.append(line.rstrip("\n"))
                m = self._RUNNING.search(line)
                if m and not self.url:
                    self.url = f"http://{m.group(1)}:{m.group(2)}"
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        found.wait(timeout)
        while self.url and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if Client(self.url, timeout=5).get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rainclf serve did not become ready: {' | '.join(self.log[-5:])}")

    def stop(self, timeout: float = 60.0, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
