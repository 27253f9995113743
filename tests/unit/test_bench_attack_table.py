"""bench/attack_table.py's payloads are the attacks issue 15's table names, and each fits under
the request size limit (so it reaches the parser, not the size check)."""

import json

import pytest

from bench.attack_table import ATTACK_BYTES, grpc_int_val_request, rest_bodies
from ray_app.config import Limits
from ray_app.protocol.protos import predict_pb2


def test_each_rest_body_fits_the_request_limit_and_is_the_named_attack():
    bodies = rest_bodies()
    assert all(len(body) <= Limits().max_request_bytes for body in bodies.values())
    first, rows, nulls, comma, keys = bodies.values()
    assert ATTACK_BYTES - 16 <= len(first) <= ATTACK_BYTES
    parsed = json.loads(first)["instances"]
    assert parsed[-1] == "a" and set(parsed[:-1]) == {0}
    assert all(row == [0] for row in json.loads(rows)["instances"])
    assert json.loads(nulls)["instances"][-1] is None
    with pytest.raises(json.JSONDecodeError):
        json.loads(comma)
    assert len(json.loads(keys)["inputs"]) == 100_000


def test_the_grpc_attack_is_a_uint8_image_with_extra_int_vals():
    request = predict_pb2.PredictRequest.FromString(grpc_int_val_request(count=1000))
    tensor = request.inputs["images"]
    assert [d.size for d in tensor.tensor_shape.dim] == [1, 28, 28]
    assert len(tensor.int_val) == 1000


def test_the_table_rows_are_the_attacks_sent_from_the_attacker_process_and_the_slow_connections() -> None:
    import grpc

    from bench.attack_table import SLOW_NAME, attack_names, attacks

    with grpc.insecure_channel("127.0.0.1:1") as channel:  # never used: nothing is sent
        sent = attacks(1, channel)
    assert [*sent, SLOW_NAME] == attack_names()


def test_the_largest_valid_body_is_within_every_limit_and_as_large_as_they_allow():
    from bench.attack_table import largest_valid_body
    from ray_app.json_tensor import composites

    limits = Limits()
    body = largest_valid_body()
    assert 0.95 * limits.max_request_bytes <= len(body) <= limits.max_request_bytes
    assert composites(body) <= limits.max_json_composites
    images = json.loads(body)["instances"]
    assert len(images) == limits.max_images_per_request
    assert {len(image) for image in images} == {28} and {len(row) for row in images[0]} == {28}
    assert {value for row in images[-1] for value in row} == {255}  # uint8, as the signature takes
