"""Request bodies → uploaded files, with every way a request can be wrong as one ``RequestError``
(HTTP status, metric kind, one-line message). Never a 500 for bad input.

    read_body(request, limit)   the whole body, at most ``limit`` bytes (413 beyond)
    uploads(content_type, body, query)
                                the uploaded images as ``Upload(filename, data)``: multipart/form-data
                                parts named ``file``, or the body itself for application/octet-stream
                                and image/* (then ``?filename=`` names it)

The body is held in memory (it is bounded by --max-body-mb), and multipart is parsed by
python-multipart's streaming parser in one pass: no temporary files.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

FIELD = "file"                      # the multipart part name that carries an image
SINGLE_IMAGE_TYPES = ("application/octet-stream", "image/")
DRAIN_FACTOR = 4                    # read (and drop) bodies up to 4 × the limit, so the client sees the 413


class RequestError(Exception):
    def __init__(self, status: int, kind: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.retry_after = status, kind, message, retry_after


@dataclass
class Upload:
    filename: str | None
    data: bytes


def _too_large(size: int | str, limit: int) -> RequestError:
    return RequestError(413, "too_large", f"request body is {size} bytes, over the server's limit of {limit} "
                                          "bytes (--max-body-mb): send fewer or smaller images per request")


async def read_body(request, limit: int) -> bytes:
    """The body of a Starlette ``request``, refused (413) past ``limit`` bytes, without holding more
    than ``limit`` bytes. An announced oversized body is read and dropped first (up to
    DRAIN_FACTOR × limit), since most clients only read the answer once they have sent it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "bad_request", f"Content-Length {declared!r} is not a number") from None
        if size > limit:
            # a client that sent "Expect: 100-continue" waits for us: answer at once, it sends nothing
            if size <= DRAIN_FACTOR * limit and "expect" not in request.headers:
                async for _ in request.stream():
                    pass
            raise _too_large(size, limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(f"over {limit}", limit)
    return bytes(body)


def uploads(content_type: str | None, body: bytes, query_filename: str | None = None) -> list[Upload]:
    """The images a request carries (at least one), or RequestError."""
    media, params = parse_options_header(content_type or "")
    media = media.decode("latin-1").lower()
    if media == "multipart/form-data":
        return _multipart(body, params.get(b"boundary"))
    if media.startswith(SINGLE_IMAGE_TYPES):
        if not body:
            raise RequestError(400, "no_images", f"empty {media} body: send one image as the body")
        return [Upload(query_filename, body)]
    raise RequestError(415, "content_type",
                       f"unsupported Content-Type {content_type or '(none)'!r}: send multipart/form-data with "
                       f"parts named {FIELD!r}, or one image as application/octet-stream")


def _multipart(body: bytes, boundary: bytes | None) -> list[Upload]:
    if not boundary:
        raise RequestError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
    parts: list[dict] = []
    state = {"header": b"", "value": b"", "ended": False}

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray(), "done": False})

    def on_header_field(data, start, end):
        state["header"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        parts[-1]["headers"][state["header"].lower()] = state["value"]
        state["header"] = state["value"] = b""

    def on_part_data(data, start, end):
        parts[-1]["data"] += data[start:end]

    def on_part_end():
        parts[-1]["done"] = True

    def on_end():
        state["ended"] = True

    try:
        parser = MultipartParser(boundary, {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field,
            "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_part_data": on_part_data, "on_part_end": on_part_end, "on_end": on_end})
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise RequestError(400, "bad_multipart", f"malformed multipart body ({' '.join(str(e).split())})") from None
    if not state["ended"]:
        raise RequestError(400, "bad_multipart", "multipart body ends before its closing boundary (truncated?)")
    files, names = [], []
    for part in parts:
        if not part["done"]:
            continue
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        names.append(name)
        if name == FIELD:
            filename = options.get(b"filename")
            files.append(Upload(filename.decode("utf-8", "replace") if filename is not None else None,
                                bytes(part["data"])))
    if not files:
        got = f" (got parts named {', '.join(repr(n) for n in names)})" if names else " (got no parts)"
        raise RequestError(400, "no_images", f"no image parts: send one or more multipart parts named "
                                             f"{FIELD!r}{got}")
    return files
