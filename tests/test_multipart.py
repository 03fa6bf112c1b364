"""The `model` field of multipart uploads (`gateway.pipeline.multipart.MultipartModelParser`):
found by its Content-Disposition name however the body is split, quoted or ordered, never taken
from another field's value; an upload that could be read two ways is refused. The end-to-end tests
go through the gateway (its handler feeds the parser) with the official SDK or raw bytes."""

from __future__ import annotations

import tracemalloc

import aiohttp
import openai
import pytest

from gateway.errors import GatewayError
from gateway.pipeline.multipart import MAX_MODEL_BYTES, MultipartModelParser
from tests.conftest import PRODUCT_KEY, Fake, GatewayFactory, sha

FORM = "multipart/form-data; boundary=B"
WHISPER_ONLY = f"""
  product:
    models: [whisper-1]
    keys:
      - id: product-web
        sha256: {sha(PRODUCT_KEY)}
"""


def part(disposition: str, value: bytes, *headers: str) -> bytes:
    lines = [f"Content-Disposition: {disposition}", *headers]
    return (
        b"--B\r\n" + "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n" + value + b"\r\n"
    )


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--B--\r\n"


WAV = b'RIFF\x24\x00\x00\x00WAVEfmt name="model"\r\n\r\nwhisper-1\r\n--\r\n'  # looks like a field
SMALL = form(
    part('form-data; name="prompt"', b"whisper-1"),
    part('form-data; name="model"', b"gpt-4o-transcribe"),
    part('form-data; name="file"; filename="a.wav"', WAV, "Content-Type: audio/wav"),
)


def parsed(body: bytes, *pieces_at: int, content_type: str = FORM) -> MultipartModelParser:
    parser = MultipartModelParser(content_type)
    cuts = [0, *pieces_at, len(body)]
    for start, end in zip(cuts, cuts[1:], strict=False):
        parser.feed(body[start:end])
    parser.finish()
    return parser


def refusal(body: bytes, content_type: str = FORM) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        parsed(body, content_type=content_type)
    return caught.value


# ---------------------------------------------------------------- splits


def test_every_split_point_of_a_small_body_gives_the_same_model():
    models = {parsed(SMALL, cut).model for cut in range(len(SMALL) + 1)}
    assert models == {"gpt-4o-transcribe"}


def test_every_pair_of_split_points_gives_the_same_model():
    body = form(part("form-data; name=model", b"whisper-1"))
    models = {
        parsed(body, first, second).model
        for first in range(len(body) + 1)
        for second in range(first, len(body) + 1)
    }
    assert models == {"whisper-1"}


def test_a_body_fed_byte_by_byte_gives_its_model():
    parser = MultipartModelParser(FORM)
    for byte in SMALL:
        parser.feed(bytes([byte]))
    parser.finish()
    assert parser.model == "gpt-4o-transcribe"


def test_the_model_is_known_as_soon_as_its_part_ends_and_not_before():
    parser = MultipartModelParser(FORM)
    model_end = SMALL.index(b"gpt-4o-transcribe") + len(b"gpt-4o-transcribe")
    parser.feed(SMALL[:model_end])
    assert parser.model is None
    parser.feed(SMALL[model_end : SMALL.index(b"--B", model_end) + len(b"--B\r\n")])
    assert parser.model == "gpt-4o-transcribe"
    assert not parser.ended


# ---------------------------------------------------------------- which field


def test_the_model_after_the_file_part_is_found():
    body = form(
        part('form-data; name="file"; filename="a.wav"', WAV * 100, "Content-Type: audio/wav"),
        part('form-data; name="model"', b"gpt-4o-transcribe"),
    )
    assert parsed(body, 7, 300).model == "gpt-4o-transcribe"


@pytest.mark.parametrize(
    "disposition",
    [
        "form-data; name=model",
        'form-data; name="model"',
        'form-data; name="model"; x=y',
        'form-data; x="a;b"; name=model',
        'form-data;name="model"',
        'form-data ; NAME = "model"',
        'FORM-DATA; name="model"',
    ],
)
def test_the_model_field_is_found_whatever_its_quoting_or_parameters(disposition: str):
    body = form(part(disposition, b"whisper-1"), part('form-data; name="prompt"', b"x"))
    assert parsed(body).model == "whisper-1"


@pytest.mark.parametrize(
    "header", ["content-disposition", "CONTENT-DISPOSITION", "Content-disposition"]
)
def test_the_content_disposition_header_is_matched_in_any_case(header: str):
    body = b'--B\r\n%s: form-data; name="model"\r\n\r\nwhisper-1\r\n--B--\r\n' % header.encode()
    assert parsed(body).model == "whisper-1"


def test_another_fields_value_is_never_taken_for_the_model():
    # curl -F model=gpt-4o-transcribe -F prompt=whisper-1 (the old regex read whisper-1)
    curl = form(
        part('form-data; name="model"', b"gpt-4o-transcribe"),
        part('form-data; name="prompt"', b"whisper-1"),
    )
    assert parsed(curl).model == "gpt-4o-transcribe"
    body = form(
        part("form-data; name=model", b"gpt-4o-transcribe"),
        part("form-data; name=prompt", b"whisper-1"),
    )
    assert parsed(body).model == "gpt-4o-transcribe"
    prompt_first = form(
        part('form-data; name="prompt"', b'name="model"\r\n\r\nwhisper-1'),
        part("form-data; name=model", b"gpt-4o-transcribe"),
    )
    assert parsed(prompt_first).model == "gpt-4o-transcribe"


@pytest.mark.parametrize(
    "disposition",
    ['form-data; name="models"', 'form-data; name="xmodel"', 'form-data; filename="model"'],
)
def test_a_field_named_otherwise_is_not_the_model(disposition: str):
    assert parsed(form(part(disposition, b"whisper-1"))).model is None


def test_a_body_without_a_model_field_has_none():
    assert parsed(form(part('form-data; name="file"; filename="a"', WAV))).model is None


def test_an_empty_model_field_is_an_empty_string():
    assert parsed(form(part('form-data; name="model"', b""))).model == ""


def test_the_epilogue_after_the_closing_boundary_is_ignored():
    body = SMALL + b"\r\n--B\r\nContent-Disposition: form-data; name=model\r\n\r\nx\r\n--B--\r\n"
    assert parsed(body).model == "gpt-4o-transcribe"


# ---------------------------------------------------------------- refusals


def test_a_second_model_field_is_refused():
    body = form(
        part('form-data; name="model"', b"whisper-1"), part("form-data; name=model", b"gpt-4o")
    )
    error = refusal(body)
    assert (error.kind.status, error.kind.code, error.param) == (400, "invalid_request", "model")
    assert error.message == "The multipart body has more than one `model` field."


def test_a_second_model_field_is_refused_however_the_body_is_split():
    body = form(
        part('form-data; name="model"', b"whisper-1"), part("form-data; name=model", b"gpt-4o")
    )
    for cut in range(len(body) + 1):
        with pytest.raises(GatewayError):
            parsed(body, cut)


def test_two_content_dispositions_in_one_part_are_refused():
    body = form(
        part('form-data; name="prompt"', b"x", 'Content-Disposition: form-data; name="model"')
    )
    assert refusal(body).message == (
        "A part of the multipart body has two Content-Disposition headers."
    )


def test_a_model_longer_than_the_bound_is_refused():
    assert parsed(form(part("form-data; name=model", b"m" * MAX_MODEL_BYTES))).model == "m" * 256
    error = refusal(form(part("form-data; name=model", b"m" * (MAX_MODEL_BYTES + 1))))
    assert (error.kind.code, error.param) == ("invalid_request", "model")
    assert error.message == "The `model` field is longer than 256 bytes."


def test_a_model_that_is_not_utf8_is_refused():
    assert refusal(form(part("form-data; name=model", b"caf\xe9"))).message == (
        "The `model` field is not UTF-8 text."
    )


@pytest.mark.parametrize(
    "body",
    [
        b"--X\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper-1\r\n--X--\r\n",
        b'--B\r\nContent Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--B--\r\n',
        b'--B\r\nContent-Disposition: form-data; name="model"\rX\r\n\r\nwhisper-1\r\n--B--\r\n',
        b"--B\r\n" + b"X-A: 1\r\n" * 17 + b"\r\nwhisper-1\r\n--B--\r\n",
        b"--B\r\nX-A: " + b"a" * 5000 + b"\r\n\r\nwhisper-1\r\n--B--\r\n",
    ],
    ids=["wrong-boundary", "space-in-header-name", "bare-cr", "17-headers", "5kB-header"],
)
def test_a_malformed_body_is_refused(body: bytes):
    error = refusal(body)
    assert (error.kind.status, error.kind.code, error.param) == (400, "invalid_request", "model")
    assert error.message.startswith("The multipart body is malformed: ")


@pytest.mark.parametrize("cut", [0, 10, len(SMALL) - 8, len(SMALL) - 3])
def test_a_body_that_ends_before_its_closing_boundary_is_refused(cut: int):
    error = refusal(SMALL[:cut])
    assert error.message == "The multipart body ends before its closing boundary."


def test_once_refused_every_later_call_is_refused_again():
    parser = MultipartModelParser(FORM)
    with pytest.raises(GatewayError) as first:
        parser.feed(b"--X\r\n")
    with pytest.raises(GatewayError) as again:
        parser.feed(SMALL)
    with pytest.raises(GatewayError) as at_the_end:
        parser.finish()
    assert first.value is again.value is at_the_end.value


@pytest.mark.parametrize(
    ("content_type", "message"),
    [
        ("multipart/form-data", "The multipart Content-Type has no boundary."),
        ("multipart/form-data; boundary=", "The multipart Content-Type has no boundary."),
        ('multipart/form-data; boundary=""', "The multipart Content-Type has no boundary."),
        ("multipart/form-data; boundary=" + "a" * 71,
         "The multipart Content-Type's boundary is invalid (RFC 2046)."),
        ('multipart/form-data; boundary="a b "',
         "The multipart Content-Type's boundary is invalid (RFC 2046)."),
        ("multipart/form-data; boundary=a\x00b",
         "The multipart Content-Type's boundary is invalid (RFC 2046)."),
        ("application/json; boundary=B",
         "The body is not multipart: its Content-Type has no multipart type."),
        ("", "The body is not multipart: its Content-Type has no multipart type."),
    ],
)  # fmt: skip
def test_a_missing_or_invalid_boundary_is_refused(content_type: str, message: str):
    with pytest.raises(GatewayError) as caught:
        MultipartModelParser(content_type)
    assert (caught.value.kind.code, caught.value.param) == ("invalid_request", "model")
    assert caught.value.message == message


@pytest.mark.parametrize(
    "content_type",
    ['multipart/form-data; boundary="B"', "Multipart/Form-Data; charset=utf-8; boundary=B"],
)
def test_the_boundary_is_read_quoted_or_not_among_other_parameters(content_type: str):
    assert parsed(SMALL, content_type=content_type).model == "gpt-4o-transcribe"


# ---------------------------------------------------------------- memory


def test_a_10_mb_file_part_fed_in_64_kb_chunks_keeps_memory_bounded():
    block = bytes(range(256)) * 256  # 64 KiB without a CR LF -- sequence
    head = part('form-data; name="file"; filename="big.wav"', b"").removesuffix(b"\r\n")
    tail = b"\r\n" + part("form-data; name=model", b"whisper-1") + b"--B--\r\n"
    chunks = [head] + [block] * 160 + [tail]  # 10 MiB of file, built before measuring
    assert sum(map(len, chunks)) > 10 * 2**20
    parser = MultipartModelParser(FORM)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for chunk in chunks:
            parser.feed(chunk)
        parser.finish()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert parser.model == "whisper-1"
    assert after - before < 4096  # what the parser holds once done
    assert peak - before < 16384  # never a chunk's copy, let alone the file


# ---------------------------------------------------------------- through the gateway


async def test_the_sdks_transcription_with_an_allow_listed_model_passes_and_is_metered(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(teams=WHISPER_ONLY)
    client = gateway.client(PRODUCT_KEY)
    answer = await client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", WAV * 50), language="en"
    )
    assert answer.http_response.status_code == 200
    row = await gateway.row(answer.headers["x-gateway-request-id"])
    assert (row["team"], row["model"], row["status"], row["outcome"]) == (
        "product", "whisper-1", 200, "ok",
    )  # fmt: skip
    uploads = [r for r in fake.state.received if r.path == "/v1/audio/transcriptions"]
    assert [upload.body_size for upload in uploads] == [row["request_bytes"]]


async def post_form(gateway_url: str, body: bytes) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            gateway_url + "/audio/transcriptions",
            data=body,
            headers={"Authorization": f"Bearer {PRODUCT_KEY}", "Content-Type": FORM},
        ) as response,
    ):
        return response.status, await response.json()


@pytest.mark.parametrize("name", ['"model"', "model"], ids=["curl-quoted", "unquoted"])
async def test_a_prompt_naming_an_allowed_model_does_not_let_another_model_through(
    make_gateway: GatewayFactory, fake: Fake, name: str
):
    gateway = await make_gateway(teams=WHISPER_ONLY)
    # curl -F model=gpt-4o-transcribe -F prompt=whisper-1 -F file=@a.wav
    body = form(
        part(f"form-data; name={name}", b"gpt-4o-transcribe"),
        part('form-data; name="prompt"', b"whisper-1"),
        part('form-data; name="file"; filename="a.wav"', WAV),
    )
    status, answer = await post_form(gateway.base_url, body)
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (
        403, "model_not_allowed", "model",
    )  # fmt: skip
    rows = await gateway.rows()
    assert [(r["model"], r["status"], r["outcome"]) for r in rows] == [
        ("gpt-4o-transcribe", 403, "rejected")
    ]
    uploads = [r for r in fake.state.received if r.path == "/v1/audio/transcriptions"]
    assert all(upload.body_size < len(body) for upload in uploads)


async def test_two_model_fields_are_400_and_never_forwarded_whole(
    make_gateway: GatewayFactory, fake: Fake
):
    gateway = await make_gateway(teams=WHISPER_ONLY)
    body = form(
        part('form-data; name="model"', b"whisper-1"),
        part("form-data; name=model", b"gpt-4o-transcribe"),
        part('form-data; name="file"; filename="a.wav"', WAV),
    )
    status, answer = await post_form(gateway.base_url, body)
    assert (status, answer["error"]["code"], answer["error"]["param"]) == (
        400, "invalid_request", "model",
    )  # fmt: skip
    uploads = [r for r in fake.state.received if r.path == "/v1/audio/transcriptions"]
    assert all(upload.body_size < len(body) for upload in uploads)


async def test_the_sdks_transcription_with_a_model_outside_the_list_is_403(
    make_gateway: GatewayFactory,
):
    gateway = await make_gateway(teams=WHISPER_ONLY)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gateway.client(PRODUCT_KEY).audio.transcriptions.create(
            model="gpt-4o-transcribe", file=("a.wav", WAV), language="en", prompt="whisper-1"
        )
    assert caught.value.code == "model_not_allowed"
