"""ray_app.json_tensor: REST bodies cost memory in proportion to their size, whatever they hold, and
conversions follow TF Serving's rules. Attack bodies as in issue 15's table (7 MiB each)."""

from __future__ import annotations

import json
import random
import tracemalloc

import numpy as np
import pytest

from ray_app import json_tensor, rest_api, rest_routes
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import Predictor
from ray_app.protocol.status import ServingError, StatusCode
from ray_app.signatures import TensorSpec
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend

pytestmark = pytest.mark.usefixtures("replica_context")

MiB = 1 << 20
# Peak bytes traced while answering, per body byte. The document orjson builds is 4-8 bytes of
# objects per body byte plus its transient buffers (measured 12-20x); before issue 15 a list of
# numbers ending in one string cost 55x (numpy's promotion to fixed-width unicode).
MAX_PEAK_PER_BODY_BYTE = 24


def _pad(prefix: bytes, unit: bytes, last: bytes, suffix: bytes, size: int = 7 * MiB) -> bytes:
    return prefix + unit * ((size - len(prefix) - len(suffix) - len(last)) // len(unit)) + last + suffix


ATTACKS = {
    "numbers ending in one string": _pad(b'{"instances": [', b"0,", b'"a"', b"]}"),
    "2M one-element rows": _pad(b'{"instances": [', b"[0],", b"[0]", b"]}"),
    "floats ending in null": _pad(b'{"instances": [', b"0.5,", b"null", b"]}"),
    "missing comma at the very end": _pad(b'{"instances": [', b"0,", b"0 0", b"]}"),
    "inputs object with 100,000 keys": (
        b'{"inputs": {' + b",".join(b'"k%d": 0' % i for i in range(100_000)) + b', "images": [0]}}'
    ),
    # the same kinds, with shapes the limits and the signature accept: conversion runs
    "1024 images, the last value a string": json.dumps(
        {"instances": [[[0] * 28] * 28] * 1023 + [[[0] * 28] * 27 + [[0] * 27 + ["a"]]]}
    ).encode(),
    "1024 x 784 floats, the last null": json.dumps(
        {"signature_name": "predict_images", "inputs": [[0.5] * 784] * 1023 + [[0.5] * 783 + [None]]}
    ).encode(),
}


def _predictor() -> Predictor:
    """Decoding in this process (no decoding processes), where tracemalloc sees what it costs."""
    config = AppConfig(limits={"offload_processes": 0})
    predictor = Predictor(config, StaticBackend(versions=(1,)), rng=random.Random(0))
    predictor.reconfigure(LiveConfig())
    return predictor


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_bodies_get_a_clean_4xx_at_a_cost_proportional_to_their_size(name: str) -> None:
    body = ATTACKS[name]
    predictor = _predictor()
    tracemalloc.start()
    try:
        with pytest.raises(ServingError) as info:
            run_on_replica_loop(rest_api.predict(predictor, rest_routes.Route("predict", "mnist"), body))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code in (StatusCode.INVALID_ARGUMENT, StatusCode.RESOURCE_EXHAUSTED), info.value
    assert peak_bytes < MAX_PEAK_PER_BODY_BYTE * len(body), (peak_bytes, len(body))


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("2M one-element rows", "max_json_composites"),
        ("inputs object with 100,000 keys", "max_json_composites"),
    ],
)
def test_bodies_of_many_containers_are_refused_before_parsing(name: str, limit: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ServingError) as info:
            run_on_replica_loop(
                rest_api.predict(_predictor(), rest_routes.Route("predict", "mnist"), ATTACKS[name])
            )
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED and limit in info.value.message
    assert peak_bytes < len(ATTACKS[name])  # nothing was parsed


UINT8 = TensorSpec.of(np.uint8, (None, 2), "x")
FLOAT = TensorSpec.of(np.float32, (None, 2), "x")
INT64 = TensorSpec.of(np.int64, (None, 2), "x")
BOOL = TensorSpec.of(np.bool_, (None, 2), "x")


@pytest.mark.parametrize(
    ("value", "spec", "expected"),
    [
        ([[1, 300]], UINT8, np.array([[1, 44]], np.uint8)),  # int32 range, wrapped like C++
        ([[-1, 2]], UINT8, np.array([[255, 2]], np.uint8)),
        ([[0, 0.5]], FLOAT, np.array([[0, 0.5]], np.float32)),  # ints and floats mix
        ([[1e30, 16777215]], FLOAT, np.array([[1e30, 16777215]], np.float32)),  # a big float is fine
        ([[2**62, -(2**63)]], INT64, np.array([[2**62, -(2**63)]], np.int64)),
        ([[True, False]], BOOL, np.array([[True, False]])),
        ([], UINT8, np.zeros((0,), np.uint8)),
    ],
)
def test_values_convert_as_tf_serving_converts_them(value, spec, expected) -> None:
    array = json_tensor.to_tensor("x", value, spec, max_elements=100)
    assert array.dtype == expected.dtype and np.array_equal(array, expected)


@pytest.mark.parametrize(
    ("value", "spec", "message"),
    [
        ([[1, 2**31]], UINT8, "JSON Value: 2147483648 Type: Number is not of expected type: uint8"),
        ([[1, True]], UINT8, "JSON Value: true Type: True is not of expected type: uint8"),
        ([[1, "1"]], FLOAT, 'JSON Value: "1" Type: String is not of expected type: float'),
        ([[0.5, 16777217]], FLOAT, "Cannot convert JSON value: 16777217 to float without loss of precision."),
        ([[1, None]], FLOAT, "JSON Value: null Type: Null is not of expected type: float"),
        ([[1, 1.5]], INT64, "JSON Value: 1.5 Type: Number is not of expected type: int64"),
        ([[1, 2**64]], INT64, "Type: Number is not of expected type: int64"),
        ([[1, 0]], BOOL, "JSON Value: 1 Type: Number is not of expected type: bool"),
        ([[1, 2], [3]], UINT8, "Failed to process element: 1 of 'instances' list"),
        ([[1, 2], [3, [4]]], UINT8, "the JSON lists are not a rectangular tensor"),
        ([[{"b64": "AA=="}, 1]], UINT8, 'JSON Value: {"b64":"AA=="} Type: Object is not of expected type'),
    ],
)
def test_the_first_bad_value_is_named_as_tf_serving_names_it(value, spec, message) -> None:
    with pytest.raises(ServingError) as info:
        json_tensor.to_tensor("x", value, spec, max_elements=100)
    assert info.value.code is StatusCode.INVALID_ARGUMENT and message in info.value.message


def test_an_outline_over_the_element_limit_is_refused_before_conversion() -> None:
    with pytest.raises(ServingError) as info:
        json_tensor.to_tensor("x", [[0, 0]] * 51, UINT8, max_elements=100)
    assert info.value.code is StatusCode.RESOURCE_EXHAUSTED


def test_an_echo_costs_its_budget_not_the_value() -> None:
    value = [[0] * 1000] * 1000
    assert json_tensor.echo(value) == json.dumps(value, separators=(",", ":"))[:1000] + "...(cut)"
    assert json_tensor.echo({"a": [1, "x"]}) == '{"a":[1,"x"]}'
    deep: list = []
    for _ in range(990):  # as deep as the parsers allow: no recursion error
        deep = [deep]
    assert json_tensor.echo(deep).startswith("[" * 101 + "...")
