"""Reading request bodies and uploaded images with hard limits, in memory only.

Three guards, outermost first:

* :class:`BodyLimitMiddleware` refuses any request body larger than a per-route
  limit: at once from ``Content-Length``, or while streaming (chunked bodies), so a
  client can never make the server buffer more than the limit;
* :func:`read_multipart_file` streams a ``multipart/form-data`` body through
  python-multipart and keeps the bytes of one field in memory, stopping at
  ``limit + 1`` bytes (413). Nothing is ever written to disk (Starlette's own form
  parser spools files larger than 1 MiB to temporary files);
* :func:`sniff_image` identifies the image from its bytes (the declared content
  type and file name are ignored) among an allowlist of formats (415 otherwise) and
  checks its pixel count from the header, before anything is decoded (413).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException

#: Formats accepted for uploads. PIL can open more (EPS, for one, runs Ghostscript),
#: but a search service has no reason to expose those decoders to the network.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

#: Media type of each format, for serving stored images.
MEDIA_TYPES = {
    "JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp",
    "TIFF": "image/tiff", "PPM": "image/x-portable-anymap", "MPO": "image/jpeg",
}

#: Room for the multipart envelope (boundaries, part headers, small fields) on top of the file itself.
MULTIPART_SLACK = 64 * 1024


class ApiError(HTTPException):
    """An error answered as JSON ``{"error": message, "detail": detail}`` with *status*.

    A Starlette ``HTTPException``, so that FastAPI passes it through unchanged when it
    is raised while a declared body is being read (it turns other errors into 400)."""

    def __init__(self, status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers


def too_large(limit: int, what: str = "request body") -> ApiError:
    return ApiError(413, f"{what} is larger than the limit of {format_bytes(limit)}",
                    {"limit_bytes": limit})


def format_bytes(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n >= 1 << 10 and n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


# ---------------------------------------------------------------------------
# request bodies
# ---------------------------------------------------------------------------

class BodyLimitMiddleware:
    """ASGI middleware: at most ``limit_for(path)`` bytes of request body, else 413.

    A declared ``Content-Length`` above the limit is refused before the body is read;
    a body that turns out longer (chunked transfer, or a lying header) raises
    :class:`ApiError` from ``receive`` as soon as it passes the limit, which the
    route sees while reading and the app's error handler answers."""

    def __init__(self, app, limit_for: Callable[[str], tuple[int, int, str]]):
        """*limit_for(path)* gives (bytes allowed, limit to report, what to call the body)."""
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, shown, what = self.limit_for(scope.get("path", ""))
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
        if declared is not None and declared > limit:
            return await _send_json(send, too_large(shown, what))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large(shown, what)
            return message

        return await self.app(scope, limited_receive, send)


async def _send_json(send, err: ApiError) -> None:
    import json

    body = json.dumps({"error": err.message, "detail": err.detail}, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class UploadedFile:
    data: bytes
    filename: str | None
    content_type: str | None


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    from python_multipart.multipart import parse_options_header

    kind, params = parse_options_header(value)
    return kind.decode("latin-1").lower(), {k.decode("latin-1").lower(): v.decode("utf-8", "replace")
                                            for k, v in params.items()}


async def read_multipart_file(content_type: str | None, chunks: AsyncIterator[bytes], field: str,
                              limit: int) -> UploadedFile:
    """The bytes of form field *field* of a ``multipart/form-data`` body, at most *limit* bytes.

    Raises :class:`ApiError`: 415 when the body is not multipart, 413 as soon as the
    field passes *limit*, 400 for a malformed body, 422 when the field is missing."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser

    kind, params = _header_params(content_type or "")
    if kind != "multipart/form-data" or not params.get("boundary"):
        raise ApiError(415, f"send the image as multipart/form-data with a field named {field!r} "
                            f"(got content type {content_type or 'none'!r})")
    state: dict[str, Any] = {"headers": {}, "name": b"", "value": b"", "current": None, "found": None,
                             "ended": False}
    buf = bytearray()

    def on_part_begin():
        state["headers"] = {}
        state["current"] = None

    def on_header_field(data, start, end):
        state["name"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["name"].decode("latin-1").lower()] = state["value"].decode("utf-8", "replace")
        state["name"], state["value"] = b"", b""

    def on_headers_finished():
        _, disp = _header_params(state["headers"].get("content-disposition", ""))
        if disp.get("name") == field and state["found"] is None:
            state["current"] = field
            state["found"] = UploadedFile(b"", disp.get("filename"), state["headers"].get("content-type"))

    def on_part_data(data, start, end):
        if state["current"] == field:
            buf.extend(data[start:end])
            if len(buf) > limit:
                raise too_large(limit, "uploaded file")

    def on_part_end():
        state["current"] = None

    def on_end():
        state["ended"] = True

    parser = MultipartParser(params["boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end, "on_end": on_end})
    try:
        async for chunk in chunks:
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise ApiError(400, f"malformed multipart body: {e}") from None
    if state["found"] is None:
        raise ApiError(422, f"no form field named {field!r} in the upload", {"field": field})
    if not state["ended"]:
        raise ApiError(400, "malformed multipart body: it ends before its closing boundary")
    state["found"].data = bytes(buf)
    return state["found"]


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------

@dataclass
class ImageInfo:
    format: str
    width: int
    height: int
    mode: str


def sniff_image(data: bytes, max_pixels: int, formats: tuple[str, ...] = UPLOAD_FORMATS) -> ImageInfo:
    """Identify an image from its bytes and check its pixel count from the header only.

    422 for an empty file, 415 for anything that is not an image of *formats*, 413
    when width x height exceeds *max_pixels* (a decompression bomb is caught here:
    a few hundred bytes can declare a 60000 x 60000 image)."""
    if not data:
        raise ApiError(422, "the uploaded file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(formats)) as img:
                info = ImageInfo(img.format or "?", img.width, img.height, img.mode)
    except UnidentifiedImageError:
        raise ApiError(415, f"not an image, or not one of the accepted formats ({', '.join(formats)})",
                       {"accepted": list(formats)}) from None
    except Image.DecompressionBombError as e:  # PIL's own, far higher, limit: refused before we see a size
        raise ApiError(413, f"image has too many pixels (the limit is {max_pixels}): {e}",
                       {"max_pixels": max_pixels}) from None
    except (OSError, SyntaxError, ValueError) as e:  # a recognised format with a broken header
        raise ApiError(422, f"unreadable image header: {e}") from None
    if info.width * info.height > max_pixels:
        raise ApiError(413, f"image has too many pixels: {info.width}x{info.height} = {info.width * info.height} "
                            f"exceeds the limit of {max_pixels}",
                       {"width": info.width, "height": info.height, "max_pixels": max_pixels})
    return info
