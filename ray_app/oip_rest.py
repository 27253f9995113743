"""The Open Inference Protocol's REST API (KServe v2 / Triton HTTP) <-> :mod:`ray_app.oip_api`.

Paths as Triton matches them on the raw path (``src/http_server.cc``: ``/v2``,
``/v2/health/(live|ready)``, ``/v2/models/{m}[/versions/{v}][/ready|/infer]``; a version may also
be a version label here), anything else under ``/v2`` a 404 ``{"error": "Not Found"}``. Readiness
is the status code alone (200 ready, 400 not), as the spec and Triton answer. Errors are
``{"error": "..."}`` with the status of the one table (``ray_app.protocol.status``).

Infer bodies are JSON (``data`` nested or flat) or, with the ``Inference-Header-Content-Length``
header, a JSON header followed by binary tensors (Triton's ``binary_tensor_data`` extension:
inputs with ``parameters.binary_data_size``, in input order; outputs answered binary when
``outputs[i].parameters.binary_data`` or the request's ``parameters.binary_data_output`` says
so). The body is read within ``max_request_bytes`` (``ray_app.request_body``: ``Content-Length``
first); the header's inputs are checked against the signature and the limits, and each binary
section's declared size against the bytes received, before any tensor is decoded. A large header
is parsed, checked and decoded in the replica's decoding process (``ray_app.offload``), as TF
Serving's REST bodies are, so that its parse does not hold the event loop.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ray_app import oip_api, request_body
from ray_app.config import Limits
from ray_app.predictor import Predictor, Target
from ray_app.protocol import oip_tensors
from ray_app.protocol.status import (
    InvalidArgumentError,
    ServingError,
    StatusCode,
    UnimplementedError,
    to_status,
)

HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"
_BINARY = "application/octet-stream"
_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(?:/(infer|ready))?")
_HEALTH_PATH = re.compile(r"/v2/health/(live|ready)")


@dataclass(frozen=True)
class Answer:
    """An HTTP answer and what the metrics record of it."""

    status: int
    body: bytes = b""
    media_type: str = _JSON
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "unknown"
    version: int | None = None
    signature: str = ""
    error: BaseException | None = None


class _HttpError(ServingError):
    """An answer with an HTTP status outside the gRPC table (404 path, 405 method)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = StatusCode.NOT_FOUND if status == 404 else StatusCode.UNIMPLEMENTED  # for the metrics


# JSON answers are written ASCII-only: a request may carry lone surrogates ("\ud800" is valid JSON),
# which no UTF-8 encoder takes.
def error_answer(exc: BaseException, method: str = "unknown") -> Answer:
    if isinstance(exc, _HttpError):
        status, message = exc.status, exc.message
    else:
        _, status, message = to_status(exc)
    body = json.dumps({"error": message}, ensure_ascii=True).encode()
    return Answer(status, body, method=method, error=exc)


def _json_answer(document: Any, method: str, **kwargs: Any) -> Answer:
    return Answer(200, json.dumps(document, ensure_ascii=True).encode(), method=method, **kwargs)


def _only(http_method: str, allowed: str) -> None:
    if http_method != allowed:
        raise _HttpError(405, "Method Not Allowed")


async def handle(
    predictor: Predictor,
    http_method: str,
    raw_path: str,
    headers: Mapping[str, str],
    stream: AsyncIterator[bytes],
    deadline_s: float | None = None,
) -> Answer:
    """Answer one request under ``/v2``; every error becomes its ``{"error": ...}`` answer.
    ``deadline_s``: when the caller stops waiting (``ray_app.deadlines``), for an infer."""
    method = "unknown"
    try:
        if raw_path == "/v2":
            method = "server_metadata"
            _only(http_method, "GET")
            document = {
                "name": oip_api.SERVER_NAME,
                "version": oip_api.server_version(),
                "extensions": list(oip_api.EXTENSIONS),
            }
            return _json_answer(document, method)
        health = _HEALTH_PATH.fullmatch(raw_path)
        if health:
            method = f"server_{health.group(1)}"
            _only(http_method, "GET")
            ok = health.group(1) == "live" or oip_api.server_ready(predictor)
            return Answer(200 if ok else 400, method=method)
        model = _MODEL_PATH.fullmatch(raw_path)
        if model is None:
            raise _HttpError(404, "Not Found")
        name = urllib.parse.unquote(model.group(1))
        version = urllib.parse.unquote(model.group(2) or "")
        kind = model.group(3) or "metadata"
        method = f"model_{kind}"
        if kind == "metadata":
            _only(http_method, "GET")
            return _json_answer(_metadata_json(predictor, name, version), method)
        if kind == "ready":
            _only(http_method, "GET")
            if not oip_api.model_ready(predictor, name, version):
                raise InvalidArgumentError("Model version not ready")  # Triton's text, 400
            return Answer(200, method=method)
        _only(http_method, "POST")
        return await _infer(predictor, name, version, headers, stream, deadline_s)
    except Exception as exc:
        return error_answer(exc, method)


def _metadata_json(predictor: Predictor, name: str, version: str) -> dict[str, Any]:
    described = oip_api.model_metadata(predictor, name, version)

    def tensors(items):
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": described.name,
        "versions": list(described.versions),
        "platform": described.platform,
        "inputs": tensors(described.inputs),
        "outputs": tensors(described.outputs),
    }


# -- infer -------------------------------------------------------------------------------------------
def header_length(headers: Mapping[str, str], body_bytes: int) -> int:
    """The JSON header's length: ``Inference-Header-Content-Length``, else the whole body."""
    text = headers.get(HEADER_LENGTH)
    if text is None:
        return body_bytes
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise InvalidArgumentError(f"Unable to parse Inference-Header-Content-Length, got: {text[:40]}")
    length = int(text)
    if length > body_bytes:
        raise InvalidArgumentError(
            f"inference header size should be in range (0, {body_bytes}), got: {text}"
        )  # Triton's text (HTTPAPIServer::GetInferenceHeaderLength)
    return length


def _parse_header(raw: bytes | memoryview) -> dict[str, Any]:
    try:
        document = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgumentError(f"failed to parse the request JSON buffer: {exc}") from None
    except RecursionError:
        raise InvalidArgumentError("failed to parse the request JSON buffer: it nests too deep") from None
    if not isinstance(document, dict):
        raise InvalidArgumentError("failed to parse the request JSON buffer: expected a JSON object")
    return document


def _member(document: Mapping[str, Any], key: str, kind: type, what: str, default: Any = None) -> Any:
    if key not in document:
        if default is None:
            raise InvalidArgumentError(f"Unable to parse '{key}'{what}: missing")
        return default
    value = document[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgumentError(f"Unable to parse '{key}'{what}")
    return value


@dataclass(frozen=True)
class _Input:
    declared: oip_api.DeclaredInput
    data: Any  # the JSON "data", when not binary
    binary_bytes: int | None  # parameters.binary_data_size


def _inputs(document: Mapping[str, Any]) -> list[_Input]:
    parsed = []
    for item in _member(document, "inputs", list, ""):
        if not isinstance(item, dict):
            raise InvalidArgumentError("Unable to parse 'inputs': each input must be an object")
        name = _member(item, "name", str, "")
        where = f" of input '{name}'"
        datatype = _member(item, "datatype", str, where)
        shape = oip_tensors.check_shape(name, _member(item, "shape", list, where))
        parameters = _member(item, "parameters", dict, where, default={})
        binary = parameters.get("binary_data_size")
        if binary is not None and (isinstance(binary, bool) or not isinstance(binary, int) or binary < 0):
            raise InvalidArgumentError("Unable to parse 'binary_data_size'")
        if binary is None and "data" not in item:
            raise InvalidArgumentError(
                f"must specify one of the following fields: 'data', 'binary_data_size' in 'parameters', "
                f"'shared_memory_region' in 'parameters' for input '{name}'"
            )  # Triton's text (http_server.cc CheckBinaryInputData and friends)
        parsed.append(_Input(oip_api.DeclaredInput(name, datatype, shape), item.get("data"), binary))
    return parsed


def _outputs(document: Mapping[str, Any]) -> list[tuple[str, bool | None]]:
    """Requested outputs: (name, binary_data or None when the request does not say)."""
    requested = []
    for item in _member(document, "outputs", list, "", default=[]):
        if not isinstance(item, dict):
            raise InvalidArgumentError("Unable to parse 'outputs': each output must be an object")
        name = _member(item, "name", str, "")
        parameters = _member(item, "parameters", dict, f" of output '{name}'", default={})
        if "classification" in parameters:
            raise UnimplementedError("the classification extension is not supported by this server")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise InvalidArgumentError(f"Unable to parse 'binary_data' of output '{name}'")
        requested.append((name, binary))
    return requested


@dataclass(frozen=True)
class _Decoded:
    """What :func:`decode_infer` makes of an infer request's JSON header (pickles: it may come back
    from a decoding process)."""

    request_id: str
    requested: list[tuple[str, bool | None]]
    binary_default: bool
    inputs: list[oip_api.DeclaredInput]
    contents: list[np.ndarray | slice]  # each input's JSON data decoded, or its binary section's place


def decode_infer(header: bytes, binary_bytes: int, target: Target, name: str, limits: Limits) -> _Decoded:
    """Parse an infer request's JSON header, check what it declares (Triton's checks, then the
    signature and the limits), check each binary section's size against the ``binary_bytes``
    received after the header, then decode the JSON ``data`` of each input to its datatype, in
    that order. A pure function of its arguments, so that a large header is decoded in the
    replica's decoding process (``ray_app.offload``)."""
    document = _parse_header(header)
    inputs = _inputs(document)
    requested = _outputs(document)
    parameters = _member(document, "parameters", dict, "", default={})
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgumentError("Unable to parse 'binary_data_output'")
    request_id = document.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgumentError("Unable to parse 'id'")
    output_names = [output for output, _ in requested]
    declared = [item.declared for item in inputs]
    oip_api.check_declared(limits, target, name, declared, output_names)

    offset, sections = 0, []
    for item in inputs:  # every section's size against the bytes received, before any decode
        if item.binary_bytes is None:
            sections.append(None)
            continue
        if binary_bytes == 0 and item.binary_bytes:
            raise InvalidArgumentError(
                "must specify valid 'Infer-Header-Content-Length' in request header and "
                "'binary_data_size' when passing inputs in binary data format"
            )
        if offset + item.binary_bytes > binary_bytes:
            raise InvalidArgumentError(
                f"unexpected size for input '{item.declared.name}', expecting "
                f"{offset + item.binary_bytes - binary_bytes} additional bytes for model '{name}'"
            )
        sections.append(slice(offset, offset + item.binary_bytes))
        offset += item.binary_bytes
    if offset != binary_bytes:
        raise InvalidArgumentError(f"unexpected additional input data for model '{name}'")
    contents = [
        section
        if section is not None
        else oip_tensors.from_json(item.declared.name, item.declared.datatype, item.declared.shape, item.data)
        for item, section in zip(inputs, sections)
    ]
    return _Decoded(request_id, requested, binary_default, declared, contents)


async def _infer(
    predictor: Predictor,
    name: str,
    version: str,
    headers: Mapping[str, str],
    stream: AsyncIterator[bytes],
    deadline_s: float | None,
) -> Answer:
    target = oip_api.resolve(predictor, name, version)  # before reading the body
    body = await request_body.read_body(headers, stream, predictor.config.limits.max_request_bytes)
    split = header_length(headers, len(body))
    json_header = body if split == len(body) else body[:split]
    for_decoding = replace(target, spec=target.spec.for_decoding())  # pickles without TensorFlow
    decoded = await predictor.offload_isolated(
        split, decode_infer, json_header, len(body) - split, for_decoding, name, predictor.config.limits
    )
    binary = memoryview(body)[split:]
    arrays = {}
    for d, content in zip(decoded.inputs, decoded.contents):
        if isinstance(content, slice):
            arrays[d.name] = oip_tensors.from_raw(d.name, d.datatype, d.shape, binary[content])
        else:
            arrays[d.name] = content
    requested, request_id, binary_default = decoded.requested, decoded.request_id, decoded.binary_default
    output_names = [output for output, _ in requested]

    result = await oip_api.infer(predictor, target, arrays, output_names, deadline_s)
    wants_binary = dict(requested)
    out_json, raws = [], []
    for output, value in oip_api.ordered_outputs(result, output_names):
        datatype = oip_tensors.datatype_of(value.dtype)
        entry: dict[str, Any] = {"name": output, "datatype": datatype, "shape": list(value.shape)}
        as_binary = wants_binary.get(output)
        if as_binary is None:
            as_binary = binary_default
        if as_binary or datatype == "FP16":
            raw = oip_tensors.to_raw(value)
            entry["parameters"] = {"binary_data_size": len(raw)}
            raws.append(raw)
        else:
            entry["data"] = oip_tensors.to_json(value)
        out_json.append(entry)
    answer: dict[str, Any] = {"model_name": name, "model_version": str(result.version)}
    if request_id:
        answer["id"] = request_id
    answer["outputs"] = out_json
    header = json.dumps(answer, ensure_ascii=True).encode()
    common = {"method": "model_infer", "version": result.version, "signature": result.signature_name}
    if not raws:
        return Answer(200, header, **common)
    return Answer(
        200,
        header + b"".join(raws),
        media_type=_BINARY,
        headers={"Inference-Header-Content-Length": str(len(header))},
        **common,
    )
