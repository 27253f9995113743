"""Multipart image uploads on the REST predict routes (an addition to TF Serving's REST API).

``curl -F image=@digit.png localhost:8000/v1/models/mnist:predict`` sends every file part of a
``multipart/form-data`` body to the ``predict_image_bytes`` signature, in order; the answer is
TF Serving's row format, like a JSON request with ``{"b64": ...}`` instances.

Limits (``ray_app.config.Limits``), each checked before the data it guards is held in memory:

- the declared ``Content-Length`` against ``max_request_bytes``, before the body is read; the
  bytes actually received are counted too (chunked bodies declare no length);
- at most ``max_images_per_request`` files, counted while parsing;
- each file at most ``max_image_bytes``, from its spooled size, before it is read into memory.

Breaking one gives RESOURCE_EXHAUSTED (HTTP 429 through ``ray_app.protocol.status``); a malformed body,
a form field that is not a file, or a form without files gives INVALID_ARGUMENT (400).

Parsing uses Starlette's ``MultiPartParser`` (on ``python-multipart``), which spools each file
to a temporary file past 1 MiB instead of keeping the whole body in memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import numpy as np
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ray_app.config import Limits
from ray_app.predictor import InferenceRequest
from ray_app.protocol.names import IMAGE_BYTES_INPUT, IMAGE_BYTES_SIGNATURE
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError
from ray_app.request_body import check_declared_length, limited

MULTIPART_FORM_DATA = "multipart/form-data"
# Starlette raises one exception type for every problem; this prefix marks its file-count limit.
_TOO_MANY_FILES = "Too many files"
_MAX_TEXT_FIELD_BYTES = 64 * 1024  # text fields are refused anyway; this bounds what is buffered


def is_multipart(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` header value names ``multipart/form-data``."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == MULTIPART_FORM_DATA


async def read_images(
    headers: Mapping[str, str], stream: AsyncIterator[bytes], limits: Limits
) -> list[bytes]:
    """The files of a ``multipart/form-data`` body, in order, within ``limits``."""
    check_declared_length(headers, limits.max_request_bytes)
    parser = MultiPartParser(
        Headers(headers=dict(headers)),
        limited(stream, limits.max_request_bytes),
        max_files=limits.max_images_per_request,
        max_fields=limits.max_images_per_request,
        max_part_size=_MAX_TEXT_FIELD_BYTES,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if exc.message.startswith(_TOO_MANY_FILES):
            raise ResourceExhaustedError(
                f"more than {limits.max_images_per_request} files in one request; "
                f"the limit is {limits.max_images_per_request}",
                "max_images_per_request",
            ) from exc
        raise InvalidArgumentError(f"malformed multipart/form-data body: {exc.message}") from exc
    try:
        files: list[UploadFile] = []
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                raise InvalidArgumentError(
                    f"form field {field!r} is not a file; send images as files (curl -F image=@digit.png)"
                )
            files.append(value)
        if not files:
            raise InvalidArgumentError("the form holds no image file (curl -F image=@digit.png)")
        for index, upload in enumerate(files):
            size = upload.size or 0
            if size > limits.max_image_bytes:
                raise ResourceExhaustedError(
                    f"image {index} ({upload.filename!r}) is {size} bytes; the limit is {limits.max_image_bytes}",
                    "max_image_bytes",
                )
        return [await upload.read() for upload in files]
    finally:
        await form.close()


def image_request(
    model_name: str, images: list[bytes], version: int | None, label: str | None
) -> InferenceRequest:
    """A ``predict_image_bytes`` request for encoded images (the predictor resolves version/label)."""
    encoded = np.empty(len(images), dtype=object)
    encoded[:] = images
    return InferenceRequest(
        model_name=model_name,
        inputs={IMAGE_BYTES_INPUT: encoded},
        signature_name=IMAGE_BYTES_SIGNATURE,
        version=version,
        version_label=label,
    )
