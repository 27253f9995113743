"""What refusing hostile requests costs: time and peak memory per kind, measured in-process.

Each request goes through the same code a replica runs (``ray_app.grpc_api``, ``ray_app.rest_api``,
``ray_app.request_body``, the predictor with the embedded backend on a real model), without Ray;
peak memory is Python's allocations during the request (``tracemalloc``), time is wall time.

    .venv/bin/python -m bench.hostile_input --model-base-path runs/bench/models --model-name mnist
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

from PIL import Image

from ray_app import grpc_api, rest_api, rest_routes
from ray_app.backends.embedded import EmbeddedBackend
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import Predictor
from ray_app.protocol.protos import predict_pb2, types_pb2
from ray_app.protocol.status import ServingError
from ray_app.request_body import read_body


def _declared(dtype: int, shape: list[int], signature: str = "", **values) -> bytes:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.model_spec.signature_name = signature
    tensor = request.inputs["images" if signature != "predict_image_bytes" else "image_bytes"]
    tensor.dtype = dtype
    for size in shape:
        tensor.tensor_shape.dim.add(size=size)
    for field, value in values.items():
        getattr(tensor, field).extend(value)
    return request.SerializeToString()


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 255).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def corpus() -> list[tuple[str, str, object]]:
    """(name, kind, payload): gRPC request bytes, REST bodies, or (headers, chunks) for body reading."""
    blank = _png(2000, 2000)  # 4 Mpixel, a few KB compressed
    bomb = _png(20000, 20000)  # 400 Mpixel declared
    return [
        ("gRPC: uint8 [4000000,28,28], one int_val (3.1 GB if expanded)", "grpc",
         _declared(types_pb2.DT_UINT8, [4_000_000, 28, 28], int_val=[1])),
        ("gRPC: double [2000000000,28,28], one double_val", "grpc",
         _declared(types_pb2.DT_DOUBLE, [2_000_000_000, 28, 28], double_val=[1.0])),
        ("gRPC: float [2000000000,784] to predict_images", "grpc",
         _declared(types_pb2.DT_FLOAT, [2_000_000_000, 784], "predict_images", float_val=[1.0])),
        ("gRPC: dims [2^62,2^62,2^62] (int64 overflow)", "grpc",
         _declared(types_pb2.DT_UINT8, [2**62, 2**62, 2**62], int_val=[1])),
        ("gRPC: 5 blank 2000x2000 PNGs (20 Mpixel > budget)", "grpc",
         _declared(types_pb2.DT_STRING, [5], "predict_image_bytes", string_val=[blank] * 5)),
        ("gRPC: a 20000x20000 PNG (decompression bomb)", "grpc",
         _declared(types_pb2.DT_STRING, [1], "predict_image_bytes", string_val=[bomb])),
        ("gRPC: 9 MB of garbage bytes", "grpc", b"\x0a\xff" * (9 * 1024 * 1024 // 2)),
        ("REST: JSON nested 100,000 deep", "rest", b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("REST: 1 MB of JSON numbers in one ragged row", "rest",
         json.dumps({"instances": [[0] * 200_000, [0]]}).encode()),
        ("REST: Content-Length 10^12 declared", "body", ({"content-length": str(10**12)}, [b"{}"])),
        ("REST: chunked body, 100 MB sent", "body", ({}, [b" " * 1024 * 1024] * 100)),
    ]  # fmt: skip


def _measure(
    call: Callable[[], Awaitable[object]], loop: asyncio.AbstractEventLoop
) -> tuple[str, float, float]:
    """(answer, wall ms, peak MiB): timed on its own, then once more under tracemalloc (which slows it)."""

    def run() -> str:
        try:
            loop.run_until_complete(call())
            return "answered"
        except ServingError as exc:
            return f"{exc.code.value}: {exc.message[:70]}"

    started = time.perf_counter()
    outcome = run()
    elapsed_ms = (time.perf_counter() - started) * 1000
    tracemalloc.start()
    try:
        run()
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcome, elapsed_ms, peak_bytes / 1024 / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-base-path", type=Path, required=True)
    parser.add_argument("--model-name", default="mnist")
    args = parser.parse_args(argv)
    config = AppConfig(model_base_path=str(args.model_base_path / args.model_name))
    loop = asyncio.new_event_loop()
    backend = EmbeddedBackend(config)
    loop.run_until_complete(backend.start())
    predictor = Predictor(config, backend)
    predictor.reconfigure(LiveConfig())
    print("| request | answer | time ms | peak MiB |\n|---|---|---|---|")
    for name, kind, payload in corpus():
        if kind == "grpc":

            async def call(raw=payload):
                return await grpc_api.predict(predictor, raw)

        elif kind == "rest":

            async def call(raw=payload):
                return await rest_api.predict(predictor, rest_routes.Route("predict", "mnist"), raw)

        else:
            headers, chunks = payload

            async def call(headers=headers, chunks=chunks):
                async def stream():
                    for chunk in chunks:
                        yield chunk

                return await read_body(headers, stream(), config.limits.max_request_bytes)

        outcome, elapsed_ms, peak_mib = _measure(call, loop)
        print(f"| {name} | {outcome} | {elapsed_ms:.1f} | {peak_mib:.2f} |", flush=True)
    loop.run_until_complete(backend.stop())
    predictor.close()


if __name__ == "__main__":
    main()
