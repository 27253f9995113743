"""A REST ``:predict`` body -> its signature and decoded inputs, in one pure function.

Everything between the body's bytes and the tensors the model runs: the JSON parse (its
composites counted first), the document's shape (``instances`` or ``inputs``), the signature it
names, TF Serving's checks on what it declares and the limits (``ray_app.declared``), and the
conversion to the signature's dtypes. It needs nothing of the replica but the model's signatures
and the limits, and its arguments and result pickle, so a large body can be decoded in another
process (``ray_app.offload``): its parse then holds no lock the replica's event loop needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ray_app import declared as declared_checks
from ray_app import json_tensor, rest_bodies
from ray_app.config import Limits
from ray_app.protocol.names import SERVING_DEFAULT
from ray_app.protocol.status import InvalidArgumentError, ServingError
from ray_app.signatures import SignatureNotFoundError, SignatureSpec, lookup


@dataclass(frozen=True)
class DecodedPredict:
    signature_name: str  # never empty: "" resolves to serving_default
    inputs: dict[str, np.ndarray]  # checked against the signature and the limits
    rows: bool  # "instances" (answered as "predictions") rather than "inputs" ("outputs")


def decode(
    body: bytes, signatures: Mapping[str, SignatureSpec] | ServingError, limits: Limits
) -> DecodedPredict:
    """TF Serving's ``FillPredictRequestFromJson``, with its texts, and the app's limits.

    ``signatures``: the model version's, or why the URL's model or version cannot answer. As in
    TF Serving (whose ``get_tensorinfo_map`` is called once the document is parsed), that error
    comes after the document's own."""
    document, named = rest_bodies.object_and_signature(body, limits.max_json_composites)
    if isinstance(signatures, ServingError):
        raise signatures
    signature = named or SERVING_DEFAULT
    try:
        spec = lookup(signatures, signature)
    except SignatureNotFoundError as exc:
        raise InvalidArgumentError(
            f'Serving signature name: "{exc.signature}" not found in signature def'
        ) from None
    if not spec.inputs:
        raise InvalidArgumentError(f"Failed to get input map for signature: {named or 'DEFAULT'}")
    has_rows, has_columns = "instances" in document, "inputs" in document
    if has_rows and has_columns:
        raise rest_bodies.format_error(
            body, "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist "
        )
    if has_rows:
        values = rest_bodies.instances(body, document["instances"], spec, limits)
    elif has_columns:
        values = rest_bodies.columns(document["inputs"], spec)
    else:
        raise InvalidArgumentError("Missing 'inputs' or 'instances' key")
    declared = {
        alias: (spec.inputs[alias].tf_dtype, json_tensor.outline(value)) for alias, value in values.items()
    }
    declared_checks.check_declared(spec, signature, declared, (), limits)
    del document  # what is not an input can be freed before the conversion

    def max_elements(dtype: np.dtype) -> int:
        return declared_checks.max_elements(dtype, limits)

    return DecodedPredict(signature, rest_bodies.convert(spec, values, max_elements), has_rows)
