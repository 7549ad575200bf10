"""Upload validation, cheapest check first (DESIGN §5), and the in-memory request class.

`validate_upload(request, settings)` runs, in order:
1. request bytes: Flask's `MAX_CONTENT_LENGTH` (werkzeug raises 413 while parsing the body)
   -> `payload_too_large`; a body that does not arrive within `M2FP_REQUEST_READ_TIMEOUT`
   (`api.read_deadline` cuts it) -> 408 `request_timeout` (not a strike: slow is not invalid);
2. exactly one file part named `image` with a non-empty name and body -> 400 `missing_image`;
3. the file name: no NUL/control characters, no path separators, at most 255 characters, a
   non-empty stem and a final extension in {jpg, jpeg, png} (case-insensitive). More dots are
   fine (`holiday.2024.jpg`), but an inner segment that is a script or executable extension
   (`x.php.jpg`) is refused: the name is never used to store or serve anything, so this is
   not a defence of ours, but such names are a classic probe and count as a strike -> 415
   `unsupported_type`;
4. libmagic's MIME type of the first 2 KB must be image/jpeg or image/png and agree with the
   extension -> 415 `type_mismatch` (a filter, not proof: OWASP; Pillow is the next check);
5. dimensions from the header only: `shared.imaging.open_untrusted` (Pillow's lazy open of JPEG
   or PNG under the decompression-bomb guard, the same open as the worker's decode) parses the
   header and never allocates pixels (no `.load()`); more than `max_pixels` or a
   side longer than `max_image_side` -> 413 `image_too_large`; an unreadable header -> 422
   `undecodable_image`.

The client's Content-Type of the part is ignored (it cannot be trusted). Full decoding happens
only in the worker, under pixel limits of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from io import BytesIO
from typing import IO

import flask
import magic
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from api.read_deadline import DEADLINES
from shared.config import Settings
from shared.errors import (
    BadRequest,
    MissingImage,
    PayloadTooLarge,
    RequestTimeout,
    TooManyPixels,
    TypeMismatch,
    UndecodableImage,
    UnsupportedType,
)
from shared.imaging import open_untrusted

FIELD = "image"
MAGIC_BYTES = 2048
MAX_NAME_LENGTH = 255
EXTENSION_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png"}
MIME_FORMATS = {"image/jpeg": ("JPEG", "MPO"), "image/png": ("PNG",)}
# Inner name segments that mark a double-extension probe (`shell.php.jpg`).
SCRIPT_EXTENSIONS = frozenset({
    "php", "php3", "php4", "php5", "php7", "phtml", "phar", "asp", "aspx", "ashx", "jsp", "jspx",
    "cgi", "pl", "py", "rb", "sh", "bash", "exe", "dll", "bat", "cmd", "com", "ps1", "vbs", "js",
    "mjs", "html", "htm", "xhtml", "shtml", "svg", "xml", "swf", "jar", "war", "htaccess",
})  # fmt: skip
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\]")


class InMemoryRequest(flask.Request):
    """A request whose multipart file parts stay in memory, never in a temporary file.

    Werkzeug spools file parts larger than 500 KB to `tempfile.SpooledTemporaryFile` (a file
    on disk). Photos must never touch disk, so every part goes to a BytesIO; the total is
    bounded by `MAX_CONTENT_LENGTH` before any of it is read.
    """

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        """Return an in-memory buffer for one uploaded file part."""
        return BytesIO()


@dataclass(frozen=True, repr=False)
class Upload:
    """A validated upload: its bytes (kept out of repr) and what its header says."""

    data: bytes
    mime: str
    width: int
    height: int

    def __repr__(self) -> str:
        return f"Upload(bytes={len(self.data)}, mime={self.mime}, {self.width}x{self.height})"


def validate_upload(request: flask.Request, settings: Settings) -> Upload:
    """Run every validation step on the request's `image` part; raise the first failure."""
    data, filename = read_image_part(request)
    extension = check_filename(filename)
    mime = check_magic(data, extension)
    width, height = read_dimensions(data, mime, settings)
    return Upload(data=data, mime=mime, width=width, height=height)


def read_image_part(request: flask.Request) -> tuple[bytes, str]:
    """The bytes and client file name of the single `image` file part."""
    try:
        parts = request.files.getlist(FIELD)
    except RequestEntityTooLarge as exc:
        raise PayloadTooLarge() from exc
    except ClientDisconnected as exc:
        if body_deadline_passed(request):
            raise RequestTimeout() from exc
        raise BadRequest("The upload ended before its announced length.") from exc
    if body_deadline_passed(request):
        raise RequestTimeout()
    if not parts:
        raise MissingImage()
    if len(parts) > 1:
        raise BadRequest("Send exactly one file in the field 'image'.")
    part = parts[0]
    if not part.filename:
        raise MissingImage()
    data = part.stream.read()
    if not data:
        raise MissingImage("The file in the field 'image' is empty.")
    return data, part.filename


def body_deadline_passed(request: flask.Request) -> bool:
    """Whether the gateway's read deadline cut this request's body (api.read_deadline)."""
    return DEADLINES.fired(request.environ.get("gunicorn.socket"))


def check_filename(filename: str) -> str:
    """The lower-cased allowed extension of a client file name, or UnsupportedType."""
    if len(filename) > MAX_NAME_LENGTH or _BAD_NAME_CHARS.search(filename):
        raise UnsupportedType()
    stem, dot, extension = filename.lower().rpartition(".")
    if not dot or not stem or extension not in EXTENSION_MIME:
        raise UnsupportedType()
    if any(segment in SCRIPT_EXTENSIONS for segment in stem.split(".")[1:]):
        raise UnsupportedType()
    return extension


def check_magic(data: bytes, extension: str) -> str:
    """libmagic's MIME type of the first bytes; it must be the extension's type."""
    mime = magic.from_buffer(data[:MAGIC_BYTES], mime=True)
    if mime != EXTENSION_MIME[extension]:
        raise TypeMismatch()
    return mime


def read_dimensions(data: bytes, mime: str, settings: Settings) -> tuple[int, int]:
    """Width and height from the image header only, refusing oversized images."""
    with open_untrusted(data, settings.max_pixels) as image:
        width, height, image_format = image.width, image.height, image.format
    if image_format not in MIME_FORMATS[mime]:
        raise TypeMismatch()
    if width < 1 or height < 1:
        raise UndecodableImage()
    if width * height > settings.max_pixels or max(width, height) > settings.max_image_side:
        raise TooManyPixels()
    return width, height
