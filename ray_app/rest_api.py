"""TF Serving's REST API <-> the predictor (the HTTP front door's model-facing half).

Request bodies follow TF Serving: row format ``{"instances": [...]}`` or columnar
``{"inputs": ...}``, optional ``"signature_name"``; binary values as ``{"b64": "..."}``.
Responses: ``{"predictions": ...}`` (row) or ``{"outputs": ...}`` (columnar); errors
``{"error": "..."}`` with the status from ``ray_app.errors``.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np

from ray_app.errors import InvalidArgumentError, ResourceExhaustedError
from ray_app.predictor import InferenceRequest, InferenceResult, Predictor
from ray_app.signatures import SERVING_DEFAULT, SignatureSpec, TensorSpec, lookup
from ray_app.tensors import dtype_name, dtype_of_numpy


def parse_body(body: bytes, max_bytes: int) -> dict[str, Any]:
    if len(body) > max_bytes:
        raise ResourceExhaustedError(f"request body is {len(body)} bytes; the limit is {max_bytes}")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise InvalidArgumentError("request body must be a JSON object")
    return parsed


def _decode_b64(value: Any) -> Any:
    """Replace ``{"b64": ...}`` objects by bytes, recursively."""
    if isinstance(value, dict) and set(value) == {"b64"}:
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"invalid base64 value: {exc}") from exc
    if isinstance(value, list):
        return [_decode_b64(v) for v in value]
    return value


def _to_array(name: str, value: Any, spec: TensorSpec | None) -> np.ndarray:
    """JSON values -> numpy, cast to the signature's dtype only when no value changes."""
    value = _decode_b64(value)
    try:
        if spec is not None and spec.dtype == np.dtype(object):
            array = np.array(value, dtype=object)
            flat = array.reshape(-1)
            for i, item in enumerate(flat):
                if isinstance(item, str):
                    flat[i] = item.encode()
                elif not isinstance(item, bytes):
                    raise InvalidArgumentError(f"input {name!r}: expected strings or b64 values")
            return array
        array = np.array(value)
    except ValueError as exc:  # ragged nesting
        raise InvalidArgumentError(f"input {name!r}: not a rectangular array ({exc})") from exc
    if array.dtype.kind not in "biuf":
        raise InvalidArgumentError(f"input {name!r}: expected numbers, got {array.dtype.kind!r} values")
    if spec is None or array.dtype == spec.dtype or array.size == 0:
        return array.astype(spec.dtype) if spec is not None else array
    target = spec.dtype
    if target.kind in "iu":
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise InvalidArgumentError(f"input {name!r} contains NaN or infinity")
        if array.dtype.kind == "f" and not np.all(np.equal(np.mod(array, 1), 0)):
            raise InvalidArgumentError(f"input {name!r}: expected integers ({target.name}), got fractions")
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgumentError(
                f"input {name!r}: values outside the {target.name} range [{info.min}, {info.max}]"
            )
    return array.astype(target)


def to_inference_request(
    predictor: Predictor, model_name: str, version: int | None, label: str | None, body: dict[str, Any]
) -> tuple[InferenceRequest, bool]:
    """The request, and whether it used the row (``instances``) format."""
    signature = body.get("signature_name") or ""
    if not isinstance(signature, str):
        raise InvalidArgumentError("signature_name must be a string")
    has_rows, has_columns = "instances" in body, "inputs" in body
    if has_rows == has_columns:
        raise InvalidArgumentError('the body needs exactly one of "instances" (row) or "inputs" (columnar)')
    predictor.check_model(model_name)
    resolved, _ = predictor.resolve_version(version, label)
    specs = predictor.signatures(resolved)
    input_specs = lookup(specs, signature or SERVING_DEFAULT, model_name, resolved).inputs
    payload = body["instances"] if has_rows else body["inputs"]
    named = _named_inputs(payload, has_rows, list(input_specs))
    inputs = {k: _to_array(k, v, input_specs.get(k)) for k, v in named.items()}
    request = InferenceRequest(
        model_name=model_name,
        inputs=inputs,
        signature_name=signature,
        version=resolved,
        version_label=None,
    )
    return request, has_rows


def _named_inputs(payload: Any, rows: bool, names: list[str]) -> dict[str, Any]:
    if rows:
        if not isinstance(payload, list):
            raise InvalidArgumentError('"instances" must be a list')
        if payload and all(isinstance(r, dict) and "b64" not in r for r in payload):
            keys = set(payload[0])
            if any(set(r) != keys for r in payload):
                raise InvalidArgumentError("every instance must name the same inputs")
            return {k: [r[k] for r in payload] for k in keys}
        if len(names) != 1:
            raise InvalidArgumentError(f"the signature takes {names}: give instances as objects by name")
        return {names[0]: payload}
    if isinstance(payload, dict):
        return payload
    if len(names) != 1:
        raise InvalidArgumentError(f'the signature takes {names}: give "inputs" as an object by name')
    return {names[0]: payload}


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == np.dtype(object):
        return [{"b64": base64.b64encode(v).decode()} for v in array.reshape(-1)]
    return array.tolist()


def to_response(result: InferenceResult, rows: bool) -> dict[str, Any]:
    outputs = result.outputs
    if not rows:
        if len(outputs) == 1:
            return {"outputs": _jsonable(next(iter(outputs.values())))}
        return {"outputs": {k: _jsonable(v) for k, v in outputs.items()}}
    if len(outputs) == 1:
        return {"predictions": _jsonable(next(iter(outputs.values())))}
    columns = {k: _jsonable(v) for k, v in outputs.items()}
    count = len(next(iter(columns.values())))
    return {"predictions": [{k: col[i] for k, col in columns.items()} for i in range(count)]}


def model_status(predictor: Predictor, model_name: str, version: int | None, label: str | None) -> dict:
    versions = predictor.status_versions(model_name, version, label)
    return {
        "model_version_status": [
            {"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            for v in versions
        ]
    }


def _tensor_json(name: str, spec: TensorSpec) -> dict[str, Any]:
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape or ()]
    return {
        "dtype": dtype_name(dtype_of_numpy(spec.dtype)),
        "tensor_shape": {"dim": dims, "unknown_rank": spec.shape is None},
        "name": name,
    }


def _signature_json(spec: SignatureSpec) -> dict[str, Any]:
    return {
        "inputs": {k: _tensor_json(k, v) for k, v in spec.inputs.items()},
        "outputs": {k: _tensor_json(k, v) for k, v in spec.outputs.items()},
        "method_name": spec.method_name,
    }


def model_metadata(predictor: Predictor, model_name: str, version: int | None, label: str | None) -> dict:
    predictor.check_model(model_name)
    resolved, _ = predictor.resolve_version(version, label)
    signatures = {name: _signature_json(spec) for name, spec in predictor.signatures(resolved).items()}
    return {
        "model_spec": {"name": model_name, "signature_name": "", "version": str(resolved)},
        "metadata": {"signature_def": {"signature_def": signatures}},
    }
