"""The in-flight byte budget of a replica (issue 15 item 3): HTTP bodies and gRPC messages together,
checked from Content-Length / the message size before anything is read or parsed, refused with
429 / RESOURCE_EXHAUSTED and Retry-After while full. Through the real deployment class, no Ray."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest
from starlette.requests import Request

from ray_app.budget import ByteBudget
from ray_app.config import AppConfig, LiveConfig
from ray_app.deployment import MnistServer
from ray_app.metrics import AppMetrics
from ray_app.predictor import Predictor
from ray_app.protocol.protos import predict_pb2
from ray_app.protocol.status import ResourceExhaustedError
from ray_app.protocol.tensors import from_ndarray
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend

pytestmark = pytest.mark.usefixtures("replica_context")

IMAGE = np.zeros((1, 28, 28), np.uint8)


def test_a_budget_refuses_what_does_not_fit_and_frees_what_was_answered() -> None:
    budget = ByteBudget(1000, retry_after_s=2)
    with budget.hold(600):
        with pytest.raises(ResourceExhaustedError) as info:
            with budget.hold(401):
                pass
        assert (info.value.limit, info.value.retry_after_s) == ("max_inflight_bytes", 2)
        with budget.hold(400):
            assert budget.in_use == 1000
    assert budget.in_use == 0
    with pytest.raises(ValueError, match="max_inflight_bytes"):
        AppConfig(limits={"max_request_bytes": 2000, "max_inflight_bytes": 1000})


class _Context:
    """What the deployment uses of Serve's gRPC context."""

    def __init__(self) -> None:
        self.code, self.details, self.trailing = None, "", [("request_id", "r1")]

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = list(metadata)

    @property
    def _trailing_metadata(self):
        return self.trailing

    def invocation_metadata(self):
        return []


def _server(max_inflight_bytes: int) -> object:
    config = AppConfig(
        limits={"max_request_bytes": max_inflight_bytes, "max_inflight_bytes": max_inflight_bytes}
    )
    server = MnistServer.func_or_class.__new__(MnistServer.func_or_class)
    server._metrics = AppMetrics("mnist")
    server._auth = None  # tokens off, as in local.yaml
    server._predictor = Predictor(config, StaticBackend(versions=(1,)), rng=random.Random(0))
    server._predictor.reconfigure(LiveConfig())
    return server


def _rest(
    body: bytes, received: list[int], release: asyncio.Event | None = None, sent_first: int = 0
) -> Request:
    """A REST request whose body arrives in two chunks, ``sent_first`` bytes and the rest; with
    ``release``, the rest waits for it (a slow client)."""
    chunks = [body[:sent_first], body[sent_first:]] if sent_first else [body]

    async def receive():
        received.append(1)
        if release is not None and len(received) == len(chunks):
            await release.wait()
        chunk = chunks[len(received) - 1]
        return {"type": "http.request", "body": chunk, "more_body": len(received) < len(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/models/mnist:predict",
        "raw_path": b"/v1/models/mnist:predict",
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")],
    }
    return Request(scope, receive)


def test_requests_beyond_the_budget_are_refused_before_being_read_or_parsed() -> None:
    cls = MnistServer.func_or_class
    body = json.dumps({"instances": IMAGE.tolist()}).encode()  # ~2.4 kB
    raw = predict_pb2.PredictRequest(model_spec={"name": "mnist"}, inputs={"images": from_ndarray(IMAGE)})
    server = _server(max_inflight_bytes=3000)
    assert len(body) <= 3000 < len(body) + raw.ByteSize()

    async def main():
        release, slow_received = asyncio.Event(), []
        slow = asyncio.ensure_future(  # all but the last byte of its body arrive, then it waits
            cls.rest_v1(server, _rest(body, slow_received, release, len(body) - 1), "models/mnist:predict")
        )
        while len(slow_received) < 2:  # the first request holds what arrived while the rest is awaited
            await asyncio.sleep(0)
        assert server._predictor.inflight_bytes.in_use == len(body) - 1
        refused_received: list[int] = []
        refused = await cls.rest_v1(server, _rest(body, refused_received), "models/mnist:predict")
        context = _Context()
        refused_grpc = await cls.Predict(server, raw.SerializeToString(), context)
        release.set()
        answered = await slow
        after = await cls.rest_v1(server, _rest(body, []), "models/mnist:predict")
        return refused, refused_received, context, refused_grpc, answered, after

    refused, refused_received, context, refused_grpc, answered, after = run_on_replica_loop(main())
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert "max_inflight_bytes" in json.loads(refused.body)["error"]
    assert refused_received == []  # refused from its Content-Length: not a byte read
    import grpc

    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_inflight_bytes" in context.details
    assert context.trailing == [("request_id", "r1"), ("retry-after", "1")]
    assert not refused_grpc.outputs
    assert answered.status_code == 200 and after.status_code == 200  # freed once answered
    assert server._predictor.inflight_bytes.in_use == 0


def test_a_body_that_declares_much_and_sends_little_holds_only_what_arrived() -> None:
    """Slow uploads cannot take the budget from everyone else: one that declares a body as large as
    the whole budget and sends a byte of it holds one byte; other requests are answered."""
    cls = MnistServer.func_or_class
    body = json.dumps({"instances": IMAGE.tolist()}).encode()
    raw = predict_pb2.PredictRequest(model_spec={"name": "mnist"}, inputs={"images": from_ndarray(IMAGE)})
    server = _server(max_inflight_bytes=3000)
    declared = b'{"instances": ' + b" " * (3000 - 15) + b"}"  # declares the whole budget; completed last

    async def main():
        release, slow_received = asyncio.Event(), []
        slow = asyncio.ensure_future(
            cls.rest_v1(server, _rest(declared, slow_received, release, 1), "models/mnist:predict")
        )
        while len(slow_received) < 2:
            await asyncio.sleep(0)
        held = server._predictor.inflight_bytes.in_use
        others = [await cls.rest_v1(server, _rest(body, []), "models/mnist:predict") for _ in range(3)]
        context = _Context()
        answered_grpc = await cls.Predict(server, raw.SerializeToString(), context)
        release.set()
        await slow
        return held, others, context, answered_grpc

    held, others, context, answered_grpc = run_on_replica_loop(main())
    assert held == 1
    assert [answer.status_code for answer in others] == [200, 200, 200]
    assert context.code is None and answered_grpc.outputs
    assert server._predictor.inflight_bytes.in_use == 0


def test_open_inference_protocol_bodies_share_the_budget() -> None:
    """``/v2`` infer bodies are held in the same budget as TF Serving's: refused before being read
    while the budget is full, answered once it is free."""
    cls = MnistServer.func_or_class
    body = json.dumps({"instances": IMAGE.tolist()}).encode()
    infer = json.dumps(
        {
            "inputs": [
                {"name": "images", "shape": [1, 28, 28], "datatype": "UINT8", "data": IMAGE.ravel().tolist()}
            ]
        }
    ).encode()
    server = _server(max_inflight_bytes=len(body) + len(infer) - 2)

    def v2(received: list[int]) -> Request:
        request = _rest(infer, received)
        request.scope["path"], request.scope["raw_path"] = "/v2/models/mnist/infer", b"/v2/models/mnist/infer"
        return request

    async def main():
        release, slow_received = asyncio.Event(), []
        slow = asyncio.ensure_future(
            cls.rest_v1(server, _rest(body, slow_received, release, len(body) - 1), "models/mnist:predict")
        )
        while len(slow_received) < 2:
            await asyncio.sleep(0)
        refused_received: list[int] = []
        refused = await cls.rest_v2(server, v2(refused_received))
        release.set()
        await slow
        return refused, refused_received, await cls.rest_v2(server, v2([]))

    refused, refused_received, answered = run_on_replica_loop(main())
    assert refused.status_code == 429 and "max_inflight_bytes" in json.loads(refused.body)["error"]
    assert refused_received == []
    assert answered.status_code == 200, answered.body
    assert server._predictor.inflight_bytes.in_use == 0


@pytest.mark.parametrize(("budget_bodies", "max_peak_bodies"), [(4, 40), (16, None)])
def test_memory_under_16_concurrent_largest_bodies_is_bounded_by_the_budget(budget_bodies, max_peak_bodies):
    """16 bodies of max_request_bytes at once: only ``budget_bodies`` of them are parsed, the others
    get 429 at once, so the peak is a few bodies' worth of parsing, not sixteen (measured: 34 and
    46 bodies' worth of traced memory with a budget of 4 bodies and of 16; each request is parsed
    and converted in one step, so one document at a time is alive: the difference is the 12 bodies
    held whole)."""
    import tracemalloc

    cls = MnistServer.func_or_class
    rows = [[0.5] * 784] * 333 + [[0.5] * 783 + [None]]  # ~1 MiB of floats, the last one null
    body = json.dumps({"signature_name": "predict_images", "inputs": rows}).encode()
    server = _server(max_inflight_bytes=len(body))
    budget = budget_bodies * len(body)
    server._predictor = Predictor(
        AppConfig(  # decoded in this process, where tracemalloc sees it
            limits={"max_request_bytes": len(body), "max_inflight_bytes": budget, "offload_processes": 0}
        ),
        StaticBackend(versions=(1,)),
        rng=random.Random(0),
    )
    server._predictor.reconfigure(LiveConfig())

    async def main():
        requests = [cls.rest_v1(server, _rest(body, []), "models/mnist:predict") for _ in range(16)]
        return await asyncio.gather(*requests)

    tracemalloc.start()
    try:
        answers = run_on_replica_loop(main())
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [400] * budget_bodies + [429] * (16 - budget_bodies)  # the null; the budget
    if max_peak_bodies is not None:
        assert peak_bytes < max_peak_bodies * len(body), peak_bytes / len(body)
    else:  # without the budget's refusals the same bodies cost far more than the bound above
        assert peak_bytes > 40 * len(body), peak_bytes / len(body)  # measured: 46 bodies' worth
