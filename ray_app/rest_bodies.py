"""TF Serving's REST bodies: the request document in, the answer out, errors.

Follows ``http_rest_api_util.cc`` and ``util/json_tensor.cc``: row (``instances`` ->
``predictions``) and columnar (``inputs`` -> ``outputs``) formats, ``{"b64": ...}`` for binary
values, numbers rendered as TF Serving renders them, errors as ``{"error": "..."}``. The bounded
parsing and the JSON -> tensor conversion live in ``ray_app.json_tensor``; this module knows the
documents' shapes and TF Serving's texts about them.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ray_app import json_tensor
from ray_app.config import Limits
from ray_app.json_tensor import MAX_ECHOED_CHARS
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError
from ray_app.protocol.tensors import STRING
from ray_app.signatures import SignatureSpec


# -- JSON in -----------------------------------------------------------------------------------------
def parse_json(body: bytes, max_composites: int | None = None) -> Any:
    """The request document (``json_tensor.parse``), its lists, objects and strings counted first."""
    if max_composites is not None:
        json_tensor.check_composites(body, max_composites)
    return json_tensor.parse(body)


def format_error(body: bytes, *parts: str) -> InvalidArgumentError:
    """``FormatError``: the request document (its raw text, cut: cheap whatever its size), then the problem."""
    text = body[: MAX_ECHOED_CHARS + 1].decode("utf-8", "replace")
    if len(text) > MAX_ECHOED_CHARS:
        text = text[:MAX_ECHOED_CHARS] + "...(cut)"
    return InvalidArgumentError(f"JSON Value: {text} {''.join(parts)}")


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _check_rows(count: int, limits: Limits) -> None:
    """The leading dimension before any walk over the rows."""
    if count > limits.max_images_per_request:
        raise ResourceExhaustedError(
            f"{count} images in one request; the limit is {limits.max_images_per_request}",
            "max_images_per_request",
        )


def instances(body: bytes, payload: Any, spec: SignatureSpec, limits: Limits) -> dict[str, Any]:
    """The JSON value of each input in a row-format body (not converted yet)."""
    if not isinstance(payload, list):
        raise format_error(body, "Excepting 'instances' to be an list/array")
    if not payload:
        raise format_error(body, "No values in 'instances' array")
    _check_rows(len(payload), limits)
    names = sorted(spec.inputs)
    if _is_object(payload[0]):
        for index, element in enumerate(payload):
            if not _is_object(element):
                raise InvalidArgumentError(f"Expecting object but got list at item {index} of input list")
            if len(element) != len(names) or set(element) != set(names):
                raise InvalidArgumentError(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {json_tensor.echo(element)} "
                    f"keys must be equal to: {','.join(names)}"
                )
        return {name: [element[name] for element in payload] for name in names}
    if len(names) != 1:
        raise InvalidArgumentError(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    for index, element in enumerate(payload):
        if _is_object(element):
            raise InvalidArgumentError(f"Expecting value/list but got object at item {index} of input list")
    return {names[0]: payload}


def columns(payload: Any, spec: SignatureSpec) -> dict[str, Any]:
    """The JSON value of each input in a columnar body (not converted yet; extra keys ignored)."""
    names = sorted(spec.inputs)
    if not _is_object(payload):
        if len(names) != 1:
            raise InvalidArgumentError(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        return {names[0]: payload}
    for name in names:
        if name not in payload:
            raise InvalidArgumentError(f"Missing named input: {name} in 'inputs' object.")
    return {name: payload[name] for name in names}


def convert(
    spec: SignatureSpec, values: dict[str, Any], max_elements: Callable[[np.dtype], int]
) -> dict[str, np.ndarray]:
    """Each input's JSON value as the signature's dtype, at most ``max_elements(dtype)`` values
    (CPU work: may run off the event loop)."""
    return {
        alias: json_tensor.to_tensor(alias, value, spec.inputs[alias], max_elements(spec.inputs[alias].dtype))
        for alias, value in values.items()
    }


def object_and_signature(body: bytes, max_composites: int | None = None) -> tuple[dict[str, Any], str]:
    """The request's JSON object and its ``signature_name`` ("" when absent), TF Serving's checks."""
    document = parse_json(body, max_composites)
    if not isinstance(document, dict):
        raise format_error(body, "Is not object")
    signature = document.get("signature_name", "")
    if not isinstance(signature, str):
        raise format_error(body, "not formatted correctly. 'signature_name' key must be a string value.")
    return document, signature


# -- tensors -> JSON ---------------------------------------------------------------------------------
def format_float(value: float, double: bool = False) -> str:
    """TF Serving's ``WriteDecimal``: 6 significant digits if they round-trip, else 9 (17 for double)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    text = f"{value:.6g}"
    back = float(text) if double else float(np.float32(text))
    if back != value:
        text = f"{value:.17g}" if double else f"{value:.9g}"
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def _json_array(array: np.ndarray, as_b64: bool) -> str:
    """One tensor (or one batch item of it) as JSON text, values rendered as TF Serving does."""
    kind = array.dtype.kind
    if kind == "f":
        double = array.dtype == np.float64
        render = lambda v: format_float(float(v), double)  # noqa: E731
    elif kind == "b":
        render = lambda v: "true" if v else "false"  # noqa: E731
    elif kind in "iu":
        render = str
    elif as_b64:
        render = lambda v: json.dumps({"b64": base64.b64encode(bytes(v)).decode("ascii")})  # noqa: E731
    else:
        render = lambda v: json.dumps(bytes(v).decode("utf-8", "replace"), ensure_ascii=False)  # noqa: E731

    def nested(a: np.ndarray) -> str:
        if a.ndim == 0:
            return render(a.item() if kind != "O" else a[()])
        return "[" + ", ".join(nested(sub) for sub in a) + "]"

    return nested(array)


def to_json(outputs: Mapping[str, np.ndarray], rows: bool) -> str:
    """``MakeJsonFromTensors``: ``predictions`` (row) or ``outputs`` (columnar)."""
    if not outputs:
        raise InvalidArgumentError("Cannot convert empty tensor map to JSON")
    b64 = {name: value.dtype == STRING and name.endswith("_bytes") for name, value in outputs.items()}
    if not rows:
        if len(outputs) == 1:
            ((name, value),) = outputs.items()
            return '{"outputs": ' + _json_array(value, b64[name]) + "}"
        body = ", ".join(f"{json.dumps(n)}: {_json_array(v, b64[n])}" for n, v in outputs.items())
        return '{"outputs": {' + body + "}}"
    batch = None
    for name, value in outputs.items():
        if value.ndim == 0:
            raise InvalidArgumentError(f"Tensor name: {name} has no shape information ")
        if value.shape[0] == 0:
            raise InvalidArgumentError(f"Tensor name: {name} has invalid batch size: 0")
        if batch is not None and value.shape[0] != batch:
            raise InvalidArgumentError(
                f"Tensor name: {name} has inconsistent batch size: {value.shape[0]} expecting: {batch}"
            )
        batch = value.shape[0]
    if len(outputs) == 1:
        ((name, value),) = outputs.items()
        items = [_json_array(value[i, ...], b64[name]) for i in range(batch)]
    else:
        items = [
            "{"
            + ", ".join(f"{json.dumps(n)}: {_json_array(v[i, ...], b64[n])}" for n, v in outputs.items())
            + "}"
            for i in range(batch)
        ]
    return '{"predictions": [' + ", ".join(items) + "]}"


def error_json(message: str) -> str:
    """TF Serving's error body (``MakeJsonFromStatus``)."""
    return json.dumps({"error": message}, indent=4, ensure_ascii=False)
