"""A normal 1-image gRPC client's latency while other clients send large REST bodies, in-process.

The replica's request path (``MnistServer.Predict`` / ``rest_v1`` of ``ray_app.deployment``, the
predictor, the byte budget, the offload threads) runs on one event loop, as it does beside Serve's
own servers with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``; the model is a stand-in that answers at once
(this measures what request handling costs the loop, not the model). Variants: no attackers; the
attackers with large bodies decoded in the decoding process (``offload_processes`` 1, bodies of
256 KiB and more), on the offload threads only (``offload_min_bytes`` 64 KiB), or everything
inline.

    .venv/bin/python -m bench.loop_stall --seconds 10 --attackers 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Iterable, Mapping

import numpy as np
from starlette.requests import Request

from ray_app.backends.base import AVAILABLE
from ray_app.config import AppConfig, LiveConfig
from ray_app.protocol.names import CLASSES_OUTPUT, IMAGES_INPUT, PROBABILITIES_OUTPUT
from ray_app.protocol.protos import predict_pb2
from ray_app.protocol.tensors import from_ndarray
from ray_app.signatures import SignatureSpec, TensorSpec

MiB = 1 << 20
_SPECS = {
    "serving_default": SignatureSpec(
        inputs={IMAGES_INPUT: TensorSpec.of(np.uint8, (None, 28, 28), "images:0")},
        outputs={
            PROBABILITIES_OUTPUT: TensorSpec.of(np.float32, (None, 10), "p:0"),
            CLASSES_OUTPUT: TensorSpec.of(np.int64, (None,), "c:0"),
        },
    ),
    "predict_images": SignatureSpec(
        inputs={IMAGES_INPUT: TensorSpec.of(np.float32, (None, 784), "images:0")},
        outputs={"scores": TensorSpec.of(np.float32, (None, 10), "s:0")},
    ),
}
ATTACK_BODIES = {  # the kinds of issue 15's table that reach conversion, and one that is refused early
    "1024x784 floats, last null (3.8 MiB)": json.dumps(
        {"signature_name": "predict_images", "inputs": [[0.5] * 784] * 1023 + [[0.5] * 783 + [None]]}
    ).encode(),
    "numbers ending in one string (7 MiB)": b'{"instances": [' + b"0," * (7 * MiB // 2 - 10) + b'"a"]}',
}


class _InstantModel:
    """A backend that answers at once (zeros): only the request path costs time."""

    kind = "instant"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def versions(self) -> list[int]:
        return [1]

    def version_states(self):
        return {1: AVAILABLE}

    def signatures(self, version: int) -> Mapping[str, SignatureSpec]:
        return _SPECS

    def set_pinned_versions(self, versions: Iterable[int]) -> None: ...

    async def predict(self, version, signature, inputs, output_filter, *, timeout_s=None):
        count = len(next(iter(inputs.values())))
        if signature == "predict_images":
            return {"scores": np.zeros((count, 10), np.float32)}
        return {
            PROBABILITIES_OUTPUT: np.zeros((count, 10), np.float32),
            CLASSES_OUTPUT: np.zeros(count, np.int64),
        }

    def health_problem(self) -> None:
        return None


class _Context:
    def set_code(self, code) -> None: ...

    def set_details(self, details) -> None: ...

    def set_trailing_metadata(self, metadata) -> None: ...

    def invocation_metadata(self):
        return []


def _server(offload_min_bytes: int, processes: int):
    from ray import serve

    from ray_app.deployment import MnistServer
    from ray_app.metrics import AppMetrics
    from ray_app.predictor import Predictor

    replica = type("Replica", (), {"_deployment_config": type("C", (), {"max_ongoing_requests": 1024})()})()
    serve.get_replica_context = lambda: replica  # @serve.batch outside a replica (as the unit tests do)
    limits = {
        "offload_min_bytes": offload_min_bytes,
        "offload_processes": processes,
        "max_inflight_bytes": 64 * MiB,
    }
    cls = MnistServer.func_or_class
    server = cls.__new__(cls)
    server._metrics = AppMetrics("mnist")
    server._auth = None  # tokens off, as in local.yaml
    server._predictor = Predictor(AppConfig(limits=limits), _InstantModel(), rng=random.Random(0))
    server._predictor.reconfigure(LiveConfig())
    return cls, server


def _rest_request(body: bytes) -> Request:
    sent = [False]

    async def receive():
        chunk, sent[0] = (b"" if sent[0] else body), True
        return {"type": "http.request", "body": chunk, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/models/mnist:predict",
        "raw_path": b"/v1/models/mnist:predict",
        "query_string": b"",
        "headers": [(b"content-length", str(len(body)).encode())],
    }
    return Request(scope, receive)


async def _run(
    seconds: float, attackers: int, body: bytes | None, offload_min_bytes: int, processes: int
) -> dict:
    cls, server = _server(offload_min_bytes, processes)
    server._predictor.start_offloading()
    await asyncio.sleep(2.0 if processes else 0.0)  # the decoding process started
    raw = predict_pb2.PredictRequest(
        model_spec={"name": "mnist"}, inputs={"images": from_ndarray(np.zeros((1, 28, 28), np.uint8))}
    ).SerializeToString()
    stop_s = time.monotonic() + seconds
    latencies_ms: list[float] = []
    attacks = [0]

    async def normal() -> None:
        while time.monotonic() < stop_s:
            started = time.perf_counter()
            await cls.Predict(server, raw, _Context())
            latencies_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.005)  # a paced client, ~150 requests/s

    async def attacker() -> None:
        while time.monotonic() < stop_s:
            await cls.rest_v1(server, _rest_request(body), "models/mnist:predict")
            attacks[0] += 1

    await asyncio.gather(normal(), *(attacker() for _ in range(attackers if body else 0)))
    server._predictor.close()
    latencies_ms.sort()
    return {
        "requests": len(latencies_ms),
        "p50_ms": statistics.median(latencies_ms),
        "p99_ms": latencies_ms[int(0.99 * (len(latencies_ms) - 1))],
        "attack_requests": attacks[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--attackers", type=int, default=4)
    args = parser.parse_args(argv)
    print(
        "| attack bodies | offload | normal 1-image gRPC p50 / p99 ms | normal requests | attack requests |"
    )
    print("|---|---|---|---|---|")
    off = 1 << 40
    variants = [("none", None, 64 * 1024, 0, "-")]
    for name, body in ATTACK_BODIES.items():
        variants += [
            (name, body, 64 * 1024, 1, "process (>= 256 KiB)"),
            (name, body, 64 * 1024, 0, "threads (>= 64 KiB)"),
            (name, body, off, 0, "off (inline)"),
        ]
    for name, body, offload, processes, where in variants:
        result = asyncio.run(_run(args.seconds, args.attackers, body, offload, processes))
        print(
            f"| {name} x{args.attackers if body else 0} | {where} | {result['p50_ms']:.2f} / {result['p99_ms']:.2f} "
            f"| {result['requests']} | {result['attack_requests']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
