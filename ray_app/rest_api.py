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
import binascii
import json
import math
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from google.protobuf import json_format

from ray_app import grpc_api
from ray_app.predictor import InferenceResult, Predictor
from ray_app.protocol.protos import model_pb2, types_pb2
from ray_app.protocol.status import InvalidArgumentError, UnimplementedError
from ray_app.protocol.tensors import STRING, tf_dtype_string
from ray_app.signatures import SignatureNotFoundError, SignatureSpec, TensorSpec

MAX_ECHOED_CHARS = 1000

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


# -- JSON in -----------------------------------------------------------------------------------------
_RAPIDJSON_TEXT = {  # Python's json messages -> RapidJSON's (what TF Serving quotes)
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Extra data": "The document root must not be followed by other values.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
    "Invalid control character at": "Invalid encoding in string.",
}


def parse_json(body: bytes) -> Any:
    """The request document; TF Serving's "JSON Parse error: ..." (400) when it is not JSON."""
    if not body:
        raise InvalidArgumentError("JSON Parse error: The document is empty")
    text = body.decode("utf-8", "surrogateescape")  # RapidJSON does not validate UTF-8 either
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        message = _RAPIDJSON_TEXT.get(exc.msg, exc.msg)
        if exc.msg == "Expecting ',' delimiter":
            message = _comma_text(text, exc.pos)
        raise InvalidArgumentError(f"JSON Parse error: {message} at offset: {exc.pos}") from None
    except RecursionError:
        raise InvalidArgumentError("JSON Parse error: the document nests too deep") from None
    return document


def _comma_text(text: str, position: int) -> str:
    """RapidJSON names the container a missing comma belongs to; find the innermost open one."""
    stack, in_string, escaped = [], False, False
    for char in text[:position]:
        if in_string:
            escaped = not escaped and char == "\\"
            in_string = escaped or char != '"'
        elif char == '"':
            in_string = True
        elif char in "[{":
            stack.append(char)
        elif char in "]}" and stack:
            stack.pop()
    if stack and stack[-1] == "[":
        return "Missing a comma or ']' after an array element."
    return "Missing a comma or '}' after an object member."


def _echo(value: Any) -> str:
    """One JSON value (an element, a leaf) as compact JSON, cut to ``MAX_ECHOED_CHARS``."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= MAX_ECHOED_CHARS else text[:MAX_ECHOED_CHARS] + "...(cut)"


def _format_error(body: bytes, *parts: str) -> InvalidArgumentError:
    """``FormatError``: the request document (its raw text, cut: cheap whatever its size), then the problem."""
    text = body[: MAX_ECHOED_CHARS + 1].decode("utf-8", "replace")
    if len(text) > MAX_ECHOED_CHARS:
        text = text[:MAX_ECHOED_CHARS] + "...(cut)"
    return InvalidArgumentError(f"JSON Value: {text} {''.join(parts)}")


def _json_type(value: Any) -> str:
    """RapidJSON's type name of a parsed value (what TF Serving's type errors say)."""
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return "String" if isinstance(value, str) else "Number"


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _is_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


# -- JSON -> tensors ---------------------------------------------------------------------------------
def _type_error(value: Any, spec: TensorSpec) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"JSON Value: {_echo(value)} Type: {_json_type(value)} is not of expected type: "
        f"{tf_dtype_string(spec.tf_dtype)}"
    )


def _leaves(value: Any):
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        else:
            yield item


# JSON integer ranges by dtype (RapidJSON's IsInt / IsInt64 / IsUint / IsUint64), and the largest
# integer a float type holds exactly (TF Serving refuses integers beyond it).
_INT_RANGES = {
    types_pb2.DT_INT32: (-(2**31), 2**31 - 1),
    types_pb2.DT_INT16: (-(2**31), 2**31 - 1),
    types_pb2.DT_INT8: (-(2**31), 2**31 - 1),
    types_pb2.DT_UINT8: (-(2**31), 2**31 - 1),
    types_pb2.DT_UINT16: (-(2**31), 2**31 - 1),
    types_pb2.DT_INT64: (-(2**63), 2**63 - 1),
    types_pb2.DT_UINT32: (0, 2**32 - 1),
    types_pb2.DT_UINT64: (0, 2**64 - 1),
}
_EXACT_INT = {types_pb2.DT_FLOAT: (2**24 - 1, "float"), types_pb2.DT_DOUBLE: (2**53 - 1, "double")}


def _check_leaf(value: Any, spec: TensorSpec) -> None:
    """TF Serving's ``AddValueToTensor`` checks on one JSON value."""
    dtype = spec.tf_dtype
    if dtype in _EXACT_INT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(value, spec)
        limit, kind = _EXACT_INT[dtype]
        if isinstance(value, int) and abs(value) > limit:
            raise InvalidArgumentError(
                f"Cannot convert JSON value: {value} to {kind} without loss of precision."
            )
    elif dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _type_error(value, spec)
    elif dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, spec)


def _string_leaf(value: Any, spec: TensorSpec) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, dict) and "b64" in value:
        if len(value) != 1 or not isinstance(value["b64"], str):
            raise InvalidArgumentError(f"JSON Value: {_echo(value)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgumentError("Unable to base64 decode") from None
    raise _type_error(value, spec)


def to_tensor(alias: str, value: Any, spec: TensorSpec) -> np.ndarray:
    """One input's JSON value -> an array of the signature's dtype (TF Serving's conversions)."""
    if spec.dtype is None or spec.tf_dtype == types_pb2.DT_HALF:
        raise UnimplementedError(
            f"Conversion of JSON Value: {_echo(value)} to type: {tf_dtype_string(spec.tf_dtype)}"
        )
    if spec.dtype == STRING:
        array = _rectangular(alias, value, object)
        flat = array.reshape(-1)
        for index, leaf in enumerate(flat):
            flat[index] = _string_leaf(leaf, spec)
        return array
    array = _rectangular(alias, value, None)
    if array.size == 0:
        return np.zeros(array.shape, dtype=spec.dtype)
    kind = array.dtype.kind
    fits = (
        (spec.tf_dtype in _EXACT_INT and kind in "f")
        or (spec.tf_dtype in _EXACT_INT and kind in "iu" and _within(array, _EXACT_INT[spec.tf_dtype][0]))
        or (spec.tf_dtype in _INT_RANGES and kind in "iu" and _in_range(array, *_INT_RANGES[spec.tf_dtype]))
        or (spec.tf_dtype == types_pb2.DT_BOOL and kind == "b")
    )
    if not fits:  # find the value TF Serving would name (only on the error path)
        for leaf in _leaves(value):
            _check_leaf(leaf, spec)
        raise _type_error(value, spec)
    return array.astype(spec.dtype)  # narrow integer types wrap, like TF Serving's C++ casts


def _within(array: np.ndarray, limit: int) -> bool:
    return not array.size or int(np.abs(array).max()) <= limit


def _in_range(array: np.ndarray, low: int, high: int) -> bool:
    return not array.size or (int(array.min()) >= low and int(array.max()) <= high)


def _outline(value: Any) -> tuple[int, ...]:
    """The shape nested lists suggest, following first elements only (cheap: no full walk)."""
    dims = []
    while isinstance(value, list):
        dims.append(len(value))
        value = value[0] if value else None
    return tuple(dims)


def _rectangular(alias: str, value: Any, dtype: type | None) -> np.ndarray:
    """``value`` as an n-d array; TF Serving's error when the nesting is ragged."""
    try:
        array = np.array(value, dtype=dtype)
    except (ValueError, OverflowError):  # ragged nesting, or integers beyond 64 bits
        array = None
    if array is not None and (dtype is not None or array.dtype != object):
        return array
    if isinstance(value, list) and value:
        first = _outline(value[0])
        for index, element in enumerate(value):
            if _outline(element) != first:
                raise InvalidArgumentError(
                    f"Failed to process element: {index} of 'instances' list. Error: INVALID_ARGUMENT: Expecting "
                    f"shape [{','.join(map(str, first))}] but got: [{','.join(map(str, _outline(element)))}]"
                )
    if array is None:
        raise InvalidArgumentError(f"input {alias!r}: the JSON lists are not a rectangular tensor")
    return array


def _instances(body: bytes, payload: Any, spec: SignatureSpec) -> dict[str, np.ndarray]:
    if not isinstance(payload, list):
        raise _format_error(body, "Excepting 'instances' to be an list/array")
    if not payload:
        raise _format_error(body, "No values in 'instances' array")
    names = sorted(spec.inputs)
    if _is_object(payload[0]):
        for index, element in enumerate(payload):
            if not _is_object(element):
                raise InvalidArgumentError(f"Expecting object but got list at item {index} of input list")
            if set(element) != set(names):
                raise InvalidArgumentError(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {_echo(element)} "
                    f"keys must be equal to: {','.join(names)}"
                )
        columns = {name: [element[name] for element in payload] for name in names}
    else:
        if len(names) != 1:
            raise InvalidArgumentError(
                "instances is a plain list, but expecting list of objects as multiple input tensors "
                "required as per tensorinfo_map"
            )
        for index, element in enumerate(payload):
            if _is_object(element):
                raise InvalidArgumentError(
                    f"Expecting value/list but got object at item {index} of input list"
                )
        columns = {names[0]: payload}
    return {name: to_tensor(name, values, spec.inputs[name]) for name, values in columns.items()}


def _columns(payload: Any, spec: SignatureSpec) -> dict[str, np.ndarray]:
    names = sorted(spec.inputs)
    if not _is_object(payload):
        if len(names) != 1:
            raise InvalidArgumentError(
                "inputs is a plain value/list, but expecting an object as multiple input tensors "
                "required as per tensorinfo_map"
            )
        return {names[0]: to_tensor(names[0], payload, spec.inputs[names[0]])}
    for name in names:
        if name not in payload:
            raise InvalidArgumentError(f"Missing named input: {name} in 'inputs' object.")
    return {name: to_tensor(name, payload[name], spec.inputs[name]) for name in names}  # extra keys ignored


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
def _object_and_signature(body: bytes) -> tuple[dict[str, Any], str]:
    """The request's JSON object and its ``signature_name`` ("" when absent), TF Serving's checks."""
    document = parse_json(body)
    if not isinstance(document, dict):
        raise _format_error(body, "Is not object")
    signature = document.get("signature_name", "")
    if not isinstance(signature, str):
        raise _format_error(body, "not formatted correctly. 'signature_name' key must be a string value.")
    return document, signature


async def predict(predictor: Predictor, where: Route, body: bytes) -> tuple[str, int, str]:
    """``:predict``: the JSON answer, the version that ran and the signature."""
    document, signature = _object_and_signature(body)
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
        inputs = _instances(body, document["instances"], target.spec)
    elif has_columns:
        inputs = _columns(document["inputs"], target.spec)
    else:
        raise InvalidArgumentError("Missing 'inputs' or 'instances' key")
    result = await predictor.run(target, inputs)
    return to_json(result, rows=has_rows), result.version, result.signature_name


def examples_request(predictor: Predictor, where: Route, body: bytes) -> None:
    """``:classify`` / ``:regress``: TF Serving's body checks, then its signature checks (always refused)."""
    document, signature = _object_and_signature(body)
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
