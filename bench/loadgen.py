"""Closed-loop gRPC load generator for TF Serving's ``PredictionService.Predict`` (or, with
``--protocol oip``, the Open Inference Protocol's ``GRPCInferenceService.ModelInfer``).

``concurrency`` workers share one ``grpc.aio`` channel; each sends a request, waits for the
answer, and sends the next, for ``warmup_s`` (not counted) plus ``duration_s`` (counted).
Requests are built once up front from real MNIST test digits (uint8 ``[k, 28, 28]`` in
``tensor_content``) and every RPC carries a deadline, so a run always ends by itself.

    python -m bench.loadgen --target localhost:9000 --model full1 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

import grpc
import numpy as np

_DISTINCT_REQUESTS = 64  # how many different requests each run cycles through


def build_requests(
    model: str, images_per_request: int, count: int = _DISTINCT_REQUESTS
) -> tuple[list[Any], list[np.ndarray]]:
    """``count`` PredictRequests of ``images_per_request`` MNIST test digits, and their labels.

    Built with the command-line client's own library (``client.messages``), so the benchmark
    sends exactly what users send: uint8 ``[k, 28, 28]`` to ``serving_default``.
    """
    from client.messages import ModelTarget, images_batch, predict_request
    from training.data import load_mnist

    test = load_mnist().test
    requests, labels = [], []
    for i in range(count):
        start = (i * images_per_request) % (len(test) - images_per_request)
        images = test.images[start : start + images_per_request]
        requests.append(predict_request(ModelTarget(model), images_batch(list(images))))
        labels.append(test.labels[start : start + images_per_request].astype(np.int64))
    return requests, labels


def build_oip_requests(
    model: str, images_per_request: int, count: int = _DISTINCT_REQUESTS
) -> tuple[list[Any], list[np.ndarray]]:
    """The same digits as :func:`build_requests`, as OIP ``ModelInferRequest`` s the way tritonclient
    sends them (uint8 ``[k, 28, 28]`` in ``raw_input_contents``), asking for ``classes`` only."""
    from tritonclient.grpc import service_pb2

    from training.data import load_mnist

    test = load_mnist().test
    requests, labels = [], []
    for i in range(count):
        start = (i * images_per_request) % (len(test) - images_per_request)
        images = test.images[start : start + images_per_request]
        request = service_pb2.ModelInferRequest(model_name=model)
        request.inputs.add(name="images", datatype="UINT8", shape=list(images.shape))
        request.raw_input_contents.append(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
        request.outputs.add(name="classes")
        requests.append(request)
        labels.append(test.labels[start : start + images_per_request].astype(np.int64))
    return requests, labels


def correct_oip(response: Any, labels: np.ndarray) -> int | None:
    """How many of an OIP answer's ``classes`` (raw INT64) match ``labels``; None when malformed."""
    names = [output.name for output in response.outputs]
    if "classes" not in names or len(response.raw_output_contents) != len(names):
        return None
    raw = response.raw_output_contents[names.index("classes")]
    if len(raw) != 8 * len(labels):
        return None
    return int(np.sum(np.frombuffer(raw, "<i8") == labels))


def _correct(response: Any, labels: np.ndarray) -> int | None:
    """How many predicted digits match ``labels``; None when the response is malformed."""
    from client.errors import ClientError
    from client.messages import parse_predict_response

    try:
        predictions = parse_predict_response(response, expected=len(labels))
    except ClientError:
        return None
    return int(np.sum(predictions.classes == labels))


def _percentile_ms(latencies_s: list[float], q: float) -> float | None:
    return float(np.percentile(latencies_s, q) * 1000) if latencies_s else None


async def run_load(
    target: str,
    model: str,
    concurrency: int,
    duration_s: float,
    images_per_request: int,
    *,
    warmup_s: float = 2.0,
    timeout_s: float = 5.0,
    channels: int = 1,
    verbose: bool = False,
    protocol: str = "tf_serving",
    root_certificates: bytes | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Drive ``target`` at fixed concurrency; return throughput, latency percentiles and errors.

    ``protocol``: ``tf_serving`` (``Predict``) or ``oip`` (``ModelInfer``, raw tensors).
    ``root_certificates``: speak TLS, trusting these PEM CA certificates (None: plaintext).
    ``token``: send it as a bearer token (``authorization`` metadata) on every call."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if root_certificates is None:
        opened = [grpc.aio.insecure_channel(target, options=options) for _ in range(max(1, channels))]
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        opened = [
            grpc.aio.secure_channel(target, credentials, options=options) for _ in range(max(1, channels))
        ]
    if protocol == "oip":
        from tritonclient.grpc import service_pb2

        requests, labels = build_oip_requests(model, images_per_request)
        check = correct_oip
        stubs = [
            ch.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
            for ch in opened
        ]
    else:
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        requests, labels = build_requests(model, images_per_request)
        check = _correct
        stubs = [prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict for ch in opened]

    latencies_s: list[float] = []
    errors: Counter[str] = Counter()
    warmup_errors: Counter[str] = Counter()
    counts = {"ok": 0, "images": 0, "correct": 0, "sent": 0}
    start = time.perf_counter()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s

    async def worker(index: int) -> None:
        stub = stubs[index % len(stubs)]
        n = index
        while True:
            sent = time.perf_counter()
            if sent >= stop_at:
                return
            which = n % len(requests)
            n += concurrency
            code = None
            try:
                response = await stub(requests[which], timeout=timeout_s, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            done = time.perf_counter()
            if code is None:
                correct = check(response, labels[which])
                if correct is None:
                    code = "BAD_RESPONSE"
            if done < measure_from:
                if code is not None:
                    warmup_errors[code] += 1
                continue
            if done > stop_at:  # finished after the window: neither counted nor lost
                continue
            counts["sent"] += 1
            if code is not None:
                errors[code] += 1
                continue
            counts["ok"] += 1
            counts["images"] += images_per_request
            counts["correct"] += correct
            latencies_s.append(done - sent)

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    # Every RPC has a deadline, so workers end by stop_at + timeout_s; the guard is belt and braces.
    _, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + timeout_s + 5)
    for task in pending:
        task.cancel()
    for ch in opened:
        await ch.close()

    result = {
        "target": target,
        "model": model,
        "protocol": protocol,
        "concurrency": concurrency,
        "images_per_request": images_per_request,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "timeout_s": timeout_s,
        "requests_ok": counts["ok"],
        "img_per_s": counts["images"] / duration_s,
        "req_per_s": counts["ok"] / duration_s,
        "p50_ms": _percentile_ms(latencies_s, 50),
        "p90_ms": _percentile_ms(latencies_s, 90),
        "p99_ms": _percentile_ms(latencies_s, 99),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "warmup_errors": dict(warmup_errors),
        "accuracy": counts["correct"] / counts["images"] if counts["images"] else None,
        "stuck_workers": len(pending),
    }
    if verbose:
        print(format_result(result), flush=True)
    return result


def format_result(result: dict[str, Any]) -> str:
    """One human-readable line for a ``run_load`` result."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    errors = ", ".join(f"{k}={v}" for k, v in sorted(result["errors"].items())) or "none"
    return (
        f"{result['target']} c={result['concurrency']} k={result['images_per_request']}: "
        f"{result['img_per_s']:.0f} img/s, {result['req_per_s']:.0f} req/s, "
        f"p50 {ms(result['p50_ms'])} ms, p90 {ms(result['p90_ms'])} ms, p99 {ms(result['p99_ms'])} ms, "
        f"errors: {errors}"
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="localhost:9000", help="host:port of the gRPC server")
    parser.add_argument("--model", default="mnist", help="model_spec.name")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at all times")
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured window")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured lead-in")
    parser.add_argument("--images-per-request", type=int, default=1, choices=(1, 32))
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of every RPC")
    parser.add_argument("--channels", type=int, default=1, help="gRPC channels the workers share")
    parser.add_argument("--protocol", choices=("tf_serving", "oip"), default="tf_serving")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.duration_s <= 0 or args.warmup_s < 0 or args.timeout_s <= 0:
        parser.error("--concurrency >= 1, --duration-s > 0, --warmup-s >= 0 and --timeout-s > 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one load point from the command line and print its result."""
    args = _parse_args(argv)
    result = asyncio.run(
        run_load(
            args.target,
            args.model,
            args.concurrency,
            args.duration_s,
            args.images_per_request,
            warmup_s=args.warmup_s,
            timeout_s=args.timeout_s,
            channels=args.channels,
            protocol=args.protocol,
        )
    )
    print(format_result(result))
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
