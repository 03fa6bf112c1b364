"""The `model` field of a multipart/form-data upload, read as the body streams past.

Built on python-multipart's streaming `MultipartParser`: the body is fed chunk by chunk, file
contents are never held (only the `model` part's value, at most `MAX_MODEL_BYTES`), and the
field is the part whose Content-Disposition `name` parameter is exactly `model` however it is
written (`name=model`, `name="model"`, extra parameters, any header-name case): the value of
another field (`prompt=whisper-1`) is never taken for it. An upload the gateway cannot read
one way only (two `model` fields, a malformed body, a missing or invalid boundary) is refused
with 400 `invalid_request` rather than guessed at, since the upstream might read it otherwise.
"""

from __future__ import annotations

import re

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from gateway.errors import INVALID_REQUEST, GatewayError

MODEL_FIELD = b"model"
MAX_MODEL_BYTES = 256
# RFC 2046 §5.1.1: 1 to 70 of these characters, the last not a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_MAX_HEADER_BYTES = 4096  # one header line of a part
_MAX_HEADERS = 16  # header lines of a part


def _refusal(message: str) -> GatewayError:
    return GatewayError(INVALID_REQUEST, message, param="model")


class MultipartModelParser:
    """Finds the `model` field of a multipart body fed to it in pieces.

    `MultipartModelParser(content_type)` takes the boundary from the request's Content-Type
    (raises `GatewayError` 400 `invalid_request`, `param="model"`, when it has none or an
    invalid one); `feed(chunk)` for each piece of the body as it arrives; `finish()` once the
    body has ended. `model` is the field's value (UTF-8) from the moment its part ends, None
    until then (and at the end, when the body has none). `feed` and `finish` raise the same
    `GatewayError` for a second `model` field, a `model` longer than `MAX_MODEL_BYTES` or not
    UTF-8, and a malformed body (also a body that ends before its closing boundary); once
    raised, every later call raises it again.
    """

    def __init__(self, content_type: str, *, max_model_bytes: int = MAX_MODEL_BYTES) -> None:
        self.model: str | None = None
        self.max_model_bytes = max_model_bytes
        self._error: GatewayError | None = None
        self._ended = False
        # The part being read: its header being read, its Content-Disposition, and (for the
        # model part) its value so far.
        self._field = bytearray()
        self._value = bytearray()
        self._disposition: bytes | None = None
        self._in_model = False
        self._seen_model = False
        self._model_value = bytearray()
        self._parser = MultipartParser(
            _boundary(content_type),
            {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=_MAX_HEADERS,
            max_header_size=_MAX_HEADER_BYTES,
        )

    @property
    def ended(self) -> bool:
        """Whether the closing boundary has been read."""
        return self._ended

    def feed(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._ended or not chunk:
            return  # the epilogue after the closing boundary is ignored, as RFC 2046 says
        try:
            self._parser.write(bytes(chunk))
        except GatewayError as error:
            self._error = error
            raise
        except FormParserError as error:
            self._error = _refusal(f"The multipart body is malformed: {error}")
            raise self._error from None

    def finish(self) -> None:
        """The body has ended: refuses one without its closing boundary."""
        if self._error is not None:
            raise self._error
        if not self._ended:
            self._error = _refusal("The multipart body ends before its closing boundary.")
            raise self._error

    # ------------------------------------------------------------ parser callbacks

    def _part_begin(self) -> None:
        self._disposition = None
        self._in_model = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            if self._disposition is not None:
                raise _refusal("A part of the multipart body has two Content-Disposition headers.")
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        if self._disposition is None:
            return
        _, parameters = parse_options_header(self._disposition)
        if parameters.get(b"name") != MODEL_FIELD:
            return
        if self._seen_model:
            raise _refusal("The multipart body has more than one `model` field.")
        self._seen_model = self._in_model = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_model:
            return
        if len(self._model_value) + end - start > self.max_model_bytes:
            raise _refusal(f"The `model` field is longer than {self.max_model_bytes} bytes.")
        self._model_value += data[start:end]

    def _part_end(self) -> None:
        if not self._in_model:
            return
        self._in_model = False
        value, self._model_value = self._model_value, bytearray()
        try:
            self.model = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _refusal("The `model` field is not UTF-8 text.") from None

    def _end(self) -> None:
        self._ended = True


def _boundary(content_type: str) -> bytes:
    kind, parameters = parse_options_header(content_type)
    if not kind.startswith(b"multipart/"):
        raise _refusal("The body is not multipart: its Content-Type has no multipart type.")
    boundary = parameters.get(b"boundary")
    if not boundary:
        raise _refusal("The multipart Content-Type has no boundary.")
    if not _BOUNDARY.fullmatch(boundary):
        raise _refusal("The multipart Content-Type's boundary is invalid (RFC 2046).")
    return boundary
