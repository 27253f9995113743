"""TF Serving's REST API <-> the predictor (the HTTP front door's model-facing half): the handlers.

Follows TF Serving's ``http_rest_api_handler.cc``: which request a URL asks for comes from
``ray_app.rest_routes``; the documents in and out, with TF Serving's texts, from
``ray_app.rest_bodies``; errors map to HTTP statuses through ``ray_app.protocol.status``.

Deliberate differences (docs/reference/tf-serving.md): errors that quote the request document quote its
raw text, cut to ``MAX_ECHOED_CHARS`` (TF Serving re-prints the whole document); JSON syntax errors
use RapidJSON's texts for the common cases only; documents nested too deep for Python's parser
(about 1,000 levels) are refused with a 400.
"""

from __future__ import annotations

from google.protobuf import json_format

from ray_app import grpc_api, rest_bodies, rest_inputs
from ray_app.predictor import InferenceResult, Predictor, Target
from ray_app.protocol.status import ServingError
from ray_app.rest_routes import Route
from ray_app.signatures import SignatureSpec, lookup


def _output_bytes(result: InferenceResult) -> int:
    return sum(value.nbytes for value in result.outputs.values())


async def predict(
    predictor: Predictor, where: Route, body: bytes, deadline_s: float | None = None
) -> tuple[str, int, str]:
    """``:predict``: the JSON answer, the version that ran and the signature.

    The body's outline (composites, rows, each input's shape) is checked against the limits and the
    signature before any conversion (``ray_app.rest_inputs``); a large body is decoded in the
    replica's decoding process and rendered off the event loop (``ray_app.offload``).
    ``deadline_s``: see ``Predictor.run``.
    """
    try:
        version, pinned = predictor.resolve_model(where.model_name, where.version, where.label)
        signatures = predictor.signatures(version)
        for_decoding: dict[str, SignatureSpec] | ServingError = {
            name: spec.for_decoding() for name, spec in signatures.items()
        }
    except ServingError as exc:  # answered once the body is parsed, as TF Serving does
        for_decoding = exc
    decoded = await predictor.offload_isolated(
        len(body), rest_inputs.decode, body, for_decoding, predictor.config.limits
    )
    spec = lookup(signatures, decoded.signature_name)
    target = Target(predictor.config.model_name, version, pinned, decoded.signature_name, spec)
    result = await predictor.run(target, decoded.inputs, declared_checked=True, deadline_s=deadline_s)
    text = await predictor.offload(_output_bytes(result), rest_bodies.to_json, result.outputs, decoded.rows)
    return text, result.version, result.signature_name


def examples_request(predictor: Predictor, where: Route, body: bytes) -> None:
    """``:classify`` / ``:regress``: TF Serving's body checks, then its signature checks (always refused)."""
    document, signature = rest_bodies.object_and_signature(body, predictor.config.limits.max_json_composites)
    if "examples" not in document:
        raise rest_bodies.format_error(
            body, "When method is classify, key 'examples' is expected and was not found"
        )
    if not isinstance(document["examples"], list):
        raise rest_bodies.format_error(body, "Expecting 'examples' value to be an list/array")
    if not document["examples"]:
        raise rest_bodies.format_error(body, "'examples' value is an empty array")
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
