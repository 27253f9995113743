"""Encoded images (the ``predict_image_bytes`` signature) decoded on the replica's own threads.

Within the limits: every image's header is read first (its declared pixels, nothing decompressed),
the request's total checked against ``max_request_pixels``, and at most ``max_pending_decodes``
requests decode or wait at once; past that a request is refused (RESOURCE_EXHAUSTED) instead of
queueing. Decoding never runs on the threads inference uses: a few requests of huge blank PNGs can
delay other image-bytes requests, not every request.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ray_app import image_decoding, preprocessing
from ray_app.config import Limits
from ray_app.preprocessing import MNIST_SIZE_PX
from ray_app.protocol.status import ResourceExhaustedError, ServingError


def _for_image(exc: ServingError, index: int) -> ServingError:
    """The same error, naming the image it is about (the client maps the index back to a file)."""
    named = type(exc)(f"image {index}: {exc.message}")
    named.__dict__.update({k: v for k, v in exc.__dict__.items() if k != "message"})
    return named


class DecodePool:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._threads = ThreadPoolExecutor(limits.decode_threads, thread_name_prefix="decode")
        self._pending = 0  # requests decoding or waiting for a decoder thread

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def decode(self, encoded: np.ndarray) -> np.ndarray:
        """``encoded`` (any shape of encoded images) as a ``[n, 28, 28]`` uint8 batch."""
        limits = self._limits
        items = [bytes(data) for data in encoded.reshape(-1)]
        if not items:
            return np.zeros((0, MNIST_SIZE_PX, MNIST_SIZE_PX), dtype=np.uint8)
        pixels = 0
        for index, data in enumerate(items):  # headers only: nothing is decompressed yet
            try:
                pixels += image_decoding.declared_pixels(data, max_bytes=limits.max_image_bytes)
            except ServingError as exc:
                raise _for_image(exc, index) from exc
        if pixels > limits.max_request_pixels:
            raise ResourceExhaustedError(
                f"the images hold {pixels} pixels in all; the limit per request is {limits.max_request_pixels}",
                "max_request_pixels",
            )
        if self._pending >= limits.max_pending_decodes:
            raise ResourceExhaustedError(
                f"{self._pending} image-bytes requests are already being decoded; retry later",
                "max_pending_decodes",
            )

        def decode_all() -> np.ndarray:
            images = []
            for index, data in enumerate(items):
                try:
                    images.append(
                        preprocessing.preprocess_bytes(
                            data, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes
                        )
                    )
                except ServingError as exc:
                    raise _for_image(exc, index) from exc
            return np.stack(images)

        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._threads, decode_all)
        finally:
            self._pending -= 1
