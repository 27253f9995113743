"""CPU work on request content above a small size runs off the event loop (issue 15 item 4): with
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 that loop is also Serve's gRPC/HTTP servers' and health checks'."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

from ray_app import grpc_api, json_tensor, rest_api, rest_routes
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import Predictor
from ray_app.protocol import tensors
from ray_app.protocol.protos import predict_pb2
from ray_app.protocol.tensors import from_ndarray
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend

pytestmark = pytest.mark.usefixtures("replica_context")


def _predictor() -> Predictor:
    predictor = Predictor(
        AppConfig(limits={"offload_min_bytes": 64 * 1024}), StaticBackend(), rng=random.Random(0)
    )
    predictor.reconfigure(LiveConfig())
    return predictor


def _spy(monkeypatch, module, name: str) -> list[str]:
    threads: list[str] = []
    original = getattr(module, name)

    def spied(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spied)
    return threads


@pytest.mark.parametrize("images", [1, 64])  # ~2.4 kB (inline) and ~150 kB (offloaded)
def test_rest_bodies_are_parsed_and_converted_off_the_loop_unless_small(monkeypatch, images: int) -> None:
    parsed, converted = _spy(monkeypatch, json_tensor, "parse"), _spy(monkeypatch, json_tensor, "to_tensor")
    body = json.dumps({"instances": np.zeros((images, 28, 28), int).tolist()}).encode()
    text, _, _ = run_on_replica_loop(
        rest_api.predict(_predictor(), rest_routes.Route("predict", "mnist"), body)
    )
    assert len(json.loads(text)["predictions"]) == images
    loop_thread = threading.current_thread().name
    expected = loop_thread if len(body) < 64 * 1024 else "offload"
    assert [name.split("_")[0] for name in parsed + converted] == [expected, expected]


@pytest.mark.parametrize("images", [1, 128])  # ~0.8 kB (inline) and ~100 kB (offloaded)
def test_grpc_messages_are_decoded_off_the_loop_unless_small(monkeypatch, images: int) -> None:
    decoded = _spy(monkeypatch, tensors, "to_ndarray")
    monkeypatch.setattr(grpc_api, "to_ndarray", tensors.to_ndarray)
    request = predict_pb2.PredictRequest(
        model_spec={"name": "mnist"}, inputs={"images": from_ndarray(np.zeros((images, 28, 28), np.uint8))}
    )
    raw = request.SerializeToString()
    response = run_on_replica_loop(grpc_api.predict(_predictor(), raw))
    assert list(response.outputs["classes"].tensor_shape.dim)[0].size == images
    expected = threading.current_thread().name if len(raw) < 64 * 1024 else "offload"
    assert [name.split("_")[0] for name in decoded] == [expected]
