"""Deadlines end to end (issue 15 item 5): a request's remaining time travels into the batch; an
item whose caller has gone is dropped before the model runs (and counted); the backend call gets
min(remaining, backend_timeout_s)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from ray_app import deadlines, grpc_methods, oip_rest
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import InferenceRequest, Predictor
from ray_app.protocol.protos import predict_pb2
from ray_app.protocol.status import DeadlineExceededError
from ray_app.protocol.tensors import from_ndarray
from tests.unit.conftest import ArrivedBody, run_on_replica_loop
from tests.unit.static_backend import StaticBackend

pytestmark = pytest.mark.usefixtures("replica_context")

IMAGE = np.zeros((1, 28, 28), np.uint8)


class _GatedBackend(StaticBackend):
    """A backend whose calls wait for a gate (a busy model), recording each call's timeout."""

    def __init__(self) -> None:
        super().__init__(versions=(1,))
        self.gate = asyncio.Event()
        self.timeouts: list[float | None] = []

    async def predict(self, version, signature, inputs, output_filter, *, timeout_s=None):
        self.timeouts.append(timeout_s)
        await self.gate.wait()
        return await super().predict(version, signature, inputs, output_filter)


class _Expired:
    def __init__(self) -> None:
        self.count = 0

    def expired(self, count: int) -> None:
        self.count += count

    def __getattr__(self, name):  # the other metrics: not looked at here
        return lambda *args, **kwargs: None


def test_an_item_whose_deadline_passes_in_the_queue_never_reaches_the_model() -> None:
    backend, metrics = _GatedBackend(), _Expired()
    predictor = Predictor(AppConfig(backend_timeout_s=10), backend, rng=random.Random(0), metrics=metrics)
    predictor.reconfigure(LiveConfig(max_batch_size=8, batch_wait_timeout_s=0.0))

    async def main():
        request = InferenceRequest("mnist", {"images": IMAGE})
        busy = [asyncio.ensure_future(predictor.predict(request))]  # runs alone, holds the model
        while len(backend.timeouts) < 1:
            await asyncio.sleep(0)
        busy.append(asyncio.ensure_future(predictor.predict(request)))  # holds the batch handler
        while len(backend.timeouts) < 2:
            await asyncio.sleep(0)
        soon = asyncio.ensure_future(predictor.predict(request, deadline_s=time.monotonic() + 0.05))
        later = asyncio.ensure_future(predictor.predict(request, deadline_s=time.monotonic() + 5))
        await asyncio.sleep(0.2)  # the first one's deadline passes while it waits for the model
        backend.gate.set()
        return await asyncio.gather(*busy, soon, later, return_exceptions=True)

    first, second, soon, later = run_on_replica_loop(main())
    assert isinstance(soon, DeadlineExceededError), soon
    assert first.version == second.version == later.version == 1
    assert [size for _, _, size in backend.calls] == [1, 1, 1]  # the expired one never ran
    assert metrics.count == 1
    assert backend.timeouts[:2] == [10, 10]  # no deadline: backend_timeout_s
    assert 4 < backend.timeouts[2] < 5  # the time the live item has left, under backend_timeout_s


def test_deadlines_come_from_the_request_or_the_configured_timeout() -> None:
    now = time.monotonic()
    assert deadlines.http_deadline_s({}, 30) - now == pytest.approx(30, abs=1)
    assert deadlines.http_deadline_s({"x-request-timeout-seconds": "2.5"}, 30) - now == pytest.approx(
        2.5, abs=1
    )
    for junk in ("x", "-1", "nan", "inf"):
        assert deadlines.http_deadline_s({"x-request-timeout-seconds": junk}, 30) - now == pytest.approx(
            30, abs=1
        )

    class Context:
        def __init__(self, remaining, metadata=()):
            self._remaining, self._metadata = remaining, list(metadata)

        def time_remaining(self):
            return self._remaining

        def invocation_metadata(self):
            return self._metadata

    assert deadlines.grpc_deadline_s(Context(1.5), 30) - now == pytest.approx(1.5, abs=1)
    assert deadlines.grpc_deadline_s(Context(None, [("x-request-timeout-seconds", "4")]), 30) - now == (
        pytest.approx(4, abs=1)
    )
    assert deadlines.grpc_deadline_s(object(), 30) - now == pytest.approx(30, abs=1)  # Ray 2.60's context


def _tf_serving_predict(predictor: Predictor, deadline_s: float):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(from_ndarray(IMAGE, tensor_content=True))
    return grpc_methods.METHODS["Predict"].handle(predictor, request.SerializeToString(), deadline_s)


def _oip_grpc_infer(predictor: Predictor, deadline_s: float):
    request = service_pb2.ModelInferRequest(model_name="mnist")
    request.inputs.add(name="images", datatype="UINT8", shape=list(IMAGE.shape))
    request.raw_input_contents.append(IMAGE.tobytes())
    return grpc_methods.METHODS["ModelInfer"].handle(predictor, request.SerializeToString(), deadline_s)


async def _oip_rest_infer(predictor: Predictor, deadline_s: float):
    document = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    body = json.dumps(document).encode()
    headers = {"content-length": str(len(body))}
    answer = await oip_rest.handle(
        predictor, "POST", "/v2/models/mnist/infer", headers, ArrivedBody(body), deadline_s
    )
    assert answer.status == 200, answer.body
    return answer


@pytest.mark.parametrize("call", [_tf_serving_predict, _oip_grpc_infer, _oip_rest_infer])
def test_every_protocols_infer_carries_the_callers_deadline_to_the_backend(call) -> None:
    backend = _GatedBackend()
    backend.gate.set()  # an idle model: the call runs at once
    predictor = Predictor(AppConfig(backend_timeout_s=10), backend, rng=random.Random(0))
    predictor.reconfigure(LiveConfig(max_batch_size=8, batch_wait_timeout_s=0.0))
    run_on_replica_loop(call(predictor, time.monotonic() + 3))
    assert len(backend.timeouts) == 1
    assert 2 < backend.timeouts[0] <= 3  # the 3 s the caller gave, not backend_timeout_s (10 s)
