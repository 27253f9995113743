"""Multipart image uploads (``ray_app.uploads``): parsing and every limit, without Ray or sockets.

Bodies are built by urllib3's encoder, an independent implementation of multipart/form-data.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from urllib3.filepost import encode_multipart_formdata

from ray_app import uploads
from ray_app.config import Limits
from ray_app.protocol.names import IMAGE_BYTES_SIGNATURE
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError, ServingError
from ray_app.signatures import IMAGE_BYTES_SPEC

LIMITS = Limits(max_request_bytes=4096, max_images_per_request=3, max_image_bytes=1000)


class Body:
    """A request body as an ASGI app sees it: chunks, and whether anyone read them."""

    def __init__(self, data: bytes, chunk_bytes: int = 64) -> None:
        self.chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
        self.chunks_read = 0

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.chunks_read += 1
            yield chunk


def _form(*fields: tuple[str, object]) -> tuple[dict[str, str], bytes]:
    data, content_type = encode_multipart_formdata(list(fields))
    return {"content-type": content_type, "content-length": str(len(data))}, data


def _read(headers: dict[str, str], body: Body | bytes, limits: Limits = LIMITS) -> list[bytes]:
    body = body if isinstance(body, Body) else Body(body)
    return asyncio.run(uploads.read_images(headers, body.stream(), limits))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("multipart/form-data; boundary=abc", True),
        ("Multipart/Form-Data ;boundary=abc", True),
        ("multipart/form-data", True),
        ("application/json", False),
        ("multipart/mixed; boundary=abc", False),
        ("", False),
        (None, False),
    ],
)
def test_is_multipart(value, expected) -> None:
    assert uploads.is_multipart(value) is expected


def test_files_come_back_in_order_whatever_their_field_names() -> None:
    headers, data = _form(
        ("image", ("a.png", b"first", "image/png")),
        ("image", ("b.png", b"second" * 50, "image/png")),
        ("other", ("c.jpg", b"third", "image/jpeg")),
    )
    assert _read(headers, data) == [b"first", b"second" * 50, b"third"]


def test_a_chunked_body_without_content_length_is_parsed() -> None:
    headers, data = _form(("image", ("a.png", b"x" * 900, "image/png")))
    del headers["content-length"]
    assert _read(headers, Body(data, chunk_bytes=7)) == [b"x" * 900]


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    headers, data = _form(("image", ("a.png", b"x", "image/png")))
    headers["content-length"] = str(LIMITS.max_request_bytes + 1)
    body = Body(data)
    with pytest.raises(ResourceExhaustedError, match="4097 bytes; the limit is 4096"):
        _read(headers, body)
    assert body.chunks_read == 0


def test_a_body_exactly_at_the_limit_is_accepted() -> None:
    limits = Limits(max_request_bytes=4096, max_image_bytes=4096)
    overhead = len(_form(("image", ("a.png", b"", "image/png")))[1])
    payload = b"x" * (limits.max_request_bytes - overhead)
    headers, data = _form(("image", ("a.png", payload, "image/png")))
    assert len(data) == limits.max_request_bytes
    assert _read(headers, data, limits) == [payload]
    del headers["content-length"]  # the counted bytes, too
    assert _read(headers, data, limits) == [payload]


@pytest.mark.parametrize(
    "declared", ["abc", "-1", "1e3", "", "\u00b2", "\u0663"]
)  # "²", Arabic-Indic 3: isdigit, not int()
def test_declared_length_must_be_a_number(declared) -> None:
    headers, data = _form(("image", ("a.png", b"x", "image/png")))
    headers["content-length"] = declared
    with pytest.raises(InvalidArgumentError, match="Content-Length must be a number"):
        _read(headers, data)


def test_a_body_longer_than_declared_or_undeclared_stops_at_the_limit() -> None:
    headers, data = _form(("image", ("a.png", b"x" * 10_000, "image/png")))
    del headers["content-length"]
    body = Body(data, chunk_bytes=512)
    with pytest.raises(ResourceExhaustedError, match="over the limit of 4096 bytes"):
        _read(headers, body, Limits(max_request_bytes=4096, max_image_bytes=100_000))
    assert body.chunks_read == 4096 // 512 + 1  # not one chunk more than needed to know


def test_more_files_than_the_limit_is_resource_exhausted() -> None:
    four = [("image", (f"{i}.png", b"x", "image/png")) for i in range(4)]
    with pytest.raises(ResourceExhaustedError, match="the limit is 3"):
        _read(*_form(*four))
    assert len(_read(*_form(*four[:3]))) == 3


def test_a_file_over_the_image_limit_is_named() -> None:
    ok, big = (
        ("image", ("ok.png", b"x" * 1000, "image/png")),
        ("image", ("big.png", b"x" * 1001, "image/png")),
    )
    assert _read(*_form(ok)) == [b"x" * 1000]
    with pytest.raises(
        ResourceExhaustedError, match=r"image 1 \('big.png'\) is 1001 bytes; the limit is 1000"
    ):
        _read(*_form(ok, big))


def test_text_fields_are_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="form field 'image' is not a file"):
        _read(*_form(("image", "iVBORw0KGgo=")))


def test_a_form_without_files_is_refused() -> None:
    data = b"--b--\r\n"
    headers = {"content-type": "multipart/form-data; boundary=b", "content-length": str(len(data))}
    with pytest.raises(InvalidArgumentError, match="no image file"):
        _read(headers, data)


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        ("multipart/form-data", b"--b\r\n"),  # no boundary parameter
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n"),
        ("multipart/form-data; boundary=b", b"not multipart at all"),
    ],
)
def test_malformed_bodies_are_invalid_argument(content_type, data) -> None:
    headers = {"content-type": content_type, "content-length": str(len(data))}
    with pytest.raises(InvalidArgumentError, match="malformed multipart/form-data body"):
        _read(headers, data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from(["b", "xyz", "----WebKitFormBoundary7MA4YWxkTrZu0gW"]))
def test_any_body_gives_images_or_a_serving_error(data, boundary) -> None:
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    try:
        images = _read(headers, Body(b"--" + boundary.encode() + b"\r\n" + data, chunk_bytes=37))
    except ServingError:
        return
    assert images and all(isinstance(image, bytes) for image in images)


def test_image_request_is_a_valid_predict_image_bytes_request() -> None:
    request = uploads.image_request("mnist", [b"\x89PNG a", b"\x89PNG b"], 2, None)
    assert request.signature_name == IMAGE_BYTES_SIGNATURE
    assert (request.model_name, request.version, request.version_label) == ("mnist", 2, None)
    (encoded,) = request.inputs.values()
    assert encoded.dtype == np.dtype(object) and list(encoded) == [b"\x89PNG a", b"\x89PNG b"]
    assert IMAGE_BYTES_SPEC.check_inputs(IMAGE_BYTES_SIGNATURE, request.inputs) == 2
    labelled = uploads.image_request("mnist", [b"x"], None, "stable")
    assert (labelled.version, labelled.version_label) == (None, "stable")
