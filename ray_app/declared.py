"""TF Serving's checks on what a request *declares* (input names, dtypes, shapes, output filter)
and the app's size limits on it, before anything is decoded.

Pure functions of a signature and the limits, so that they run wherever the request's content
is decoded: on the replica, or in its decoding process (``ray_app.offload``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ray_app.config import Limits
from ray_app.protocol.status import ResourceExhaustedError
from ray_app.protocol.tensors import STRING, element_count
from ray_app.signatures import SignatureSpec


def check_declared(
    spec: SignatureSpec,
    signature: str,
    declared: Mapping[str, tuple[int, tuple[int, ...]]],
    output_filter: Sequence[str],
    limits: Limits,
) -> None:
    """``declared`` maps each input alias to its ``(DataType, shape)``. Besides the signature
    (names, dtypes, shapes, output filter) it enforces at most ``max_images_per_request``
    examples, and that no input decodes to more than ``max_request_bytes`` (a one-value fill or
    a huge declared shape): RESOURCE_EXHAUSTED."""
    spec.check_input_names(list(declared))
    for alias in sorted(declared):
        tf_dtype, shape = declared[alias]
        spec.check_input(signature, alias, tf_dtype, shape)
        check_size(alias, spec.inputs[alias].dtype, shape, limits)
    spec.batch_size(signature, {alias: shape for alias, (_, shape) in declared.items()})
    spec.check_output_filter(output_filter)


def check_size(alias: str, dtype: np.dtype | None, shape: Sequence[int], limits: Limits) -> None:
    if shape and shape[0] > limits.max_images_per_request:
        raise ResourceExhaustedError(
            f"{shape[0]} images in one request; the limit is {limits.max_images_per_request}",
            "max_images_per_request",
        )
    if dtype is not None and dtype != STRING:
        need = element_count(shape) * dtype.itemsize
        if need > limits.max_request_bytes:
            raise ResourceExhaustedError(
                f"input {alias!r} of shape {list(shape)} would take {need} bytes to decode; "
                f"the limit is max_request_bytes ({limits.max_request_bytes})",
                "max_request_bytes",
            )


def max_elements(dtype: np.dtype, limits: Limits) -> int:
    """The most elements one decoded input of ``dtype`` may have (see :func:`check_declared`)."""
    if dtype == STRING:
        return limits.max_images_per_request
    return limits.max_request_bytes // np.dtype(dtype).itemsize
