"""TF Serving's REST API <-> the predictor (the HTTP front door's model-facing half).

Follows TF Serving's ``http_rest_api_handler.cc``, ``http_rest_api_util.cc`` and
``util/json_tensor.cc``: the same URL patterns (matched on the raw path, case-insensitive),
"Malformed request" for anything else under ``/v1/``, JSON bodies parsed and converted by the
signature's dtypes with TF Serving's error texts, row (``instances`` -> ``predictions``) and
columnar (``inputs`` -> ``outputs``) formats, ``{"b64": ...}`` for binary values, numbers
rendered as TF Serving renders them, and errors as ``{"error": "..."}`` with its HTTP statuses.

Deliberate differences (see README): errors that quote the request document quote its raw text,
cut to ``MAX_ECHOED_CHARS`` (TF Serving re-prints the whole document); JSON syntax errors use
RapidJSON's texts for the common cases only; documents nested too deep for Python's parser
(about 1,000 levels) are refused with a 400.
"""

from __future__ import annotations

import base64
import json
import math
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from google.protobuf import json_format

from ray_app import grpc_api, json_tensor
from ray_app.config import Limits
from ray_app.json_tensor import MAX_ECHOED_CHARS
from ray_app.predictor import InferenceResult, Predictor, Target
from ray_app.protocol.protos import model_pb2
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError
from ray_app.protocol.tensors import STRING
from ray_app.signatures import SignatureNotFoundError, SignatureSpec

_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.I
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.I
)
_INT64_MAX = 2**63 - 1

Kind = Literal["predict", "classify", "regress", "status", "metadata"]


@dataclass(frozen=True)
class Route:
    """What a REST request asks for, parsed from its method and raw path as TF Serving does."""

    kind: Kind
    model_name: str
    version: int | None = None
    label: str | None = None

    def model_spec(self) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name)
        if self.version is not None:
            spec.version.value = self.version
        elif self.label is not None:
            spec.version_label = self.label
        return spec


def route(method: str, path_and_query: str) -> Route:
    """Dispatch like ``HttpRestApiHandler::ProcessRequest``; INVALID_ARGUMENT "Malformed request" else."""
    malformed = InvalidArgumentError(f"Malformed request: {method} {path_and_query}")
    pattern = {"POST": _PREDICT_PATH, "GET": _STATUS_PATH}.get(method)
    match = pattern.fullmatch(path_and_query) if pattern else None
    if match is None:
        raise malformed
    name, version_text, label, last = match.groups()
    if method == "GET" and not name:
        raise InvalidArgumentError("Missing model name in request.")
    if method == "POST" and last not in ("predict", "classify", "regress"):
        raise malformed  # the pattern is case-insensitive, the verb comparison is not
    version = None
    if version_text is not None:
        # int() refuses over 4,300 digits (ValueError): anything over 19 is out of range anyway
        if len(version_text) > len(str(_INT64_MAX)) or int(version_text) > _INT64_MAX:
            raise InvalidArgumentError(f"Failed to convert version: {version_text[:40]} to numeric.")
        version = int(version_text)
    kind: Kind = last if method == "POST" else ("metadata" if last == "metadata" else "status")
    return Route(kind, urllib.parse.unquote(name), version, urllib.parse.unquote(label) if label else None)


# -- JSON in (the bounded parsing and conversion live in ray_app.json_tensor) -----------------------
_echo = json_tensor.echo
to_tensor = json_tensor.to_tensor


def parse_json(body: bytes, max_composites: int | None = None) -> Any:
    """The request document (``json_tensor.parse``), its lists, objects and strings counted first."""
    if max_composites is not None:
        json_tensor.check_composites(body, max_composites)
    return json_tensor.parse(body)


def _format_error(body: bytes, *parts: str) -> InvalidArgumentError:
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


def _instances(body: bytes, payload: Any, spec: SignatureSpec, limits: Limits) -> dict[str, Any]:
    """The JSON value of each input in a row-format body (not converted yet)."""
    if not isinstance(payload, list):
        raise _format_error(body, "Excepting 'instances' to be an list/array")
    if not payload:
        raise _format_error(body, "No values in 'instances' array")
    _check_rows(len(payload), limits)
    names = sorted(spec.inputs)
    if _is_object(payload[0]):
        for index, element in enumerate(payload):
            if not _is_object(element):
                raise InvalidArgumentError(f"Expecting object but got list at item {index} of input list")
            if len(element) != len(names) or set(element) != set(names):
                raise InvalidArgumentError(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {_echo(element)} "
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


def _columns(payload: Any, spec: SignatureSpec) -> dict[str, Any]:
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


def _convert(predictor: Predictor, target: Target, values: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each input's JSON value as the signature's dtype (CPU work: may run off the event loop)."""
    spec = target.spec
    return {
        alias: to_tensor(alias, value, spec.inputs[alias], predictor.max_elements(spec.inputs[alias].dtype))
        for alias, value in values.items()
    }


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


def to_json(result: InferenceResult, rows: bool) -> str:
    """``MakeJsonFromTensors``: ``predictions`` (row) or ``outputs`` (columnar)."""
    outputs = result.outputs
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


# -- the handlers ------------------------------------------------------------------------------------
def _object_and_signature(body: bytes, max_composites: int | None = None) -> tuple[dict[str, Any], str]:
    """The request's JSON object and its ``signature_name`` ("" when absent), TF Serving's checks."""
    document = parse_json(body, max_composites)
    if not isinstance(document, dict):
        raise _format_error(body, "Is not object")
    signature = document.get("signature_name", "")
    if not isinstance(signature, str):
        raise _format_error(body, "not formatted correctly. 'signature_name' key must be a string value.")
    return document, signature


def _output_bytes(result: InferenceResult) -> int:
    return sum(value.nbytes for value in result.outputs.values())


async def predict(
    predictor: Predictor, where: Route, body: bytes, deadline_s: float | None = None
) -> tuple[str, int, str]:
    """``:predict``: the JSON answer, the version that ran and the signature.

    The body's outline (composites, rows, each input's shape) is checked against the limits and
    the signature before any conversion; parsing, conversion and rendering of large bodies run
    off the event loop (``Predictor.offload``). ``deadline_s``: see ``Predictor.run``.
    """
    limits = predictor.config.limits
    document, signature = await predictor.offload(
        len(body), _object_and_signature, body, limits.max_json_composites
    )
    try:
        target = predictor.resolve(where.model_name, where.version, where.label, signature)
    except SignatureNotFoundError as exc:
        raise InvalidArgumentError(
            f'Serving signature name: "{exc.signature}" not found in signature def'
        ) from None
    if not target.spec.inputs:
        raise InvalidArgumentError(f"Failed to get input map for signature: {signature or 'DEFAULT'}")
    has_rows, has_columns = "instances" in document, "inputs" in document
    if has_rows and has_columns:
        raise _format_error(
            body, "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist "
        )
    if has_rows:
        values = _instances(body, document["instances"], target.spec, limits)
    elif has_columns:
        values = _columns(document["inputs"], target.spec)
    else:
        raise InvalidArgumentError("Missing 'inputs' or 'instances' key")
    declared = {
        alias: (target.spec.inputs[alias].tf_dtype, json_tensor.outline(value))
        for alias, value in values.items()
    }
    predictor.check_declared(target, declared, ())
    inputs = await predictor.offload(len(body), _convert, predictor, target, values)
    del document, values  # the parsed document can be freed while the model runs
    result = await predictor.run(target, inputs, declared_checked=True, deadline_s=deadline_s)
    text = await predictor.offload(_output_bytes(result), to_json, result, has_rows)
    return text, result.version, result.signature_name


def examples_request(predictor: Predictor, where: Route, body: bytes) -> None:
    """``:classify`` / ``:regress``: TF Serving's body checks, then its signature checks (always refused)."""
    document, signature = _object_and_signature(body, predictor.config.limits.max_json_composites)
    if "examples" not in document:
        raise _format_error(body, "When method is classify, key 'examples' is expected and was not found")
    if not isinstance(document["examples"], list):
        raise _format_error(body, "Expecting 'examples' value to be an list/array")
    if not document["examples"]:
        raise _format_error(body, "'examples' value is an empty array")
    spec = where.model_spec()
    spec.signature_name = signature
    method = grpc_api.CLASSIFY_METHOD if where.kind == "classify" else grpc_api.REGRESS_METHOD
    grpc_api.check_tf_example_request(predictor, spec, method)


def status(predictor: Predictor, where: Route) -> str:
    """``GET /v1/models/{m}[/versions/{v}]``: TF Serving's status JSON (a label is ignored, as there)."""
    response = grpc_api.model_status(predictor, where.model_spec())
    return json_format.MessageToJson(response, indent=1, always_print_fields_with_no_presence=True) + "\n"


def metadata(predictor: Predictor, where: Route) -> str:
    """``GET .../metadata``: assembled as TF Serving assembles it (``ToJsonString``)."""
    response = grpc_api.model_metadata(predictor, where.model_spec(), ["signature_def"])
    options = {"indent": 1, "always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
    signature_map = grpc_api.signature_def_map(predictor.signatures(response.model_spec.version.value))
    model_spec = json_format.MessageToJson(response.model_spec, **options)
    signature_defs = json_format.MessageToJson(signature_map, **options)
    return '{\n"model_spec":' + model_spec + ',\n"metadata": {"signature_def": ' + signature_defs + "}\n}\n"
